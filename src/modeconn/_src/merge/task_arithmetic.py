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

import hashlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, cast

import torch
from pydantic import Field
from torch import Tensor

from ..lazy import read_rows, tensor_meta
from .base import MergeInputs, Params, Reference, compute_dtype, is_statistic, normalized
from .tensorwise import Rows, TensorPlan, TensorwiseMerge, blocks_of, kth_smallest_abs

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
            "trim each tensor of a task vector to its top-k (mergekit's form) or the whole task "
            "vector at once, with the TIES code's count and zero-sign rule"
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
    """TIES "trim" of one tensor, as mergekit counts: keep the entries with ``|tau| >=`` the
    ``k``-th largest magnitude, ``k = max(1, int(density * n))``, zero the rest.

    mergekit keeps exactly ``k`` entries (``argsort``); here ties at the threshold all survive
    (the TIES code's ``>=`` rule), which makes the trim elementwise once the threshold is known.

    Example:
        >>> trim_magnitude(torch.tensor([0.1, -3.0, 2.0, -0.5]), 0.5).tolist()
        [0.0, -3.0, 2.0, 0.0]
    """
    n = tau.numel()
    k = max(1, int(density * n))
    if n == 0 or k >= n:
        return tau.clone()
    th = kth_smallest_abs(lambda: [tau], n - k + 1, compute_dtype(tau))
    return torch.where(tau.abs() >= th, tau, torch.zeros_like(tau))


def magnitude_threshold(taus: Sequence[Tensor], density: float) -> float:
    """The TIES code's model-wide trim threshold (``topk_values_mask``): with ``n`` entries over
    all the tensors together and ``k = int(density * n)`` (not rounded up), the
    ``(n - k)``-th smallest ``|tau|``; entries with ``|tau| >=`` it are kept (``k + 1`` of them
    without ties, as in the reference). 0 (keep all) when ``k = n`` or there are no entries.
    Computed in float64 when a tensor is float64, else float32, by a streaming selection.

    Example:
        >>> magnitude_threshold([torch.tensor([0.1, -3.0]), torch.tensor([2.0, -0.5])], 0.5)
        0.5
    """
    n = sum(t.numel() for t in taus)
    dt = torch.float64 if any(t.dtype == torch.float64 for t in taus) else torch.float32
    k = int(density * n)
    if n == 0 or k >= n:
        return 0.0
    return float(kth_smallest_abs(lambda: taus, n - k, dt))


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
    taus: Sequence[Tensor], weights: Sequence[float] | None = None, normalize: bool = True,
    zero_sign: float | None = None,
) -> Tensor:
    """TIES "elect sign" + "disjoint merge" of task vectors ``tau_i`` with weights ``w_i``.

    ``gamma = sign(sum_i w_i tau_i)``; entry-wise the agreeing set is ``A = {i : sign(w_i tau_i)
    = gamma}`` (zeros never agree); the result is ``sum_{i in A} w_i tau_i / sum_{i in A} w_i``
    (``normalize=False``: the plain sum over ``A``); entries with an empty ``A`` are 0.

    ``zero_sign=None``: an entry whose sum is exactly 0 elects no sign (result 0; mergekit 0.1.5
    elects ``+`` there).
    ``zero_sign=s`` (the TIES code's ``resolve_zero_signs(..., "majority")``, ``s`` the sign of
    the sum of all elected signs): such entries get ``gamma = s``, and, as in the reference's
    ``torch.where(gamma > 0, tau > 0, tau < 0)``, a ``gamma`` still 0 selects the negative
    entries.

    Args:
        taus: task vectors of one tensor, one per model (same shape).
        weights: per-model weights (default all 1: the mean over agreeing models).
        normalize: divide by the agreeing models' total weight.
        zero_sign: how exact-zero sums are resolved (see above).

    Returns:
        The merged task vector.

    Example:
        >>> disjoint_merge([torch.tensor([1.0, -2.0]), torch.tensor([3.0, 1.0])]).tolist()
        [2.0, -2.0]
    """
    w = [1.0] * len(taus) if weights is None else [float(x) for x in weights]
    stacked = torch.stack([wi * t for wi, t in zip(w, taus, strict=True)])
    gamma = torch.sign(stacked.sum(0))
    if zero_sign is None:
        agree = (torch.sign(stacked) == gamma) & (stacked != 0)
    else:
        gamma = torch.where(gamma == 0, torch.full_like(gamma, float(zero_sign)), gamma)
        agree = torch.where(gamma > 0, stacked > 0, stacked < 0)
    total = stacked.masked_fill_(~agree, 0).sum(0)
    if not normalize:
        return total
    denom = torch.zeros_like(total)
    for wi, a in zip(w, agree, strict=True):
        denom.add_(a.to(denom.dtype), alpha=wi)
    zero = denom == 0
    return (total / denom.masked_fill_(zero, 1)).masked_fill_(zero, 0)


