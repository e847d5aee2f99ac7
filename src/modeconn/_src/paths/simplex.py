"""Low-loss simplicial complexes between modes (Benton et al., ICML 2021): SPRO and ensembles."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, IncompatibleModelsError
from ..state import check_compatible, combine, lerp
from .base import Path, _check_t, register
from .fit import ControlPointCurve, _train_split, parameter_names, train_curve

State = dict[str, Tensor]


def cayley_menger_volume(vertices: Sequence[Tensor]) -> Tensor:
    """k-dimensional volume of the simplex spanned by k + 1 points (Cayley–Menger determinant).

    ``V² = (−1)^{k+1} / (2^k (k!)²) · det CM`` with ``CM = [[0, 1ᵀ], [1, D]]`` and
    ``D_ij = ‖v_i − v_j‖²`` (differentiable; computed in float64; one point: volume 1).

    Args:
        vertices: k + 1 flat tensors of one length.

    Returns:
        The volume, a float64 scalar tensor (≥ 0).

    Example:
        >>> tri = [torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])]
        >>> round(float(cayley_menger_volume(tri)), 6)
        0.5
    """
    k = len(vertices) - 1
    if k < 1:
        return torch.ones((), dtype=torch.float64)
    v = torch.stack([x.reshape(-1).to(torch.float64) for x in vertices])
    gram = v @ v.T
    sq = gram.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0.0)
    cm = torch.ones(k + 2, k + 2, dtype=torch.float64, device=v.device)
    cm[0, 0] = 0.0
    cm[1:, 1:] = dist
    v2 = (-1) ** (k + 1) / (2**k * math.factorial(k) ** 2) * torch.linalg.det(cm)
    return v2.clamp_min(0.0).sqrt()


def _mode_complex(num_points: int) -> list[tuple[int, ...]]:
    """Benton et al.'s mode-connecting complex: {A, v_1..v_k} and {v_1..v_k, B}."""
    inner = tuple(range(1, num_points - 1))
    if not inner:
        return [(0, num_points - 1)]
    return [(0, *inner), (*inner, num_points - 1)]


