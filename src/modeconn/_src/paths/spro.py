"""SPRO: training low-loss simplicial complexes between modes (Benton et al., ICML 2021)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..state import check_compatible, lerp
from .base import Path
from .fit import ControlPointCurve, _train_split, parameter_names, train_curve
from .simplex import (
    Simplex,
    _mode_complex,
    cayley_menger_volume,
    path_coefficients,
    sample_coordinates,
)


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
    callback: Callable[[int, dict[str, float]], None] | None = None,
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
        resume: continue an interrupted run (same settings); equals an uninterrupted run.
        progress: show a progress bar.
        callback: ``(epoch, record)`` after each epoch (raising interrupts training).

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
        resume=resume, progress=progress, callback=callback,
        config={"method": "simplex", **settings},
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
