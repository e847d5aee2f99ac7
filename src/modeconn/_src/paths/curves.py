"""Curves with bends: Bezier curves and polygonal chains (Garipov et al. 2018)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import Path, _check_t, register


def bezier_coefficients(t: float, num_points: int) -> Tensor:
    """Bernstein weights ``C(n, i) t^i (1 − t)^(n − i)``, ``n = num_points − 1`` (float64).

    Example:
        >>> bezier_coefficients(0.5, 3).tolist()
        [0.25, 0.5, 0.25]
    """
    t = _check_t(t)
    n = num_points - 1
    return torch.tensor(
        [math.comb(n, i) * t**i * (1.0 - t) ** (n - i) for i in range(num_points)],
        dtype=torch.float64,
    )


def polychain_coefficients(t: float, num_points: int) -> Tensor:
    """Hat weights ``max(0, 1 − |t (n − 1) − i|)`` of a polygonal chain with n points (float64).

    Example:
        >>> polychain_coefficients(0.25, 3).tolist()
        [0.5, 0.5, 0.0]
    """
    t = _check_t(t)
    s = t * (num_points - 1)
    return torch.tensor(
        [max(0.0, 1.0 - abs(s - i)) for i in range(num_points)], dtype=torch.float64
    )


@register
class BezierCurve(Path):
    """A Bezier curve through ``points`` (Garipov et al., NeurIPS 2018, "Loss Surfaces, Mode
    Connectivity, and Fast Ensembling of DNNs").

    θ(t) = Σ_{i=0..n} C(n, i) t^i (1 − t)^(n − i) θ_i, with θ_0 and θ_n the endpoints and the
    θ_1..θ_{n−1} the *bends* (one bend: a quadratic curve, the paper's default).

    Args:
        points: ``[θ_A, bend_1, ..., bend_k, θ_B]`` as state dicts (at least 2).
        meta: optional metadata.

    Example:
        >>> import torch
        >>> a, m, b = ({"w": torch.tensor([v])} for v in (0.0, 2.0, 0.0))
        >>> BezierCurve([a, m, b]).state(0.5)["w"].item()   # 0.25*0 + 0.5*2 + 0.25*0
        1.0
    """

    kind = "bezier"

    def coefficients(self, t: float) -> Tensor:
        """Bernstein weights of the curve's points at ``t`` (see :func:`bezier_coefficients`)."""
        return bezier_coefficients(t, self.num_points)


@register
class PolyChain(Path):
    """A polygonal chain through ``points`` (Garipov et al., NeurIPS 2018).

    Piecewise linear: the n points sit at t = i/(n − 1) and the coefficient of point i is
    ``max(0, 1 − |t (n − 1) − i|)``.

    Args:
        points: ``[θ_A, bend_1, ..., bend_k, θ_B]`` as state dicts (at least 2).
        meta: optional metadata.

    Example:
        >>> import torch
        >>> a, m, b = ({"w": torch.tensor([v])} for v in (0.0, 2.0, 0.0))
        >>> PolyChain([a, m, b]).state(0.5)["w"].item()   # exactly the bend
        2.0
    """

    kind = "polychain"

    def coefficients(self, t: float) -> Tensor:
        """Hat weights of the chain's points at ``t`` (see :func:`polychain_coefficients`)."""
        return polychain_coefficients(t, self.num_points)


COEFFICIENTS = {"bezier": bezier_coefficients, "polychain": polychain_coefficients}


def curve_kinds() -> list[str]:
    """Names of the curve kinds ``fit_curve(kind=...)`` learns.

    Example:
        >>> curve_kinds()
        ['bezier', 'polychain']
    """
    return sorted(COEFFICIENTS)
