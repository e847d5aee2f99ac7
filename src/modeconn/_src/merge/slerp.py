"""Spherical linear interpolation (SLERP) of two models, tensor by tensor."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from pydantic import Field
from torch import Tensor

from .base import MergeInputs, Params, compute_dtype
from .tensorwise import TensorPlan, TensorwiseMerge


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
    if t == 0:
        return a.clone()
    if t == 1:
        return b.clone()
    na, nb = a.norm(), b.norm()
    if float(na) == 0 or float(nb) == 0:
        return torch.lerp(a, b, float(t))
    cos = float((a.flatten() @ b.flatten()) / (na * nb))
    if abs(cos) > dot_threshold:
        return torch.lerp(a, b, float(t))
    omega = math.acos(max(-1.0, min(1.0, cos)))
    s = math.sin(omega)
    return (math.sin((1 - t) * omega) / s) * a + (math.sin(t * omega) / s) * b


class SlerpMerge(TensorwiseMerge):
    """SLERP of two models per tensor (Shoemake 1985; popularised for model merging by mergekit,
    Goddard et al. 2024).

    ``theta_k = sin((1-t) Omega_k)/sin Omega_k theta_0k + sin(t Omega_k)/sin Omega_k theta_1k``
    for every tensor ``k`` with angle ``Omega_k`` between the two models' tensors; lerp for
    near-colinear or zero tensors; BatchNorm statistics are lerped. Exactly two models; no
    weights (``t`` plays their role).
    """

    Params = SlerpParams
    min_models = 2
    max_models = 2
    weighted = False

    def plan(self, states: Sequence[Mapping[str, Tensor]], params: SlerpParams,  # type: ignore[override]
             inputs: MergeInputs) -> TensorPlan:
        t = params.t
        return TensorPlan(lambda k, ts, rows: slerp(ts[0], ts[1], t, params.dot_threshold),
                          [1.0 - t, t])
