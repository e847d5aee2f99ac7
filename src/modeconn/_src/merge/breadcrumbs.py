"""Model Breadcrumbs (Davari & Belilovsky, 2024): task vectors without their tails, then summed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from pydantic import Field, model_validator
from torch import Tensor

from .base import MergeInputs, compute_dtype, normalized
from .task_arithmetic import TaskArithmeticParams, disjoint_merge
from .tensorwise import Rows, TensorPlan, TensorwiseMerge


class BreadcrumbsParams(TaskArithmeticParams):
    """Parameters of :class:`BreadcrumbsMerge`."""

    density: float = Field(0.9, gt=0.0, le=1.0,
                           description="fraction of each task vector's entries kept")
    gamma: float = Field(0.01, ge=0.0, lt=1.0,
                         description="fraction of the largest-magnitude entries removed")
    consensus: bool = Field(False, description="TIES sign election + disjoint mean instead of "
                                               "the sum (mergekit's breadcrumbs_ties)")

    @model_validator(mode="after")
    def _fits(self) -> BreadcrumbsParams:
        if self.density + self.gamma > 1.0 + 1e-12:
            raise ValueError(f"density + gamma must be <= 1, got {self.density} + {self.gamma}")
        return self


def breadcrumbs_mask(tau: Tensor, density: float, gamma: float) -> Tensor:
    """Keep the entries between the tails: drop the ``floor(gamma·n)`` largest ``|tau|`` (the
    outliers) and the ``n - floor(density·n) - floor(gamma·n)`` smallest, keeping
    ``floor(density·n)`` entries (mergekit's ``magnitude_outliers`` counts; ties broken by a
    stable sort). ``density = 1`` keeps everything. (Where ``floor(gamma·n) = 0`` mergekit's
    slice ``[n_bot:-0]`` keeps nothing; here no outlier is removed.)

    Args:
        tau: a task vector's tensor.
        density: fraction of entries kept.
        gamma: fraction of the largest magnitudes removed.

    Returns:
        A boolean mask of ``tau``'s shape (True: kept).

    Example:
        >>> breadcrumbs_mask(torch.tensor([5.0, -0.1, 2.0, -1.0, 0.2]), 0.4, 0.2).tolist()
        [False, False, True, True, False]
    """
    n = tau.numel()
    if density >= 1.0 or n == 0:
        return torch.ones_like(tau, dtype=torch.bool)
    keep = int(density * n)
    top = int(gamma * n)
    bottom = max(n - keep - top, 0)
    order = torch.sort(tau.detach().abs().flatten().float(), stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool, device=tau.device)
    mask[order[bottom: n - top]] = True
    return mask.view_as(tau)


class BreadcrumbsMerge(TensorwiseMerge):
    """Model Breadcrumbs (Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model
    Merging with Sparse Masks", ECCV 2024).

    Per tensor, each task vector ``tau_i = theta_i - theta_base`` loses both tails
    (:func:`breadcrumbs_mask`: the ``gamma`` fraction of largest magnitudes and the smallest ones
    down to ``density``), then ``theta = theta_base + scale * sum_i w_i m_i tau_i`` (``normalize``:
    divided by ``sum_i w_i``; ``consensus``: TIES sign election and disjoint mean instead).
    Needs ``base``. BatchNorm statistics are the mean weighted by ``|w_i|``.
    """

    Params = BreadcrumbsParams
    needs_base = True

    def plan(self, states: Sequence[Mapping[str, Tensor]], params: Any,
             inputs: MergeInputs) -> TensorPlan:
        """The per-tensor plan (``mc.merge`` and ``mc.merge_files`` run it alike)."""
        assert inputs.base is not None
        base = inputs.base
        w = inputs.weight_list(len(states))
        normalize = params.consensus if params.normalize is None else params.normalize
        coef = normalized(w) if normalize and not params.consensus else w

        def combine(key: str, ts: list[Tensor], rows: Rows) -> Tensor:
            dt = compute_dtype(ts[0])
            b = base[key].to(dt)
            taus = [t.to(dt) - b for t in ts]
            taus = [torch.where(breadcrumbs_mask(t, params.density, params.gamma), t, 0.0)
                    for t in taus]
            if params.consensus:
                tau = disjoint_merge(taus, w, normalize)
            else:
                tau = cast(Tensor, sum(c * t for c, t in zip(coef, taus, strict=True)))
            return b + params.scale * tau

        stat_w = [abs(x) for x in w] if any(w) else [1.0] * len(w)
        return TensorPlan(combine, stat_w)