@register
class Simplex(Path):
    """A simplicial complex of networks (Benton et al., ICML 2021, "Loss Surface Simplexes for
    Mode Connecting Volumes and Fast Ensembling").

    Vertices ``θ_0 = θ_A, θ_1..θ_k, θ_{n−1} = θ_B`` and a list of simplices (vertex index tuples).
    A point is ``θ(c) = Σ_i c_i θ_i`` for barycentric coordinates ``c`` (``c ≥ 0``, ``Σ c = 1``)
    supported on one simplex. Fitted between two modes (:func:`fit_simplex`) the complex is
    ``{θ_A, θ_1..θ_k}`` ∪ ``{θ_1..θ_k, θ_B}``; from scratch (``fit_subspace(kind="simplex")``)
    it is one simplex of all vertices. As a :class:`Path`, ``θ(t)`` runs from θ_A through the
    centroid of the shared vertices to θ_B (or along the edge θ_A–θ_B when a simplex holds both).

    Args:
        points: the vertices as state dicts (θ_A first, θ_B last).
        simplices: vertex index tuples (default: the mode-connecting complex above).
        meta: optional metadata (``meta["simplices"]`` records the simplices).

    Example:
        >>> a, v, b = ({"w": torch.tensor([x])} for x in (0.0, 3.0, 6.0))
        >>> s = Simplex([a, v, b])
        >>> s.state([0.5, 0.5, 0.0])["w"].item(), s.simplices
        (1.5, [(0, 1), (1, 2)])
    """

    kind = "simplex"

    def __init__(
        self,
        points: Sequence[Mapping[str, Tensor]],
        simplices: Sequence[Sequence[int]] | None = None,
        *,
        meta: dict[str, Any] | None = None,
    ):
        super().__init__(points, meta=meta)
        if simplices is None:
            simplices = self.meta.get("simplices") or _mode_complex(self.num_points)
        cells = [tuple(int(i) for i in s) for s in simplices]
        n = self.num_points
        if not cells or any(not c or len(set(c)) != len(c) for c in cells):
            raise IncompatibleModelsError("a Simplex needs simplices of distinct vertex indices")
        if any(not 0 <= i < n for c in cells for i in c) or {i for c in cells for i in c} != set(
            range(n)
        ):
            raise IncompatibleModelsError(
                f"simplices must use every vertex index 0..{n - 1} and no other"
            )
        self.simplices = cells
        self.meta["simplices"] = [list(c) for c in cells]

    @classmethod
    def from_points(
        cls, points: Sequence[Mapping[str, Tensor]], *, meta: dict[str, Any] | None = None
    ) -> Path:
        return cls(points, (meta or {}).get("simplices"), meta=meta)

    @property
    def vertices(self) -> list[State]:
        """The vertices (copies), θ_A first and θ_B last."""
        return self.points

    def coefficients(self, t: float) -> Tensor:
        """Barycentric coordinates of the path point θ(t) (θ_A → centroid of shared → θ_B).

        Example:
            >>> s = Simplex([{"w": torch.zeros(1)}] * 4)
            >>> s.coefficients(0.5).tolist()
            [0.0, 0.5, 0.5, 0.0]
        """
        return path_coefficients(self.simplices, self.num_points, t)

    def state(self, t: float | Sequence[float] | Tensor) -> State:
        """The network at a path position ``t`` or at barycentric coordinates.

        Args:
            t: a float in [0, 1] (the path θ(t)) or ``num_points`` barycentric coordinates
                (non-negative, summing to 1). A corner ``e_i`` gives vertex i exactly.

        Returns:
            A state dict (integer buffers from the vertex with the largest coordinate).

        Example:
            >>> s = Simplex([{"w": torch.zeros(1)}, {"w": torch.ones(1)}, {"w": torch.ones(1) * 2}])
            >>> s.state([0.0, 0.0, 1.0])["w"].item()
            2.0
        """
        if isinstance(t, int | float) or (isinstance(t, Tensor) and t.ndim == 0):
            return super().state(float(t))
        c = torch.as_tensor(t, dtype=torch.float64).flatten()
        if len(c) != self.num_points:
            raise ConfigError(
                f"give {self.num_points} barycentric coordinates (one per vertex), got {len(c)}"
            )
        if bool((c < 0).any()) or abs(float(c.sum()) - 1.0) > 1e-6:
            raise ConfigError("barycentric coordinates must be >= 0 and sum to 1")
        used = [(p, float(w)) for p, w in zip(self._points, c.tolist(), strict=True) if w != 0.0]
        out = combine([p for p, _ in used], [w for _, w in used])
        near = self._points[int(c.argmax())]
        for k, v in near.items():
            if not v.is_floating_point():
                out[k] = v.clone()
        return out

    def sample(self, n: int, seed: int = 0) -> list[Tensor]:
        """``n`` random points of the complex as barycentric coordinates.

        A simplex is picked uniformly, then a point uniformly inside it (Dirichlet(1) weights on
        its vertices), as in SPRO's training.

        Args:
            n: number of points.
            seed: seed of a private generator.

        Returns:
            ``n`` float64 tensors of shape ``(num_points,)``.

        Example:
            >>> s = Simplex([{"w": torch.zeros(1)}] * 3)
            >>> [float(c.sum()) for c in s.sample(2)]
            [1.0, 1.0]
        """
        gen = torch.Generator().manual_seed(seed)
        return [sample_coordinates(self.simplices, self.num_points, gen) for _ in range(n)]


