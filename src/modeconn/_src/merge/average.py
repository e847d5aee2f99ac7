"""Weighted averaging of state dicts (the uniform model soup)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydantic import Field
from torch import Tensor

from .base import (
    MergeInputs,
    MergeMethod,
    Params,
    State,
    merge_per_tensor,
    weighted_mean,
    weighted_sum,
)


class AverageParams(Params):
    """Parameters of :class:`AverageMerge`."""

    normalize: bool = Field(True, description="divide by the sum of the weights")


class AverageMerge(MergeMethod):
    """Weighted average of the models, the uniform soup (Wortsman et al., ICML 2022).

    ``theta* = sum_i w_i theta_i / sum_i w_i`` (``normalize=False``: ``sum_i w_i theta_i``).
    Default weights are all 1 (the uniform soup). For independently trained models align first
    (``align="weight"``, Ainsworth et al. 2023), else the average of unaligned units is poor.
    """

    Params = AverageParams

    def run(self, states: Sequence[Mapping[str, Tensor]], params: AverageParams,
            inputs: MergeInputs) -> State:
        w = inputs.weight_list(len(states))
        combine = weighted_mean if params.normalize else weighted_sum
        return merge_per_tensor(states, w, lambda k, ts: combine(ts, w))
