"""DELLA (Deep et al., 2024): magnitude-ranked random drops, sign election, disjoint fusion."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import Tensor

from .base import MergeInputs, compute_dtype
from .task_arithmetic import TaskArithmeticParams, disjoint_merge
from .tensorwise import Rows, TensorPlan, TensorwiseMerge


class DellaParams(TaskArithmeticParams):
    """Parameters of :class:`DellaMerge`."""

    density: float = Field(0.5, gt=0.0, le=1.0,
                           description="mean keep probability of a task-vector entry (1 - p)")
    epsilon: float = Field(0.1, ge=0.0, lt=1.0,
                           description="keep probabilities span density ± epsilon by rank")
    seed: int = Field(0, description="seed of the drop masks (a private generator per model)")

    @model_validator(mode="after")
    def _fits(self) -> DellaParams:
        if self.density < 1.0 and not 0.0 < self.density - self.epsilon <= \
                self.density + self.epsilon <= 1.0:
            raise ValueError(
                f"density ± epsilon must lie in (0, 1], got {self.density} ± {self.epsilon}"
            )
        return self


def magprune(tau: Tensor, density: float, epsilon: float, generator: torch.Generator) -> Tensor:
    """DELLA's MAGPRUNE: drop entries with probabilities set by their magnitude rank, rescale.

    Within each row (the first axis; a 1-D tensor is one row) the entries are ranked by
    ``|tau|``; the normalised rank ``r in [0, 1]`` (0: smallest) gives the keep probability
    ``k = density - epsilon + 2·epsilon·r`` (drop probability ``p = 1 - k``); a kept entry is
    divided by ``k`` (``1 / (1 - p)``, so the expectation is ``tau``). A single-entry row keeps
    with ``density``. ``density = 1``: unchanged. The mask is drawn on the CPU from
    ``generator``. (mergekit's ``della_magprune`` ranks and draws the same way; its survivors are
    rescaled by a norm ratio, or not at all, where the paper, and this function, divide by ``k``.)

    Args:
        tau: a task vector's tensor.
        density: mean keep probability (``1 - p``).
        epsilon: half-width of the keep probabilities' range.
        generator: the CPU generator of the drops.

    Returns:
        The pruned and rescaled tensor (``tau``'s shape, dtype and device).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> magprune(torch.tensor([1.0, -2.0]), 1.0, 0.0, g).tolist()
        [1.0, -2.0]
    """
    if density >= 1.0:
        return tau.clone()
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau.reshape(tau.shape[0], -1)
    m = rows.shape[1]
    ranks = rows.detach().abs().float().cpu().argsort(dim=1, stable=True).argsort(dim=1)
    r = ranks.to(torch.float64) / (m - 1) if m > 1 else torch.full(ranks.shape, 0.5,
                                                                   dtype=torch.float64)
    keep_p = density - epsilon + 2 * epsilon * r
    keep = torch.rand(keep_p.shape, generator=generator, dtype=torch.float64) < keep_p
    scaled = rows / keep_p.to(rows.device, rows.dtype)
    out = torch.where(keep.to(rows.device), scaled, torch.zeros_like(rows))
    return out.reshape(tau.shape)


class DellaMerge(TensorwiseMerge):
    """DELLA-Merging (Deep, Bhardwaj & Akbik, "DELLA-Merging: Reducing Interference in Model
    Merging through Magnitude-Based Sampling", 2024).

    Per tensor: **drop** (:func:`magprune` on each ``tau_i = theta_i - theta_base``: keep
    probability ``density ± epsilon`` by magnitude rank within a row, survivors divided by it),
    **elect** (``gamma = sign(sum_i w_i tau_i)``) and **fuse** (the disjoint mean over the agreeing
    models, as TIES), then ``theta = theta_base + scale * tau`` (``scale`` is the paper's
    ``lambda``; ``normalize=False``: the agreeing sum). ``density = 1`` is TIES without trimming.
    Needs ``base``; model ``i`` gets the ``i``-th drop mask (seeded).
    """

    Params = DellaParams
    needs_base = True

    def plan(self, states: Sequence[Mapping[str, Tensor]], params: Any,
             inputs: MergeInputs) -> TensorPlan:
        """The per-tensor plan (``mc.merge`` and ``mc.merge_files`` run it alike; the masks
        follow the state's key order)."""
        assert inputs.base is not None
        base = inputs.base
        w = inputs.weight_list(len(states))
        normalize = True if params.normalize is None else params.normalize
        gens = [torch.Generator().manual_seed(params.seed * 100_003 + i)
                for i in range(len(states))]

        def combine(key: str, ts: list[Tensor], rows: Rows) -> Tensor:
            dt = compute_dtype(ts[0])
            b = base[key].to(dt)
            taus = [magprune(t.to(dt) - b, params.density, params.epsilon, g)
                    for t, g in zip(ts, gens, strict=True)]
            return b + params.scale * disjoint_merge(taus, w, normalize)

        stat_w = [abs(x) for x in w] if any(w) else [1.0] * len(w)
        return TensorPlan(combine, stat_w)