def path_coefficients(simplices: Sequence[Sequence[int]], n: int, t: float) -> Tensor:
    """Coordinates of θ(t): θ_A → centroid of the vertices all simplices share → θ_B.

    Straight along the edge θ_A–θ_B when one simplex holds both (or there are only two vertices).

    Example:
        >>> path_coefficients([(0, 1), (1, 2)], 3, 0.25).tolist()
        [0.5, 0.5, 0.0]
    """
    t = _check_t(t)
    c = torch.zeros(n, dtype=torch.float64)
    if n == 2 or any(0 in s and n - 1 in s for s in simplices):
        c[0], c[-1] = 1.0 - t, t
        return c
    shared = set(simplices[0]).intersection(*map(set, simplices[1:])) or set(range(1, n - 1))
    mid = torch.zeros(n, dtype=torch.float64)
    mid[sorted(shared)] = 1.0 / len(shared)
    if t <= 0.5:
        c[0] = 1.0 - 2 * t
        return c + 2 * t * mid
    c[-1] = 2 * t - 1.0
    return c + (2.0 - 2 * t) * mid


def sample_coordinates(
    simplices: Sequence[Sequence[int]], num_points: int, generator: torch.Generator
) -> Tensor:
    """One uniform point of a random simplex: ``c_S ~ Dirichlet(1)`` (normalised exponentials)."""
    cell = simplices[int(torch.randint(len(simplices), (), generator=generator))]
    e = -torch.log1p(-torch.rand(len(cell), generator=generator, dtype=torch.float64))
    c = torch.zeros(num_points, dtype=torch.float64)
    c[list(cell)] = e / e.sum()
    return c


class SimplexCurve(ControlPointCurve):
    """Trainable vertices of a :class:`Simplex`; trains random points, penalises small volume.

    Positions are barycentric coordinates drawn by :func:`sample_coordinates`; the penalty is
    ``−λ · mean_S log V(S)`` over the simplices (SPRO's volume term) plus ``β · mean_{i<j}
    cos²(θ_i, θ_j)`` over vertex pairs (Wortsman et al. 2021's term for subspaces,
    :func:`cosine_penalty`), each when its coefficient is non-zero.
    """

    def __init__(
        self,
        points: Sequence[Mapping[str, Tensor]],
        param_names: Sequence[str],
        *,
        simplices: Sequence[Sequence[int]] | None = None,
        volume_weight: float = 0.0,
        cosine_weight: float = 0.0,
        **kwargs: Any,
    ):
        super().__init__("simplex", points, param_names, **kwargs)
        self.simplices = [tuple(s) for s in (simplices or _mode_complex(len(points)))]
        self.volume_weight = float(volume_weight)
        self.cosine_weight = float(cosine_weight)

    def coefficients(self, t: Any) -> Tensor:
        c = torch.as_tensor(t, dtype=torch.float64)
        if c.ndim == 0:  # a path position
            return path_coefficients(self.simplices, self.num_points, float(c))
        return c

    def draw(self, generator: torch.Generator) -> Tensor:
        return sample_coordinates(self.simplices, self.num_points, generator)

    def penalty(self) -> Tensor | float:
        vecs = self.vectors()
        out: Tensor | float = 0.0
        if self.volume_weight:
            logv = [cayley_menger_volume([vecs[i] for i in s]).clamp_min(1e-30).log()
                    for s in self.simplices]  # fmt: skip
            out = out - self.volume_weight * torch.stack(logv).mean().to(vecs[0].dtype)
        if self.cosine_weight:
            out = out + self.cosine_weight * cosine_penalty(self)
        return out

    def to_path(self, meta: dict[str, Any] | None = None) -> Path:
        cells = [list(s) for s in self.simplices]
        return super().to_path(meta={**(meta or {}), "simplices": cells})


