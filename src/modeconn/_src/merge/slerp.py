"""Spherical linear interpolation (SLERP) of two models, tensor by tensor."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from pydantic import Field
from torch import Tensor

from ..lazy import read_rows
from .base import MergeInputs, Params, compute_dtype
from .tensorwise import Rows, TensorPlan, TensorwiseMerge, blocks_of


class SlerpParams(Params):
    """Parameters of :class:`SlerpMerge`."""

    t: float = Field(0.5, ge=0.0, le=1.0, description="position between model 0 (t=0) and 1")
    dot_threshold: float = Field(
        0.9995, gt=0.0, le=1.0, description="|cos Omega| above which the tensors count as colinear"
    )


def slerp(v0: Tensor, v1: Tensor, t: float, dot_threshold: float = 0.9995) -> Tensor:
    """Spherical interpolation of two tensors (Shoemake, SIGGRAPH 1985), as mergekit applies it.

    With ``cos Omega = <v0, v1> / (|v0| |v1|)`` (the tensors flattened),

        slerp(v0, v1; t) = sin((1 - t) Omega) / sin(Omega) * v0 + sin(t Omega) / sin(Omega) * v1,

    the unnormalised tensors are interpolated (for ``|v0| = |v1|`` the norm is kept). When
    ``|cos Omega| > dot_threshold`` (near-colinear, ``sin Omega`` near 0) or a tensor is zero it
    falls back to ``lerp``: ``(1 - t) v0 + t v1``. Exact at ``t = 0`` and ``t = 1``.

    Args:
        v0: the tensor at ``t = 0``.
        v1: the tensor at ``t = 1`` (same shape).
        t: the position.
        dot_threshold: colinearity threshold.

    Returns:
        A new tensor in the compute dtype (float32, or float64 for float64 input).

    Example:
        >>> out = slerp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.5)
        >>> [round(x, 4) for x in out.tolist()]
        [0.7071, 0.7071]
    """
    dt = compute_dtype(v0)
    a, b = v0.to(dt), v1.to(dt)
    return slerp_combine(a, b, t, slerp_weights(_sums([(a, b)]), t, dot_threshold))


def _sums(pairs: Iterable[tuple[Tensor, Tensor]]) -> tuple[float, float, float]:
    """``(<a, b>, |a|^2, |b|^2)`` accumulated in float64 over pieces of two tensors."""
    dot = na2 = nb2 = 0.0
    for a, b in pairs:
        x, y = a.reshape(-1).double(), b.reshape(-1).double()
        dot += float(x @ y)
        na2 += float(x @ x)
        nb2 += float(y @ y)
    return dot, na2, nb2


def slerp_weights(sums: tuple[float, float, float], t: float,
                  dot_threshold: float) -> tuple[float, float] | None:
    """SLERP's coefficients ``(sin((1-t) Omega) / sin Omega, sin(t Omega) / sin Omega)`` from
    ``(<a, b>, |a|^2, |b|^2)``; ``None`` where :func:`slerp` lerps (a zero or near-colinear
    tensor). ``t = 0`` and ``t = 1`` give ``(1, 0)`` and ``(0, 1)``: the endpoints exactly."""
    if t == 0:
        return 1.0, 0.0
    if t == 1:
        return 0.0, 1.0
    dot, na2, nb2 = sums
    if na2 == 0 or nb2 == 0:
        return None
    cos = dot / math.sqrt(na2 * nb2)
    if abs(cos) > dot_threshold:
        return None
    omega = math.acos(max(-1.0, min(1.0, cos)))
    s = math.sin(omega)
    return math.sin((1 - t) * omega) / s, math.sin(t * omega) / s


def slerp_combine(a: Tensor, b: Tensor, t: float, weights: tuple[float, float] | None) -> Tensor:
    """``w0 a + w1 b`` (entry-wise, so any row block of the tensors), or ``lerp(a, b, t)``."""
    if weights is None:
        return torch.lerp(a, b, float(t))
    w0, w1 = weights
    if (w0, w1) == (1.0, 0.0):
        return a.clone()
    if (w0, w1) == (0.0, 1.0):
        return b.clone()
    return w0 * a + w1 * b


class SlerpMerge(TensorwiseMerge):
    """SLERP of two models per tensor (Shoemake 1985; popularised for model merging by mergekit,
    Goddard et al. 2024).

    ``theta_k = sin((1-t) Omega_k)/sin Omega_k theta_0k + sin(t Omega_k)/sin Omega_k theta_1k``
    for every tensor ``k`` with angle ``Omega_k`` between the two models' tensors (its dot
    product and norms accumulated in float64 over row blocks, then the combination block by
    block, so a streamed merge holds blocks, not tensors); lerp for near-colinear or zero
    tensors; BatchNorm statistics are lerped. Exactly two models; no
    weights (``t`` plays their role).
    """

    Params = SlerpParams
    min_models = 2
    max_models = 2
    weighted = False

    def plan(self, states: Sequence[Mapping[str, Tensor]], params: SlerpParams,  # type: ignore[override]
             inputs: MergeInputs) -> TensorPlan:
        t = params.t
        coef: dict[str, tuple[float, float] | None] = {}

        def fn(key: str, ts: list[Tensor], rows: Rows) -> Tensor:
            dt = compute_dtype(ts[0])
            if rows is None or rows[0] == 0:  # pre-pass over the tensor: the angle
                pairs = ((x.to(dt), read_rows(states[1], key, *r).to(dt))
                         for r, x in blocks_of(states[0], key))
                coef.clear()
                coef[key] = slerp_weights(_sums(pairs), t, params.dot_threshold)
            return slerp_combine(ts[0].to(dt), ts[1].to(dt), t, coef[key])

        return TensorPlan(fn, [1.0 - t, t], elementwise=True)
