"""RegMean: per Linear/Conv layer, the weights best reproducing every model's outputs."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

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
    examples,
    merge_per_tensor,
    n_batches,
    weighted_mean,
)


class RegMeanParams(Params):
    """Parameters of :class:`RegMeanMerge`."""

    alpha: float = Field(
        0.9, ge=0.0, le=1.0, description="scale of the Gram matrices' off-diagonal entries"
    )
    augment_bias: bool = Field(
        True, description="solve bias and weight jointly (inputs get a column of ones)"
    )
    ridge: float = Field(
        1e-7, ge=0.0, description="added to each Gram's diagonal, relative to its mean diagonal"
    )
    n_examples: int | None = Field(None, gt=0, description="use only the first n examples")
    batch_size: int = Field(256, gt=0, description="batch size for a Dataset/tuple")


def _key(module: str, name: str) -> str:
    return f"{module}.{name}" if module else name


def regmean_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers RegMean solves: ``nn.Linear``, and ``nn.Conv1d``/``nn.Conv2d`` with groups = 1.

    Example:
        >>> list(regmean_layers(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))))
        ['0', '2']
    """
    out: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) or (
            isinstance(mod, nn.Conv1d | nn.Conv2d) and mod.groups == 1
        ):
            out[name] = mod
    return out


def layer_inputs(mod: nn.Module, x: Tensor, augment: bool) -> Tensor:
    """The rows ``X`` with ``layer(x) = X W^T (+ b)``: features of a Linear, patches of a Conv.

    A Conv's input is padded as the layer pads it and unfolded into one row per output position
    (``C_in * k`` columns in the order of ``weight.reshape(C_out, -1)``). With ``augment`` a column
    of ones is appended (the bias). Float64.
    """
    if isinstance(mod, nn.Conv1d | nn.Conv2d):
        mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
        x = F.pad(x, mod._reversed_padding_repeated_twice, mode=mode)
        if isinstance(mod, nn.Conv1d):
            x = x.unsqueeze(2)
            k, d, s = (1, *mod.kernel_size), (1, *mod.dilation), (1, *mod.stride)
        else:
            k, d, s = mod.kernel_size, mod.dilation, mod.stride
        cols = F.unfold(x, k, dilation=d, stride=s)  # (N, C*k, L)
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        rows = x.reshape(-1, x.shape[-1])
    rows = rows.double()
    if augment:
        rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=rows.dtype, device=rows.device)], 1)
    return rows