def cosine_penalty(curve: ControlPointCurve) -> Tensor:
    """``mean_{i<j} cos²(θ_i, θ_j)`` over the curve's control points, on weight matrices only.

    Wortsman et al. 2021 (apple/learning-subspaces) regularise ``cos²`` of the concatenated
    conv/linear weights of a random pair of points; the mean over all pairs is its expectation.
    Entries of parameters with fewer than 2 dimensions (biases, norm scales) are left out.
    """
    mask = getattr(curve, "_matrix_mask", None)
    if mask is None:
        sizes = zip(curve.sizes, curve.shapes, strict=True)
        mask = torch.cat([torch.full((n,), len(shape) >= 2) for n, shape in sizes])
        if not bool(mask.any()):
            mask = torch.ones_like(mask)
        curve._matrix_mask = mask  # cached on first use
    vecs = curve.vectors()
    mask = mask.to(vecs[0].device)
    return mean_squared_cosine([v[mask] for v in vecs]).to(vecs[0].dtype)


def mean_squared_cosine(vectors: Sequence[Tensor]) -> Tensor:
    """``mean_{i<j} cos²(v_i, v_j)`` (Wortsman et al. 2021's regulariser; 0 for one vector).

    Example:
        >>> float(mean_squared_cosine([torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])]))
        0.5
    """
    terms = [
        (a @ b) ** 2 / (a.pow(2).sum() * b.pow(2).sum()).clamp_min(1e-30)
        for i, a in enumerate(vectors)
        for b in vectors[i + 1 :]
    ]
    return torch.stack(terms).mean() if terms else torch.zeros(())


def fit_simplex(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Any,
    *,
    extra_vertices: int = 1,
    volume_weight: float = 1e-3,
    init_scale: float = 0.1,
    epochs: int = 20,
    lr: float = 0.05,
    wd: float = 5e-4,
    momentum: float = 0.9,
    batch_size: int = 128,
    seed: int = 0,
    device: str | torch.device | None = None,
    checkpoint_dir: Any = None,
    resume: bool = False,
    progress: bool = True,
) -> Simplex:
    """Fit a mode-connecting simplicial complex (SPRO; Benton et al., ICML 2021).

    The complex has the two fixed modes θ_A, θ_B and ``extra_vertices`` = k shared trainable
    vertices θ_1..θ_k; its simplices are ``{θ_A, θ_1..θ_k}`` and ``{θ_1..θ_k, θ_B}``. Every
    minibatch picks a simplex, draws a uniform point ``c ~ Dirichlet(1)`` in it and takes an SGD
    step on ``CE(f(x; Σ c_i θ_i), y) + ½·wd·‖θ(c)‖² − λ · mean_S log V(S)`` (``V``: the
    Cayley–Menger volume, :func:`cayley_menger_volume`; λ = ``volume_weight`` keeps the complex
    wide). Training is :func:`~modeconn._src.paths.fit.train_curve`'s (Garipov schedule, seeded,
    resumable). The extra vertices start near the midpoint ``½(θ_A + θ_B)`` plus Gaussian noise
    of norm ``init_scale · ‖θ_A − θ_B‖`` (seeded), so no simplex starts flat. With k = 1 the
    complex is a polygonal chain A → θ_1 → B. Differences from the authors' code
    (g-benton/loss-surface-simplexes): there the bonus is ``λ' · log(Σ_S V(S)² + 1e-4)`` (λ' ≈
    2λ), each step averages 5 sampled points, and single-mode simplexes grow one vertex at a
    time; here all k vertices train together, one point per minibatch, as in curve training.

    Args:
        model_a: mode A (not modified).
        model_b: mode B (not modified), same architecture.
        data: training data (or a ``Splits``: its train split).
        extra_vertices: k ≥ 1 trainable vertices.
        volume_weight: λ of the log-volume term (0: none).
        init_scale: relative size of the vertices' initial noise.
        epochs: training epochs.
        lr: base learning rate.
        wd: L2 coefficient on θ(c).
        momentum: SGD momentum.
        batch_size: minibatch size.
        seed: seed of all randomness.
        device: where to train.
        checkpoint_dir: checkpoint every epoch here; ``resume=True`` continues from it.
        resume: continue an interrupted run.
        progress: show a progress bar.

    Returns:
        A :class:`Simplex` (CPU) whose ``meta`` records the settings and history.

    Example:
        >>> s = mc.fit_simplex(a, b, splits, extra_vertices=2, epochs=10)  # doctest: +SKIP
        >>> nets = [s.state(c) for c in s.sample(5)]  # doctest: +SKIP
    """
    if extra_vertices < 1:
        raise ConfigError(f"extra_vertices must be >= 1, got {extra_vertices}")
    if volume_weight < 0 or init_scale < 0:
        raise ConfigError("volume_weight and init_scale must be >= 0")
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    check_compatible([state_a, state_b], ["model A", "model B"])
    names, aliases = parameter_names(model_a)
    mid = lerp(state_a, state_b, 0.5)
    gen = torch.Generator().manual_seed(seed + 7)
    dim = sum(state_a[n].numel() for n in names)
    dist = sum(float((state_a[n].double() - state_b[n].double()).pow(2).sum()) for n in names)
    sigma = init_scale * dist**0.5 / max(dim, 1) ** 0.5
    extras = []
    for _ in range(extra_vertices):
        v = dict(mid)
        for n in names:
            noise = torch.randn(state_a[n].shape, generator=gen, dtype=torch.float64) * sigma
            v[n] = (mid[n].double() + noise).to(mid[n].dtype)
        extras.append(v)
    frozen = [n for n, p in model_a.named_parameters() if not p.requires_grad]
    curve = SimplexCurve(
        [state_a, *extras, state_b], names, volume_weight=volume_weight,
        aliases=aliases, frozen_names=frozen,
    )  # fmt: skip
    settings = {
        "extra_vertices": extra_vertices, "volume_weight": volume_weight,
        "init_scale": init_scale, "epochs": epochs, "lr": lr, "wd": wd, "momentum": momentum,
        "batch_size": batch_size, "seed": seed,
    }  # fmt: skip
    history = train_curve(
        model_a, curve, _train_split(data), epochs=epochs, lr=lr, wd=wd, momentum=momentum,
        batch_size=batch_size, seed=seed, device=device, checkpoint_dir=checkpoint_dir,
        resume=resume, progress=progress, config={"method": "simplex", **settings},
    )  # fmt: skip
    meta = {
        "model": getattr(model_a, "modeconn_config", None),
        "fit": {"method": "spro", **settings},
        "history": history,
    }
    out = curve.to_path(meta=meta)
    assert isinstance(out, Simplex)
    return out


