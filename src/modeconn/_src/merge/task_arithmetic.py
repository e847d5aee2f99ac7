"""Generalized task arithmetic: task arithmetic, TIES and DARE as configurations of one merge.

Each fine-tuned model gives a task vector ``tau_i = theta_i - theta_base``. One pipeline (after
mergekit's ``GeneralizedTaskArithmeticMerge``, per tensor):

1. sparsify each ``tau_i``: none (task arithmetic), keep the top-``density`` fraction of
   magnitudes (TIES "trim"), or drop each entry with probability ``p`` and rescale the survivors
   by ``1 / (1 - p)`` (DARE);
2. weight: ``tau_i <- w_i tau_i``;
3. combine: the sum (``normalize=True``: divided by ``sum_i w_i``), or with sign consensus (TIES
   "elect sign" ``gamma = sign(sum_i tau_i)``, then the "disjoint mean" over the entries whose
   sign agrees with ``gamma``; ``normalize=False`` gives their sum instead);
4. ``theta = theta_base + scale * tau``.

By default (``normalize=None``) each method follows its paper: task arithmetic and DARE sum the
task vectors (Ilharco et al.'s ``theta_base + lambda sum_i tau_i``, ``lambda`` = ``scale``), TIES
and DARE with ``consensus=True`` take the disjoint mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, cast

import torch
from pydantic import Field
from torch import Tensor

from .base import (
    MergeInputs,
    MergeMethod,
    Params,
    Reference,
    State,
    compute_dtype,
    is_statistic,
    merge_per_tensor,
    normalized,
)

Sparsify = Literal["none", "magnitude", "random"]


class TaskArithmeticParams(Params):
    """Parameters of task arithmetic."""

    scale: float = Field(1.0, description="lambda, the coefficient of the merged task vector")
    normalize: bool | None = Field(
        None,
        description=(
            "divide the (agreeing) task vectors' weighted sum by their total weight; None: the "
            "paper's form (a sum for task arithmetic/DARE, the disjoint mean for TIES)"
        ),
    )


class TiesParams(TaskArithmeticParams):
    """Parameters of TIES-merging."""

    density: float = Field(
        0.2, gt=0.0, le=1.0, description="fraction k of each task vector's entries kept (top |.|)"
    )
    trim: Literal["tensor", "model"] = Field(
        "tensor",
        description=(
            "trim each tensor of a task vector to its top-k (mergekit) or the whole task vector "
            "at once (the TIES paper's code)"
        ),
    )


class DareParams(TaskArithmeticParams):
    """Parameters of DARE."""

    p: float = Field(0.5, ge=0.0, lt=1.0, description="probability of dropping a delta entry")
    seed: int = Field(0, description="seed of the drop masks (a private generator)")
    consensus: bool = Field(
        False, description="then TIES sign election + disjoint mean (DARE-TIES) instead of a sum"
    )


def trim_magnitude(tau: Tensor, density: float) -> Tensor:
    """TIES "trim": keep the ``ceil(density * n)`` largest-magnitude entries, zero the rest.

    Ties at the threshold are broken by ``torch.topk`` (exactly ``k`` entries survive).

    Example:
        >>> trim_magnitude(torch.tensor([0.1, -3.0, 2.0, -0.5]), 0.5).tolist()
        [0.0, -3.0, 2.0, 0.0]
    """
    n = tau.numel()
    k = max(1, int(torch.tensor(density * n).ceil().item())) if n else 0
    if k >= n:
        return tau.clone()
    flat = tau.flatten()
    keep = torch.zeros(n, dtype=torch.bool, device=tau.device)
    keep[flat.abs().topk(k).indices] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).view_as(tau)


def magnitude_threshold(taus: Sequence[Tensor], density: float) -> float:
    """The ``ceil(density * n)``-th largest ``|tau|`` over all the tensors together (TIES trim of
    a whole task vector, as in the TIES code's ``topk_values_mask``); 0 for no entries.

    Example:
        >>> magnitude_threshold([torch.tensor([0.1, -3.0]), torch.tensor([2.0, -0.5])], 0.5)
        2.0
    """
    flat = torch.cat([t.detach().reshape(-1).abs().float().cpu() for t in taus])
    n = flat.numel()
    if n == 0:
        return 0.0
    k = max(1, int(torch.tensor(density * n).ceil().item()))
    if k >= n:
        return 0.0
    return float(flat.kthvalue(n - k + 1).values)


def drop_and_rescale(tau: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """DARE: zero each entry with probability ``p``, multiply the survivors by ``1 / (1 - p)``.

    The mask is drawn on the CPU from ``generator`` (the same seed gives the same mask on any
    device). ``p = 0`` returns ``tau`` unchanged.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> drop_and_rescale(torch.ones(4), 0.0, g).tolist()
        [1.0, 1.0, 1.0, 1.0]
    """
    if p == 0:
        return tau.clone()
    keep = torch.rand(tau.shape, generator=generator) >= p
    return torch.where(keep.to(tau.device), tau / (1.0 - p), torch.zeros_like(tau))


def disjoint_merge(
    taus: Sequence[Tensor], weights: Sequence[float] | None = None, normalize: bool = True
) -> Tensor:
    """TIES "elect sign" + "disjoint merge" of task vectors ``tau_i`` with weights ``w_i``.

    ``gamma = sign(sum_i w_i tau_i)``; entry-wise the agreeing set is ``A = {i : sign(w_i tau_i)
    = gamma}`` (zeros never agree); the result is ``sum_{i in A} w_i tau_i / sum_{i in A} w_i``
    (``normalize=False``: the plain sum over ``A``); entries with an empty ``A`` are 0.

    Args:
        taus: task vectors of one tensor, one per model (same shape).
        weights: per-model weights (default all 1: the mean over agreeing models).
        normalize: divide by the agreeing models' total weight.

    Returns:
        The merged task vector.

    Example:
        >>> disjoint_merge([torch.tensor([1.0, -2.0]), torch.tensor([3.0, 1.0])]).tolist()
        [2.0, -2.0]
    """
    w = [1.0] * len(taus) if weights is None else [float(x) for x in weights]
    stacked = torch.stack([wi * t for wi, t in zip(w, taus, strict=True)])
    gamma = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == gamma) & (stacked != 0)
    total = torch.where(agree, stacked, torch.zeros_like(stacked)).sum(0)
    if not normalize:
        return total
    wt = torch.tensor(w, dtype=stacked.dtype, device=stacked.device)
    wt = wt.view(-1, *([1] * (stacked.dim() - 1))).expand_as(stacked)
    denom = torch.where(agree, wt, torch.zeros_like(stacked)).sum(0)
    safe = torch.where(denom != 0, denom, torch.ones_like(denom))
    return torch.where(denom != 0, total / safe, torch.zeros_like(total))


class GeneralizedTaskArithmetic(MergeMethod):
    """Task arithmetic (Ilharco et al., ICLR 2023), TIES (Yadav et al., NeurIPS 2023), DARE
    (Yu et al., ICML 2024): one implementation, configured per variant.

    With task vectors ``tau_i = theta_i - theta_base`` and weights ``w_i``:

    - task arithmetic: ``theta = theta_base + scale * sum_i w_i tau_i / Z`` with ``Z = 1`` by
      default (Ilharco's ``theta_base + lambda sum_i tau_i``, ``lambda`` = ``scale``) and
      ``Z = sum_i w_i`` with ``normalize=True`` (the mean task vector);
    - TIES: ``tau_i`` trimmed to its top-``density`` magnitudes (``trim="tensor"``, the default:
      per tensor, as mergekit does; ``trim="model"``: over the whole task vector, as the TIES
      code does: entries with ``|tau| >=`` the model-wide threshold survive),
      ``gamma = sign(sum_i w_i tau_i)``, then the disjoint mean
      ``sum_{i in A} w_i tau_i / sum_{i in A} w_i`` over the agreeing models ``A``,
      ``theta = theta_base + scale * tau``;
    - DARE: each entry of ``tau_i`` dropped with probability ``p``, the rest scaled by
      ``1 / (1 - p)`` (seeded), then task arithmetic, or TIES' sign consensus with
      ``consensus=True``. ``p = 0`` is task arithmetic.

    ``normalize`` (default ``None``: each paper's form) divides by the (agreeing) total weight;
    ``normalize=True`` turns task arithmetic into ``theta_base + scale * mean_i tau_i``.
    BatchNorm running statistics are the mean of the models' (weighted by ``|w_i|``).

    Example:
        >>> base = {"w": torch.zeros(2)}
        >>> fts = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([1.0, 2.0])}]
        >>> mc.merge(fts, method="task_arithmetic", base=base, scale=0.5)["w"].tolist()
        [1.0, 1.0]
        >>> mc.merge(fts, method="task_arithmetic", base=base, normalize=True)["w"].tolist()
        [1.0, 1.0]

    Needs ``base``. Fine-tuned copies of one pretrained model share its unit order, so alignment
    is usually unnecessary here.
    """

    needs_base = True

    def __init__(self, name: str, reference: Reference, *, params: type[Params],
                 sparsify: Sparsify, consensus: bool,
                 identity_params: Mapping[str, Any] | None = None, summary: str = "") -> None:
        super().__init__(name, reference, identity_params=identity_params, summary=summary)
        self.Params = params  # type: ignore[misc]  # a per-instance parameter model
        self.sparsify = sparsify
        self.consensus = consensus

    def run(self, states: Sequence[Mapping[str, Tensor]], params: TaskArithmeticParams,
            inputs: MergeInputs) -> State:
        assert inputs.base is not None
        base = inputs.base
        w = inputs.weight_list(len(states))
        consensus = self.consensus or bool(getattr(params, "consensus", False))
        normalize = consensus if params.normalize is None else params.normalize
        inputs.info["normalize"] = normalize
        density = float(getattr(params, "density", 1.0))
        p = float(getattr(params, "p", 0.0))
        seed = int(getattr(params, "seed", 0))
        gens = [torch.Generator().manual_seed(seed * 100_003 + i) for i in range(len(states))]
        coef = normalized(w) if normalize and not consensus else w
        thresholds: list[float] | None = None
        if self.sparsify == "magnitude" and getattr(params, "trim", "tensor") == "model":
            keys = [k for k, t in states[0].items() if t.is_floating_point()
                    and not is_statistic(k)]
            thresholds = [
                magnitude_threshold([s[k].to(compute_dtype(s[k])) - base[k] for k in keys],
                                    density)
                for s in states
            ]

        def combine(key: str, ts: list[Tensor]) -> Tensor:
            dt = compute_dtype(ts[0])
            b = base[key].to(dt)
            taus = [t.to(dt) - b for t in ts]
            if thresholds is not None:  # TIES step 1, model-wide: keep |tau| >= threshold
                taus = [torch.where(t.abs() >= th, t, torch.zeros_like(t))
                        for t, th in zip(taus, thresholds, strict=True)]
            elif self.sparsify == "magnitude":  # TIES step 1: trim
                taus = [trim_magnitude(t, density) for t in taus]
            elif self.sparsify == "random":  # DARE: drop and rescale
                taus = [drop_and_rescale(t, p, g) for t, g in zip(taus, gens, strict=True)]
            if consensus:  # TIES steps 2-3: elect sign, disjoint merge
                tau = disjoint_merge(taus, w, normalize)
            else:
                tau = cast(Tensor, sum(c * t for c, t in zip(coef, taus, strict=True)))  # n >= 1
            return b + params.scale * tau

        # Statistics are averaged with |w_i| (task negation, w_i < 0, must not negate a variance).
        stat_w = [abs(x) for x in w] if any(w) else [1.0] * len(w)
        return merge_per_tensor(states, stat_w, combine)
