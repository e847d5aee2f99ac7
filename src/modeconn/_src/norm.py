"""Normalisation repair after permuting or merging: exact BatchNorm statistics reset and REPAIR."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import ConfigError, DataError
from .evaluation import DataLike, as_loader, model_device, resolve_device, with_state
from .progress import progress_bar
from .state import check_compatible, check_finite

State = dict[str, Tensor]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


# --- streaming per-channel moments ----------------------------------------------------------------
class _Moments:
    """Per-channel count, mean and sum of squared deviations (Chan et al.'s merge, float64)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def update(self, x: Tensor, axis: int) -> None:
        """Add every entry of ``x`` to its channel (``axis`` is the channel axis)."""
        x = x.detach().movedim(axis, -1)
        x = x.reshape(-1, x.shape[-1]).double()
        k = x.shape[0]
        if k == 0:
            return
        mean = x.mean(0)
        m2 = ((x - mean) ** 2).sum(0)
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = k, mean, m2
            return
        n = self.n + k
        delta = mean - self.mean
        self.mean = self.mean + delta * (k / n)
        self.m2 = self.m2 + m2 + delta**2 * (self.n * k / n)
        self.n = n

    def var(self, unbiased: bool) -> Tensor:
        assert self.m2 is not None
        return self.m2 / max(self.n - 1 if unbiased else self.n, 1)


def _inputs(batch: Any) -> Any:
    """The model inputs of a batch (``(inputs, targets)`` pairs, or bare inputs)."""
    return batch[0] if isinstance(batch, list | tuple) else batch


def _batches(data: DataLike, max_batches: int | None, batch_size: int) -> Iterator[Any]:
    if max_batches is not None and max_batches < 1:
        raise ConfigError(f"max_batches must be >= 1 (or None for all data), got {max_batches}")
    for i, batch in enumerate(as_loader(data, batch_size=batch_size)):
        if max_batches is not None and i >= max_batches:
            return
        yield _inputs(batch)


def _to(x: Any, dev: torch.device) -> Any:
    return x.to(dev) if isinstance(x, Tensor) else x


# --- BatchNorm reset ------------------------------------------------------------------------------
def _tracking_bns(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]


def needs_bn_reset(model: nn.Module) -> bool:
    """Whether ``model`` has BatchNorm layers with running statistics (which go stale on merging).

    Args:
        model: any network.

    Returns:
        ``True`` if some ``BatchNorm*`` module tracks running statistics.

    Example:
        >>> needs_bn_reset(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
        True
        >>> needs_bn_reset(nn.Linear(3, 4))
        False
    """
    return bool(_tracking_bns(model))


def reset_bn(
    model: nn.Module,
    data: DataLike,
    *,
    max_batches: int | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 256,
) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are recomputed exactly on ``data``.

    The BN reset of Git Re-Basin (Ainsworth et al., ICLR 2023) and REPAIR (Jordan et al., ICLR
    2023), Garipov et al. 2018's ``update_bn``: a merged or interpolated network's running
    statistics describe neither endpoint, so they are recomputed. Forward passes run under
    ``no_grad`` with every BatchNorm in train mode (it normalises with batch statistics, as during
    training) and every other module in eval mode (no dropout). The input ``x`` of each BN is
    accumulated over the whole data (float64, per channel ``c``; batch, time and spatial axes
    pooled), and the buffers are set to the exact dataset statistics

        running_mean_c = mean(x_c),    running_var_c = sum (x_c - mean(x_c))^2 / (n - 1)

    (unbiased, like PyTorch's running variance). This is PyTorch's cumulative average
    (``momentum=None``) made exact: that average weights batches equally and averages per-batch
    variances, which ignores the spread between batch means. Momentum values are left as they were;
    ``num_batches_tracked`` counts the batches seen. Models without tracking BatchNorm come back as
    a plain copy.

    Args:
        model: the network (not modified).
        data: DataLoader, Dataset or ``(inputs, targets)``; usually (part of) the training set.
        max_batches: use only the first ``max_batches`` batches (default: all).
        device: where to run (default: the model's device); the copy lives there.
        batch_size: batch size when ``data`` is a Dataset or tuple.

    Returns:
        A new module, in eval mode, with fresh BatchNorm statistics.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> fresh = reset_bn(net, (torch.randn(64, 3), torch.zeros(64, dtype=torch.long)))
        >>> fresh[1].running_mean.shape
        torch.Size([4])
    """
    dev = resolve_device(device) if device is not None else model_device(model)
    new = copy.deepcopy(model).to(dev)
    new.eval()
    bns = _tracking_bns(new)
    if not bns:
        return new
    moments = {name: _Moments() for name, _ in bns}
    hooks = []
    for name, bn in bns:
        bn.train()

        def hook(mod: nn.Module, args: tuple[Any, ...], m: _Moments = moments[name]) -> None:
            m.update(args[0], 1)

        hooks.append(bn.register_forward_pre_hook(hook))
    n_batches = 0
    try:
        with torch.no_grad():
            for x in _batches(data, max_batches, batch_size):
                if isinstance(x, Tensor) and x.shape[0] < 2:
                    continue  # train-mode BN cannot normalise a single example
                new(_to(x, dev))
                n_batches += 1
    finally:
        for h in hooks:
            h.remove()
    if n_batches == 0:
        raise DataError("reset_bn needs at least one batch of 2 or more examples; got no data")
    with torch.no_grad():
        for name, bn in bns:
            m = moments[name]
            if m.mean is None:  # not run by the forward pass (an unused branch): left as it is
                continue
            assert bn.running_mean is not None and bn.running_var is not None
            bn.running_mean.copy_(m.mean.to(bn.running_mean.dtype))
            bn.running_var.copy_(m.var(unbiased=True).to(bn.running_var.dtype))
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.fill_(n_batches)
    new.eval()
    return new


def reset_bn_state(
    model: nn.Module,
    state: Mapping[str, Tensor],
    data: DataLike,
    *,
    max_batches: int | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 256,
) -> State:
    """``state`` with its BatchNorm statistics recomputed on ``data`` (functional :func:`reset_bn`).

    Loads ``state`` into a copy of ``model``, resets its BatchNorm running statistics exactly
    (see :func:`reset_bn`; Ainsworth et al. 2023, Garipov et al. 2018) and returns the new state.
    For a path, call it on ``path.state(t)`` before evaluating each ``t``.

    Args:
        model: a network of the state's architecture (not modified).
        state: the weights (not modified).
        data: DataLoader, Dataset or ``(inputs, targets)``.
        max_batches: use only the first ``max_batches`` batches.
        device: where to run (default: the model's device).
        batch_size: batch size when ``data`` is a Dataset or tuple.

    Returns:
        A new state dict (a shallow copy of ``state`` if the model has no BatchNorm statistics).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> s = reset_bn_state(net, net.state_dict(), (torch.randn(64, 3), torch.zeros(64)))
        >>> int(s["1.num_batches_tracked"])
        1
    """
    if not needs_bn_reset(model):
        return dict(state)
    fresh = reset_bn(
        with_state(model, state), data, max_batches=max_batches, device=device,
        batch_size=batch_size,
    )
    return {k: v.detach() for k, v in fresh.state_dict().items()}


# --- REPAIR ---------------------------------------------------------------------------------------
class _Stop(Exception):
    """Raised by a hook to end a forward pass once the measured layer has run."""


def _channel_axis(mod: nn.Module) -> int:
    return 1 if isinstance(mod, _CONV) else -1


def _trace_layers(model: nn.Module, x: Any) -> tuple[list[str], set[str], set[str]]:
    """Run one forward pass; return (Linear/Conv layers in call order, layers feeding a BN,
    layers REPAIR must leave alone: those producing the output or called more than once)."""
    order: list[str] = []
    outputs: dict[str, Tensor] = {}
    calls: dict[str, int] = {}
    bn_inputs: list[Tensor] = []
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, *_CONV)):

            def fhook(m: nn.Module, args: Any, out: Any, name: str = name) -> None:
                calls[name] = calls.get(name, 0) + 1
                if name not in outputs:
                    order.append(name)
                if isinstance(out, Tensor):
                    outputs[name] = out

            hooks.append(mod.register_forward_hook(fhook))
        elif isinstance(mod, _BatchNorm):

            def phook(m: nn.Module, args: tuple[Any, ...]) -> None:
                bn_inputs.append(args[0])

            hooks.append(mod.register_forward_pre_hook(phook))
    try:
        with torch.no_grad():
            final = model(x)
    finally:
        for h in hooks:
            h.remove()
    feeds_bn = {n for n, o in outputs.items() if any(o is b for b in bn_inputs)}
    logits = {n for n, o in outputs.items() if o is final}
    executed = [n for n in order if n in outputs]
    if executed and isinstance(final, Tensor) and not logits:
        last = executed[-1]
        if outputs[last].numel() == final.numel():  # a reshape/squeeze after the head
            logits.add(last)
    shared = {n for n, c in calls.items() if c > 1}
    return executed, feeds_bn, logits | shared


def _layer_moments(
    model: nn.Module,
    names: Sequence[str],
    data: DataLike,
    dev: torch.device,
    max_batches: int | None,
    batch_size: int,
    stop_after: str | None = None,
) -> dict[str, _Moments]:
    """Per-unit moments of the outputs of the named Linear/Conv layers (model in eval mode)."""
    mods = dict(model.named_modules())
    moments = {n: _Moments() for n in names}
    hooks = []
    for n in names:

        def hook(m: nn.Module, args: Any, out: Tensor, n: str = n) -> None:
            moments[n].update(out, _channel_axis(m))
            if n == stop_after:
                raise _Stop

        hooks.append(mods[n].register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x in _batches(data, max_batches, batch_size):
                with contextlib.suppress(_Stop):
                    model(_to(x, dev))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if any(m.mean is None for m in moments.values()):
        raise DataError("repair needs data: the data gave no batches")
    return moments


def repair(
    model_a: nn.Module,
    model_b: nn.Module,
    model_merged: nn.Module,
    data: DataLike,
    *,
    alpha: float = 0.5,
    max_batches: int | None = None,
    device: str | torch.device | None = None,
    layers: Sequence[str] | None = None,
    eps: float = 1e-5,
    batch_size: int = 256,
    progress: bool = False,
) -> nn.Module:
    """REPAIR (Jordan, Sedghi, Saukh, Entezari & Neyshabur, "REPAIR: REnormalizing Permuted
    Activations for Interpolation Repair", ICLR 2023).

    Interpolating two aligned networks shrinks the variance of hidden units ("variance
    collapse"). REPAIR measures, on ``data``, the per-unit mean ``mu`` and standard deviation
    ``sigma`` of every Linear/Conv output (pre-activation; channels on axis 1 for convolutions,
    on the last axis for Linear layers, pooled over batch, tokens and positions) in A and B, and
    rescales each unit of the merged net so its statistics become the interpolated goal

        mu_goal = (1 - alpha) mu_A + alpha mu_B,
        sigma_goal = (1 - alpha) sigma_A + alpha sigma_B.

    The affine correction is folded into the layer: with the merged net's own statistics
    ``mu_M, sigma_M`` (measured with every earlier layer already corrected, so the layers are
    handled one at a time in forward order),

        s = sigma_goal / sqrt(sigma_M^2 + eps),
        W' = W * s[:, None, ...],    b' = (b - mu_M) * s + mu_goal.

    Skipped layers: those whose output feeds a BatchNorm (:func:`reset_bn` renormalises them: for a
    BN network REPAIR is a BN reset, which this function also does first, and again after each
    correction that moved the inputs of BatchNorm layers, so every layer is measured, and the
    result evaluated, with exact statistics), those producing
    the network's output (logits), and those called more than once per forward pass. A layer
    without bias only gets the rescaling (its mean then follows ``s * mu_M``). Attention
    projections (q, k, v, out) are corrected like any Linear; pass ``layers=`` to restrict.
    ``model_b`` must be the *aligned* B whose interpolation gave ``model_merged``.

    Args:
        model_a: endpoint A (not modified).
        model_b: endpoint B, already permuted onto A (not modified).
        model_merged: the interpolation ``(1 - alpha) A + alpha B`` (not modified).
        data: DataLoader, Dataset or ``(inputs, targets)``; usually (part of) the training set.
        alpha: the interpolation coefficient of ``model_merged``.
        max_batches: use only the first ``max_batches`` batches for every measurement.
        device: where to run (default: the merged model's device).
        layers: names of the Linear/Conv modules to correct (default: every eligible one).
        eps: added to ``sigma_M^2`` (as in BatchNorm), guards dead units.
        batch_size: batch size when ``data`` is a Dataset or tuple.
        progress: show a progress bar over layers.

    Returns:
        A corrected copy of ``model_merged`` (eval mode); ``model.modeconn_repaired`` lists the
        corrected layers.

    Example:
        >>> a = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> b = copy.deepcopy(a)
        >>> x, y = torch.randn(32, 3), torch.zeros(32, dtype=torch.long)
        >>> fixed = repair(a, b, a, (x, y))
        >>> torch.allclose(fixed(x), a(x), atol=1e-4)
        True
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
    names = ["model A", "model B", "merged model"]
    states = [model_a.state_dict(), model_b.state_dict(), model_merged.state_dict()]
    check_compatible(states, names)
    for state, name in zip(states, names, strict=True):
        check_finite(state, name)
    dev = resolve_device(device) if device is not None else model_device(model_merged)
    a = copy.deepcopy(model_a).to(dev).eval()
    b = copy.deepcopy(model_b).to(dev).eval()
    if needs_bn_reset(model_merged):
        merged = reset_bn(
            model_merged, data, max_batches=max_batches, device=dev, batch_size=batch_size
        )
    else:
        merged = copy.deepcopy(model_merged).to(dev).eval()

    first = next(_batches(data, 1, batch_size), None)
    if first is None:
        raise DataError("repair needs data: the data gave no batches")
    executed, feeds_bn, excluded = _trace_layers(merged, _to(first, dev))
    eligible = [n for n in executed if n not in feeds_bn and n not in excluded]
    if layers is not None:
        unknown = [n for n in layers if n not in executed]
        if unknown:
            raise ConfigError(
                f"repair: {unknown[0]!r} is not a Linear/Conv layer run by the model; "
                f"choose from {', '.join(executed)}"
            )
        eligible = [n for n in eligible if n in set(layers)]
    if not eligible:
        merged.modeconn_repaired = []  # type: ignore[assignment]
        return merged

    mom_a = _layer_moments(a, eligible, data, dev, max_batches, batch_size)
    mom_b = _layer_moments(b, eligible, data, dev, max_batches, batch_size)
    mods = dict(merged.named_modules())
    has_bn, stale = needs_bn_reset(merged), False
    with progress_bar(progress, total=len(eligible), description="REPAIR (layers)") as advance:
        for name in eligible:
            if stale:  # an earlier correction moved the inputs of BatchNorm layers: reset them
                merged = reset_bn(
                    merged, data, max_batches=max_batches, device=dev, batch_size=batch_size
                )
                mods, stale = dict(merged.named_modules()), False
            m = _layer_moments(merged, [name], data, dev, max_batches, batch_size, name)[name]
            ma, mb = mom_a[name], mom_b[name]
            assert m.mean is not None and ma.mean is not None and mb.mean is not None
            mu_goal = (1 - alpha) * ma.mean + alpha * mb.mean
            sd_goal = (1 - alpha) * ma.var(False).sqrt() + alpha * mb.var(False).sqrt()
            scale = sd_goal / (m.var(False) + eps).sqrt()
            layer = mods[name]
            with torch.no_grad():
                w = layer.weight
                shape = (-1,) + (1,) * (w.dim() - 1)
                w.copy_((w.double() * scale.view(shape)).to(w.dtype))
                if layer.bias is not None:
                    bias = layer.bias
                    bias.copy_(((bias.double() - m.mean) * scale + mu_goal).to(bias.dtype))
            stale = has_bn
            advance(name)
    if stale:
        merged = reset_bn(merged, data, max_batches=max_batches, device=dev, batch_size=batch_size)
    merged.modeconn_repaired = list(eligible)  # type: ignore[assignment]
    return merged