def simplex_ensemble(
    model: nn.Module,
    simplices: Simplex | Sequence[Simplex],
    data: Any,
    *,
    samples: int = 5,
    seed: int = 0,
    bn_data: Any = None,
    device: str | torch.device | None = None,
) -> Any:
    """Ensemble of random points of one or several complexes (Benton et al. 2021, SPRO / ESPRO).

    ``p̄(y|x) = (1/M) Σ_m softmax(f(x; θ(c_m)))_y`` with ``samples`` points ``c_m`` drawn from
    each complex (:meth:`Simplex.sample`; several complexes: ESPRO), evaluated by
    :func:`modeconn.evaluate_ensemble`.

    Args:
        model: the architecture (not modified).
        simplices: a :class:`Simplex` or a list of them.
        data: evaluation data.
        samples: points per complex.
        seed: sampling seed (complex j uses ``seed + j``).
        bn_data: data for BatchNorm statistics (each member's are recomputed), or ``None``.
        device: where to run.

    Returns:
        An :class:`~modeconn.EnsembleResult`.

    Example:
        >>> r = simplex_ensemble(model, s, splits.test, samples=5)  # doctest: +SKIP
    """
    from .ensemble import evaluate_ensemble

    group = [simplices] if isinstance(simplices, Simplex) else list(simplices)
    if samples < 1 or not group:
        raise ConfigError("need samples >= 1 and at least one Simplex")
    states = [s.state(c) for j, s in enumerate(group) for c in s.sample(samples, seed=seed + j)]
    return evaluate_ensemble(model, states, data, bn_data=bn_data, device=device)