class GeneralizedTaskArithmetic(TensorwiseMerge):
    """Task arithmetic (Ilharco et al., ICLR 2023), TIES (Yadav et al., NeurIPS 2023), DARE
    (Yu et al., ICML 2024): one implementation, configured per variant.

    With task vectors ``tau_i = theta_i - theta_base`` and weights ``w_i``:

    - task arithmetic: ``theta = theta_base + scale * sum_i w_i tau_i / Z`` with ``Z = 1`` by
      default (Ilharco's ``theta_base + lambda sum_i tau_i``, ``lambda`` = ``scale``) and
      ``Z = sum_i w_i`` with ``normalize=True`` (the mean task vector);
    - TIES: ``tau_i`` trimmed to its top-``density`` magnitudes, ``gamma = sign(sum_i w_i
      tau_i)``, then the disjoint mean ``sum_{i in A} w_i tau_i / sum_{i in A} w_i`` over the
      agreeing models ``A``, ``theta = theta_base + scale * tau``. ``trim="tensor"`` (default,
      mergekit's form): per tensor, ``|tau| >=`` its ``max(1, int(density n))``-th largest
      magnitude survives, an exact-zero sum elects no sign. ``trim="model"`` (the TIES code,
      ``ties_merging`` in github.com/prateeky2806/ties-merging): one threshold over the whole task
      vector, the ``(n - int(density n))``-th smallest ``|tau|`` (so ``int(density n) + 1``
      entries survive without ties, not ``ceil``), found exactly by a streaming selection in the
      state's dtype (float64 stays float64); exact-zero sums take the majority sign (the sign of
      the sum of all elected signs), as the reference's ``resolve_zero_signs`` does;
    - DARE: each entry of ``tau_i`` dropped with probability ``p``, the rest scaled by
      ``1 / (1 - p)`` (the DARE paper's rescale; mergekit 0.1.5's ``dare_*`` instead rescale
      each tensor to keep its L1 norm, ``rescale_norm=l1``), then task arithmetic, or TIES' sign
      consensus with ``consensus=True``. ``p = 0`` is task arithmetic. Masks are drawn per (model,
      tensor, row block) from generators seeded by ``seed`` (not torch's global RNG), so a
      streamed merge draws the same masks as an in-memory one.

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

    def plan(self, states: Sequence[Mapping[str, Tensor]],  # type: ignore[override]
             params: TaskArithmeticParams, inputs: MergeInputs) -> TensorPlan:
        assert inputs.base is not None
        base = inputs.base
        w = inputs.weight_list(len(states))
        consensus = self.consensus or bool(getattr(params, "consensus", False))
        normalize = consensus if params.normalize is None else params.normalize
        inputs.info["normalize"] = normalize
        density = float(getattr(params, "density", 1.0))
        p = float(getattr(params, "p", 0.0))
        seed = int(getattr(params, "seed", 0))
        coef = normalized(w) if normalize and not consensus else w
        trim = self.sparsify == "magnitude" and density < 1.0
        model_wide = trim and getattr(params, "trim", "tensor") == "model"
        zero_sign: float | None = None
        per_key: dict[str, list[Tensor]] = {}  # trim thresholds of the current tensor
        model_th: list[Tensor] = []

        def taus_of(key: str, ts: Sequence[Tensor], rows: Rows) -> list[Tensor]:
            dt = compute_dtype(ts[0])
            b = (base[key] if rows is None else read_rows(base, key, *rows)).to(dt)
            return [t.to(dt) - b for t in ts]

        def trimmed(key: str, taus: list[Tensor]) -> list[Tensor]:
            ths = model_th if model_wide else per_key[key]
            return [t.masked_fill(t.abs() < th, 0) for t, th in zip(taus, ths, strict=True)]

        def tau_blocks(i: int, keys: Sequence[str]) -> Callable[[], Iterator[Tensor]]:
            def gen() -> Iterator[Tensor]:
                for key in keys:
                    for rows, x in blocks_of(states[i], key):
                        yield taus_of(key, [x], rows)[0]
            return gen

        if model_wide:  # the TIES code: one threshold per task vector, one majority sign
            keys = [k for k in states[0] if _is_weight(states[0], k)]
            n = sum(math.prod(tensor_meta(states[0], k)[0]) for k in keys)
            dt = (torch.float64 if any(tensor_meta(states[0], k)[1] == torch.float64
                                       for k in keys) else torch.float32)
            k_keep = int(density * n)
            model_th = [kth_smallest_abs(tau_blocks(i, keys), n - k_keep, dt)
                        if n - k_keep > 0 else torch.zeros((), dtype=dt)
                        for i in range(len(states))]
            total = 0
            for key in keys:
                for rows, _ in blocks_of(states[0], key):
                    ts = [read_rows(s, key, *rows) for s in states]
                    elected = torch.sign(sum(wi * t for wi, t in  # type: ignore[arg-type]
                                             zip(w, trimmed(key, taus_of(key, ts, rows)),
                                                 strict=True)))
                    total += int(elected.sum())
            zero_sign = float((total > 0) - (total < 0))
            inputs.info["ties_thresholds"] = [float(t) for t in model_th]

        def combine(key: str, ts: list[Tensor], rows: Rows) -> Tensor:
            taus = taus_of(key, ts, rows)
            if trim and not model_wide and (rows is None or rows[0] == 0):
                n = math.prod(tensor_meta(states[0], key)[0])
                k = max(1, int(density * n))
                per_key.clear()
                per_key[key] = [
                    kth_smallest_abs(tau_blocks(i, [key]), n - k + 1, taus[0].dtype)
                    if k < n else torch.zeros((), dtype=taus[0].dtype)
                    for i in range(len(states))
                ]
            if trim:  # TIES step 1: trim
                taus = trimmed(key, taus)
            elif self.sparsify == "random":  # DARE: drop and rescale
                taus = [drop_and_rescale(t, p, _generator(seed, i, key, rows))
                        for i, t in enumerate(taus)]
            if consensus:  # TIES steps 2-3: elect sign, disjoint merge
                tau = disjoint_merge(taus, w, normalize, zero_sign)
            else:
                tau = cast(Tensor, sum(c * t for c, t in zip(coef, taus, strict=True)))  # n >= 1
            b = (base[key] if rows is None else read_rows(base, key, *rows)).to(tau.dtype)
            return b + params.scale * tau

        # Statistics are averaged with |w_i| (task negation, w_i < 0, must not negate a variance).
        stat_w = [abs(x) for x in w] if any(w) else [1.0] * len(w)
        return TensorPlan(combine, stat_w, elementwise=True)


def _is_weight(state: Mapping[str, Tensor], key: str) -> bool:
    return tensor_meta(state, key)[1].is_floating_point and not is_statistic(key)


def _generator(seed: int, i: int, key: str, rows: Rows) -> torch.Generator:
    """The DARE mask generator of model ``i``'s rows ``rows`` of tensor ``key`` (one seed per
    block, so a block's mask does not depend on which other blocks were drawn before)."""
    digest = hashlib.blake2b(f"{seed}/{i}/{key}/{rows[0] if rows else 0}".encode(),
                             digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
