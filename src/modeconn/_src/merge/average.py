"""Weighted averaging of state dicts (the uniform model soup)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydantic import Field
from torch import Tensor

from .base import MergeInputs, Params, weighted_mean, weighted_sum
from .tensorwise import TensorPlan, TensorwiseMerge


class AverageParams(Params):
    """Parameters of :class:`AverageMerge`."""

    normalize: bool = Field(True, description="divide by the sum of the weights")


class AverageMerge(TensorwiseMerge):
    """Weighted average of the models, the uniform soup (Wortsman et al., ICML 2022).

    ``theta* = sum_i w_i theta_i / sum_i w_i`` (``normalize=False``: ``sum_i w_i theta_i``).
    Default weights are all 1 (the uniform soup). For independently trained models align first
    (``align="weight"``, Ainsworth et al. 2023), else the average of unaligned units is poor.
    """

    Params = AverageParams

    def plan(self, states: Sequence[Mapping[str, Tensor]], params: AverageParams,  # type: ignore[override]
             inputs: MergeInputs) -> TensorPlan:
        w = inputs.weight_list(len(states))
        combine = weighted_mean if params.normalize else weighted_sum
        return TensorPlan(lambda k, ts, rows: combine(ts, w), w, elementwise=True)
