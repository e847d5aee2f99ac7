"""Model Stock (Jang et al., 2024): interpolate the fine-tuned average toward the base by angle."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from .base import MergeInputs, Params, compute_dtype
from .tensorwise import Rows, TensorPlan, TensorwiseMerge


class ModelStockParams(Params):
    """Parameters of :class:`ModelStockMerge`."""

    filter_wise: bool = Field(
        False, description="one ratio per output row (filter) instead of one per tensor"
    )
    eps: float = Field(1e-6, gt=0.0, description="floor of the task vectors' norm product")
    min_cos: float | None = Field(
        0.0, ge=-1.0, le=1.0,
        description="floor of the mean cosine (0: obtuse task vectors give the base; None: no "
                    "floor, as mergekit, and t leaves [0, 1])",
    )


def model_stock_tensor(base: Tensor, tensors: Sequence[Tensor], *, filter_wise: bool = False,
                       eps: float = 1e-6, min_cos: float | None = 0.0) -> Tensor:
    """Model Stock's merge of one tensor (Jang et al., 2024, Eq. (2)/(3)).

    With task vectors ``tau_i = theta_i - theta_0`` (``N`` of them), ``cos`` the mean pairwise
    cosine ``<tau_i, tau_j> / max(|tau_i| |tau_j|, eps)`` (clamped to [-1, 1]),

        t = N cos / (1 + (N - 1) cos),    theta_H = t * mean_i theta_i + (1 - t) * theta_0,

    per tensor, or per output row with ``filter_wise`` (1-D tensors are one row). A zero task
    vector gives ``cos = 0``, hence ``theta_0``. The paper's derivation assumes acute angles
    (fine-tunes of one task); ``cos`` is floored at ``min_cos`` (default 0, so obtuse task
    vectors give ``theta_0`` instead of ``t < 0``, or ``|t|`` exploding near
    ``cos = -1/(N - 1)``); ``min_cos=None`` is mergekit's ``model_stock`` exactly.

    Args:
        base: ``theta_0``'s tensor.
        tensors: the fine-tuned models' tensors (N >= 2, same shape).
        filter_wise: one ratio per output row instead of one per tensor.
        eps: floor of ``|tau_i| |tau_j|``.
        min_cos: floor of the mean cosine (``None``: none).

    Returns:
        ``theta_H`` (compute dtype: float64 for float64 inputs, else float32).

    Example:
        >>> b = torch.zeros(2)
        >>> model_stock_tensor(b, [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])]).tolist()
        [0.0, 0.0]
        >>> model_stock_tensor(b, [torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])]).tolist()
        [1.0, 1.0]
    """
    dt = compute_dtype(tensors[0])
    shape = base.shape

    def rows(t: Tensor) -> Tensor:
        t = t.to(dt)
        return t.reshape(t.shape[0], -1) if filter_wise and t.dim() >= 2 else t.reshape(1, -1)

    b = rows(base)
    taus = [rows(t) - b for t in tensors]
    cos = torch.stack([
        ((x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1)).clamp_min(eps)).clamp(-1, 1)
        for x, y in combinations(taus, 2)
    ]).mean(0).unsqueeze(-1)
    if min_cos is not None:
        cos = cos.clamp_min(min_cos)
    n = len(tensors)
    den = 1 + (n - 1) * cos
    t = torch.where(den.abs() > eps, n * cos / torch.where(den.abs() > eps, den, 1.0), 0.0)
    avg = sum(rows(x) for x in tensors) / n
    return (t * avg + (1 - t) * b).reshape(shape)


class ModelStockMerge(TensorwiseMerge):
    """Model Stock (Jang, Yun & Han, "Model Stock: All we need is just a few fine-tuned models",
    ECCV 2024): ``theta_H = t * mean_i theta_i + (1 - t) * theta_0`` per tensor with
    ``t = N cos / (1 + (N - 1) cos)`` and ``cos`` the mean pairwise cosine of the task vectors
    (:func:`model_stock_tensor`; ``cos`` floored at ``min_cos = 0``). Needs ``base``
    (``theta_0``) and at least two fine-tuned models; no weights. BatchNorm statistics are the
    plain mean.
    """

    Params = ModelStockParams
    needs_base = True
    weighted = False
    min_models = 2

    def plan(self, states: Sequence[Mapping[str, Tensor]], params: Any,
             inputs: MergeInputs) -> TensorPlan:
        """The per-tensor plan (``mc.merge`` and ``mc.merge_files`` run it alike)."""
        assert inputs.base is not None
        base = inputs.base

        def combine(key: str, ts: list[Tensor], rows: Rows) -> Tensor:
            return model_stock_tensor(base[key], ts, filter_wise=params.filter_wise,
                                      eps=params.eps, min_cos=params.min_cos)

        return TensorPlan(combine, [1.0] * len(states))