@torch.no_grad()
def gram_matrices(
    model: nn.Module,
    data: DataLike,
    *,
    state: Mapping[str, Tensor] | None = None,
    augment_bias: bool = True,
    n_examples: int | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Mean Gram matrix ``G = X^T X / n`` of every RegMean layer's inputs, in one streaming pass.

    Forward pre-hooks on every Linear/Conv layer (:func:`regmean_layers`) accumulate ``X^T X`` in
    float64 batch by batch (``X`` from :func:`layer_inputs`; ``n`` its rows: examples x tokens /
    positions), so memory holds one ``d x d`` matrix per layer whatever the data size. Model in
    eval mode; a layer called several times accumulates all its calls.

    Args:
        model: the network (not modified).
        data: DataLoader, Dataset or ``(inputs, targets)``.
        state: use these weights instead of the model's own.
        augment_bias: append a ones column for layers with a bias.
        n_examples: use only the first ``n_examples`` examples.
        batch_size: batch size for a Dataset/tuple.
        device: where to run (default: the model's device).
        progress: draw a progress bar.

    Returns:
        ``{layer name: G}`` for every layer that ran (CPU, float64).

    Example:
        >>> g = gram_matrices(nn.Linear(3, 2), (torch.randn(8, 3), torch.zeros(8)))
        >>> g[""].shape
        torch.Size([4, 4])
    """
    dev = resolve_device(device) if device is not None else model_device(model)
    net = copy.deepcopy(model).to(dev).eval()
    if state is not None:
        net.load_state_dict({k: v.to(dev) for k, v in state.items()}, strict=True)
    layers = regmean_layers(net)
    sums: dict[str, Tensor] = {}
    rows: dict[str, int] = {}
    hooks = []
    for name, mod in layers.items():
        augment = augment_bias and getattr(mod, "bias", None) is not None

        def hook(
            m: nn.Module, args: tuple[Any, ...], name: str = name, augment: bool = augment
        ) -> None:
            X = layer_inputs(m, args[0], augment)
            sums[name] = sums.get(name, 0) + X.T @ X
            rows[name] = rows.get(name, 0) + len(X)

        hooks.append(mod.register_forward_pre_hook(hook))
    seen = 0
    try:
        with progress_bar(progress, total=n_batches(data, batch_size, n_examples),
                          description="RegMean Gram matrices") as advance:
            for x, _ in examples(data, batch_size, n_examples):
                net(x.to(dev))
                seen += len(x)
                advance(None)
    finally:
        for h in hooks:
            h.remove()
    if seen == 0:
        raise DataError("RegMean needs data: the data gave no examples")
    return {name: (g / rows[name]).cpu() for name, g in sums.items()}


def regmean_solve(
    weights: Sequence[Tensor],
    grams: Sequence[Tensor],
    coeffs: Sequence[float] | None = None,
    *,
    alpha: float = 1.0,
    ridge: float = 0.0,
) -> Tensor:
    """``W* = argmin_W sum_i c_i ||X_i W^T - X_i W_i^T||^2``, i.e. ``W*^T = (sum c_i G_i)^-1 sum c_i
    G_i W_i^T`` (Jin et al., ICLR 2023), with each ``G_i``'s off-diagonal entries scaled by
    ``alpha`` and ``ridge * mean(diag G_i)`` added to its diagonal.

    The ridge keeps the system solvable when no model's inputs touch a direction (a dead unit):
    there the result is the weighted mean of the ``W_i``. Float64.

    Args:
        weights: ``W_i`` of shape ``(out, d)`` (a flattened Conv weight, bias column appended).
        grams: ``G_i`` of shape ``(d, d)``.
        coeffs: per-model weights ``c_i`` (default all 1).
        alpha: off-diagonal scale.
        ridge: relative diagonal loading.

    Returns:
        ``W*`` of shape ``(out, d)``, float64.

    Example:
        >>> W = torch.randn(2, 3, dtype=torch.float64); G = torch.eye(3, dtype=torch.float64)
        >>> torch.allclose(regmean_solve([W, W], [G, 2 * G]), W)
        True
    """
    c = [1.0] * len(weights) if coeffs is None else [float(x) for x in coeffs]
    lhs = torch.zeros_like(grams[0], dtype=torch.float64)
    rhs = torch.zeros(grams[0].shape[0], weights[0].shape[0], dtype=torch.float64)
    for ci, W, G in zip(c, weights, grams, strict=True):
        G = G.double()
        diag = torch.diag(torch.diagonal(G))
        G = alpha * G + (1.0 - alpha) * diag
        G = G + ridge * float(torch.diagonal(G).mean()) * torch.eye(len(G), dtype=G.dtype)
        lhs += ci * G
        rhs += ci * (G @ W.double().T.cpu())
    return torch.linalg.solve(lhs, rhs).T


class RegMeanMerge(MergeMethod):
    """RegMean (Jin, Ren, Preotiuc-Pietro & Cheng, "Dataless Knowledge Fusion by Merging Weights
    of Language Models", ICLR 2023).

    For every Linear layer, and every Conv1d/Conv2d via its unfolded input patches, the merged
    weight minimises the distance to every model's outputs on that model's own layer inputs:

        W* = (sum_i c_i G~_i)^-1 sum_i c_i G~_i W_i,   G_i = X_i^T X_i / n_i,
        G~_i = alpha G_i + (1 - alpha) diag(G_i).

    Bias: with ``augment_bias`` (default) the inputs get a column of ones and ``[W | b]`` is
    solved jointly (exactly the least-squares fit of the outputs, bias included); otherwise
    biases are averaged, as in the original code. Every other tensor (embeddings, norms,
    attention's fused projections, layers that never ran) is the weighted mean. Needs ``model``
    and ``data`` (one source for all, or a list with each model's own, as in the paper); Gram
    matrices are streamed with forward hooks.
    """

    Params = RegMeanParams
    needs_data = True

    def run(self, states: Sequence[Mapping[str, Tensor]], params: RegMeanParams,
            inputs: MergeInputs) -> State:
        assert inputs.model is not None
        c = inputs.weight_list(len(states))
        grams = [
            gram_matrices(inputs.model, inputs.data_for(i), state=s,
                          augment_bias=params.augment_bias, n_examples=params.n_examples,
                          batch_size=params.batch_size, device=inputs.device,
                          progress=inputs.progress)
            for i, s in enumerate(states)
        ]
        solved: dict[str, Tensor] = {}
        done: list[str] = []
        for name, mod in regmean_layers(inputs.model).items():
            wkey, bkey = _key(name, "weight"), _key(name, "bias")
            if not all(name in g for g in grams) or wkey not in states[0]:
                continue  # never ran (or a tied weight): averaged below
            augment = params.augment_bias and getattr(mod, "bias", None) is not None
            Ws = []
            for s in states:
                W = s[wkey].reshape(s[wkey].shape[0], -1).double().cpu()
                if augment:
                    W = torch.cat([W, s[bkey].double().cpu().unsqueeze(1)], 1)
                Ws.append(W)
            W = regmean_solve(Ws, [g[name] for g in grams], c, alpha=params.alpha,
                              ridge=params.ridge)
            shape = states[0][wkey].shape
            solved[wkey] = W[:, : W.shape[1] - int(augment)].reshape(shape)
            if augment:
                solved[bkey] = W[:, -1]
            done.append(name)
        inputs.info["regmean_layers"] = done

        def combine(key: str, ts: list[Tensor]) -> Tensor:
            if key in solved:
                return solved[key].to(ts[0].device)
            return weighted_mean(ts, c)

        return merge_per_tensor(states, c, combine)
