"""Fisher merging: a Fisher-weighted average of models, diagonal Fishers streamed from data."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..errors import DataError
from ..evaluation import DataLike, model_device, resolve_device
from ..progress import progress_bar
from .base import (
    MergeInputs,
    MergeMethod,
    Params,
    State,
    compute_dtype,
    examples,
    merge_per_tensor,
    n_batches,
)


class FisherParams(Params):
    """Parameters of :class:`FisherMerge`."""

    fisher: Literal["exact", "empirical"] = Field(
        "exact", description="exact: sum over labels weighted by p(y|x); empirical: the true label"
    )
    floor: float = Field(1e-6, ge=0.0, description="lower bound on every Fisher entry")
    normalize: bool = Field(False, description="divide each model's Fisher by its global L2 norm")
    n_examples: int | None = Field(None, gt=0, description="use only the first n examples")
    batch_size: int = Field(64, gt=0, description="batch size for a Dataset/tuple")


def diagonal_fisher(
    model: nn.Module,
    data: DataLike,
    *,
    state: Mapping[str, Tensor] | None = None,
    fisher: str = "exact",
    n_examples: int | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> State:
    """Diagonal Fisher information of a classifier's parameters (Matena & Raffel, NeurIPS 2022).

    exact:      ``F = 1/n sum_x sum_y p(y|x) (d/dtheta log p(y|x))^2``
    empirical:  ``F = 1/n sum_(x, y) (d/dtheta log p(y|x))^2`` with the data's labels.

    Per-example gradients come from ``torch.func`` (``vmap`` of ``grad`` over (example, label)
    rows, about 2**24 gradient numbers at a time; model in eval mode, so BatchNorm uses its
    running statistics); models ``vmap`` cannot handle fall back to one backward pass per row.
    Computed in float32 (float64 for float64 models).

    Args:
        model: the network (not modified).
        data: DataLoader, Dataset or ``(inputs, targets)``.
        state: use these weights instead of the model's own.
        fisher: ``"exact"`` or ``"empirical"``.
        n_examples: use only the first ``n_examples`` examples.
        batch_size: batch size for a Dataset/tuple.
        device: where to compute (default: the model's device).
        progress: draw a progress bar.

    Returns:
        ``{parameter name: Fisher diagonal}`` (same shapes as the parameters, on CPU).

    Example:
        >>> net = nn.Linear(3, 2)
        >>> f = diagonal_fisher(net, (torch.randn(16, 3), torch.zeros(16, dtype=torch.long)))
        >>> sorted(f), bool((f["weight"] >= 0).all())
        (['bias', 'weight'], True)
    """
    dev = resolve_device(device) if device is not None else model_device(model)
    net = copy.deepcopy(model).to(dev).eval()
    full = dict(net.state_dict())
    if state is not None:
        full.update(state)
    names = [k for k, _ in net.named_parameters()]
    dt = compute_dtype(full[names[0]]) if names else torch.float32
    params = {k: full[k].detach().to(dev, dt) for k in names}
    buffers = {k: full[k].detach().to(dev) for k, _ in net.named_buffers()}
    total = {k: torch.zeros_like(v) for k, v in params.items()}

    def log_probs(p: dict[str, Tensor], x: Tensor) -> Tensor:
        out = torch.func.functional_call(net, (p, buffers), (x,))
        return F.log_softmax(out.to(dt), dim=-1)

    def one_logp(p: dict[str, Tensor], x: Tensor, onehot: Tensor) -> Tensor:
        return (log_probs(p, x.unsqueeze(0)).squeeze(0) * onehot).sum()

    # rows of per-example gradients held at once: about 2**24 numbers (64 MB in float32)
    chunk = max(1, 2**24 // max(1, sum(v.numel() for v in params.values())))
    n = 0
    with progress_bar(progress, total=n_batches(data, batch_size, n_examples),
                      description="Fisher") as advance:
        for x, y in examples(data, batch_size, n_examples):
            x, y = x.to(dev), y.to(dev)
            with torch.no_grad():
                probs = log_probs(params, x).exp()
            n_classes = probs.shape[-1]
            if fisher == "empirical":
                xs, onehots = x, F.one_hot(y.long(), n_classes).to(dt)
                coef = torch.ones(len(x), dtype=dt, device=dev)
            else:  # one (example, label) pair per row, weighted by p(label | example)
                xs = x.repeat_interleave(n_classes, 0)
                onehots = torch.eye(n_classes, dtype=dt, device=dev).repeat(len(x), 1)
                coef = probs.reshape(-1)
            for s in range(0, len(xs), chunk):
                grads = _per_example_grads(one_logp, params, xs[s : s + chunk],
                                           onehots[s : s + chunk])
                for k, g in grads.items():
                    total[k] += torch.tensordot(coef[s : s + chunk], g.pow(2), dims=1)
            n += len(x)
            advance(None)
    if n == 0:
        raise DataError("Fisher merging needs data: the data gave no examples")
    return {k: (v / n).cpu() for k, v in total.items()}


def _per_example_grads(
    fn: Any, params: dict[str, Tensor], x: Tensor, onehot: Tensor
) -> dict[str, Tensor]:
    """``d fn(params, x_b, onehot_b) / d params`` for every example ``b`` (stacked on axis 0)."""
    try:
        return torch.func.vmap(torch.func.grad(fn), in_dims=(None, 0, 0))(params, x, onehot)
    except (RuntimeError, NotImplementedError, ValueError):
        # Some modules (in-place ops, data-dependent control flow) do not vmap: go one by one.
        outs = []
        for b in range(len(x)):
            p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            g = torch.autograd.grad(fn(p, x[b], onehot[b]), list(p.values()), allow_unused=True)
            outs.append({k: torch.zeros_like(v) if gi is None else gi
                         for (k, v), gi in zip(p.items(), g, strict=True)})
        return {k: torch.stack([o[k] for o in outs]) for k in params}


def fisher_weighted_average(
    states: Sequence[Mapping[str, Tensor]],
    fishers: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float] | None = None,
    *,
    floor: float = 1e-6,
    normalize: bool = False,
) -> State:
    """``theta* = sum_i w_i F_i theta_i / sum_i w_i F_i`` entry-wise (Matena & Raffel 2022).

    Every Fisher entry is first floored, ``F_i <- max(F_i, floor)`` (with ``normalize``, each
    ``F_i`` is first divided by its global L2 norm). Tensors without a Fisher (buffers) and
    BatchNorm statistics get the weighted mean; non-floating tensors come from model 0.

    Args:
        states: the models' state dicts.
        fishers: one ``{parameter: diagonal Fisher}`` per model.
        weights: per-model coefficients ``lambda_i`` (default all 1).
        floor: lower bound on Fisher entries.
        normalize: normalise each model's Fisher to unit global norm.

    Returns:
        The merged state dict.

    Example:
        >>> s = [{"w": torch.tensor([0.0])}, {"w": torch.tensor([1.0])}]
        >>> f = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}]
        >>> fisher_weighted_average(s, f)["w"].tolist()
        [0.75]
    """
    w = [1.0] * len(states) if weights is None else [float(x) for x in weights]
    scales = [1.0] * len(states)
    if normalize:
        scales = [1.0 / max(math.sqrt(float(sum(f.double().pow(2).sum() for f in fi.values()))),
                            1e-30) for fi in fishers]

    def combine(key: str, ts: list[Tensor]) -> Tensor:
        dt = compute_dtype(ts[0])
        if key not in fishers[0]:
            num = cast(Tensor, sum(wi * t.to(dt) for wi, t in zip(w, ts, strict=True)))  # n >= 1
            return num / sum(w)
        num = torch.zeros_like(ts[0], dtype=dt)
        den = torch.zeros_like(ts[0], dtype=dt)
        for wi, si, t, fi in zip(w, scales, ts, fishers, strict=True):
            f = (fi[key].to(ts[0].device, dt) * si).clamp(min=floor) * wi
            num += f * t.to(dt)
            den += f
        return num / den

    return merge_per_tensor(states, w, combine)


class FisherMerge(MergeMethod):
    """Fisher merging (Matena & Raffel, "Merging Models with Fisher-Weighted Averaging",
    NeurIPS 2022).

    ``theta* = sum_i lambda_i F_i theta_i / sum_i lambda_i F_i`` entry-wise with each model's
    diagonal Fisher ``F_i = E_x sum_y p(y|x) (grad log p(y|x))^2`` (``fisher="exact"``) or with
    the data's labels (``"empirical"``), floored at ``floor`` (1e-6). ``lambda_i`` are the merge
    weights. Needs ``model`` and ``data`` (one source for all, or a list with each model's own).
    """

    Params = FisherParams
    needs_data = True

    def run(self, states: Sequence[Mapping[str, Tensor]], params: FisherParams,
            inputs: MergeInputs) -> State:
        assert inputs.model is not None
        fishers = []
        for i, s in enumerate(states):
            fishers.append(diagonal_fisher(
                inputs.model, inputs.data_for(i), state=s, fisher=params.fisher,
                n_examples=params.n_examples, batch_size=params.batch_size,
                device=inputs.device, progress=inputs.progress,
            ))
        inputs.info["fisher_mean"] = [
            float(sum(f.sum() for f in fi.values()) / max(1, sum(f.numel() for f in fi.values())))
            for fi in fishers
        ]
        return fisher_weighted_average(
            states, fishers, inputs.weight_list(len(states)),
            floor=params.floor, normalize=params.normalize,
        )
