"""Simplicial complexes of networks (Benton et al., ICML 2021): the ``Simplex`` path kind."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, IncompatibleModelsError
from ..state import combine
from .base import Path, _check_t, register

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
