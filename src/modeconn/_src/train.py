"""Deterministic supervised training of a copy of a model (SGD/Adam/SAM, schedules, PGD)."""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .adversarial import PGDConfig, _pgd, robust_evaluate
from .errors import ConfigError, NonFiniteError
from .evaluation import DataLike, as_loader, evaluate, model_device, resolve_device
from .progress import progress_bar

OPTIMIZERS = ("sgd", "adam", "adamw", "sam")
SCHEDULES = ("cosine", "constant", "step")
EpochCallback = Callable[[int, nn.Module], None]


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model: the trained copy (in eval mode).
        metrics: final ``train_loss``, ``train_accuracy`` and, with test data, ``test_loss``,
            ``test_accuracy`` (plus ``robust_test_*`` for adversarial training) and ``time_s``.
        history: one dict per epoch: ``epoch``, ``lr``, ``loss`` and ``accuracy`` (running means
            over that epoch's batches, in train mode).
        config: the training settings, for checkpoint metadata.
    """

    model: nn.Module
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)


class DivergedError(NonFiniteError):
    """Training produced a non-finite loss (the non-finite rule: a result, exit code 1)."""


def _split_data(data: Any, test_data: Any) -> tuple[Any, Any]:
    # Accept a modeconn Splits (train on .train, test on .test) without importing modeconn.data.
    if hasattr(data, "train") and hasattr(data, "test") and hasattr(data, "input_shape"):
        return data.train, test_data if test_data is not None else data.test
    return data, test_data


def _optimizer(
    name: str, params: Any, lr: float, momentum: float, wd: float
) -> torch.optim.Optimizer:
    if name in ("sgd", "sam"):  # SAM's base optimiser is SGD with momentum (Foret et al. 2021)
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


def _lr_factor(schedule: str, step: int, total: int) -> float:
    if schedule == "constant":
        return 1.0
    if schedule == "step":  # x0.1 at 50% and again at 75% of training
        return 0.1 ** ((step >= total * 0.5) + (step >= total * 0.75))
    return 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))


@contextlib.contextmanager
def _frozen_bn_stats(net: nn.Module) -> Iterator[None]:
    """Restore every BatchNorm buffer on exit (SAM's second pass must not update them)."""
    saved = [
        (m, {k: b.clone() for k, b in m.named_buffers(recurse=False) if b is not None})
        for m in net.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase)
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, bufs in saved:
                for k, b in bufs.items():
                    getattr(m, k).copy_(b)


def sam_gradient(
    net: nn.Module, loss_fn: Callable[[], Tensor], params: list[nn.Parameter], rho: float
) -> None:
    """Replace ``p.grad`` (holding ∇L(θ)) by SAM's gradient ∇L(θ + ε̂) (Foret et al., ICLR 2021).

    "Sharpness-Aware Minimization for Efficiently Improving Generalization":
    ``ε̂ = ρ · g / ‖g‖₂`` with ``g = ∇L(θ)`` (the global norm over all parameters), then the
    gradient is taken again at ``θ + ε̂`` and the weights are put back to ``θ``; the base
    optimiser's step from θ uses it (two forward/backward passes per step, as the authors'
    ``first_step``/``second_step``). BatchNorm statistics are not updated by the second pass.

    Args:
        net: the network (its parameters hold ∇L(θ) in ``.grad``).
        loss_fn: recomputes the minibatch loss with the current weights.
        params: the parameters to perturb.
        rho: neighbourhood radius ρ (the paper's default 0.05).

    Example:
        >>> net = nn.Linear(2, 2); x, y = torch.ones(1, 2), torch.tensor([0])
        >>> F.cross_entropy(net(x), y).backward()
        >>> sam_gradient(net, lambda: F.cross_entropy(net(x), y), list(net.parameters()), 0.05)
    """
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.norm(torch.stack([g.detach().norm(2) for g in grads]), 2) if grads else None
    if norm is None or float(norm) == 0.0:
        return  # a flat point: ε̂ = 0, the gradient is already ∇L(θ)
    scale = rho / (norm + 1e-12)
    eps: list[tuple[nn.Parameter, Tensor]] = []
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                e = p.grad * scale.to(p.grad)
                p.add_(e)
                eps.append((p, e))
    for p in params:
        p.grad = None
    with _frozen_bn_stats(net):
        loss_fn().backward()
    with torch.no_grad():
        for p, e in eps:
            p.sub_(e)


def _ce(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(net(x), y)


@dataclass
class _Loop:
    """The settings of one training loop (shared by :func:`train`, SWA and instability)."""

    lr: float
    schedule: str
    total_steps: int
    optimizer: str = "sgd"
    sam_rho: float = 0.05
    pgd: PGDConfig | None = None
    grad_clip: float | None = None


def _run_epochs(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    loader: DataLoader,
    loop: _Loop,
    *,
    first: int,
    last: int,
    dev: torch.device,
    attack_gen: torch.Generator,
    history: list[dict[str, float]],
    advance: Callable[[str | None], None],
    callback: EpochCallback | None = None,
) -> None:
    """Epochs ``first..last-1`` of training (step counter and lr continue from ``first``)."""
    params = [p for p in net.parameters() if p.requires_grad]
    step = first * len(loader)
    for epoch in range(first, last):
        net.train()
        loss_sum, correct, n = 0.0, 0, 0
        for x, y in loader:
            x, y = x.to(dev), y.to(dev)
            if loop.pgd is not None:
                net.eval()
                x = _pgd(net, x, y, loop.pgd, attack_gen)
                net.train()
            for g in opt.param_groups:
                g["lr"] = loop.lr * _lr_factor(loop.schedule, step, loop.total_steps)
            out = net(x)
            loss = F.cross_entropy(out, y)
            if not torch.isfinite(loss):
                raise DivergedError(
                    f"training diverged at epoch {epoch + 1} "
                    f"(loss {float(loss.detach())}); lower the learning rate"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if loop.optimizer == "sam":
                sam_gradient(net, functools.partial(_ce, net, x, y), params, loop.sam_rho)
            if loop.grad_clip is not None:
                nn.utils.clip_grad_norm_(params, loop.grad_clip)
            opt.step()
            step += 1
            loss_sum += float(loss.detach()) * len(y)
            correct += int((out.argmax(-1) == y).sum())
            n += len(y)
        history.append({
            "epoch": epoch + 1, "lr": opt.param_groups[0]["lr"],
            "loss": loss_sum / max(n, 1), "accuracy": correct / max(n, 1),
        })  # fmt: skip
        advance(f"epoch {epoch + 1}/{last} loss {loss_sum / max(n, 1):.3f}")
        if callback is not None:
            callback(epoch + 1, net)


def _check(optimizer: str, schedule: str, epochs: int, lr: float, batch_size: int) -> None:
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if epochs < 0 or lr <= 0 or batch_size < 1:
        raise ConfigError(
            f"need epochs >= 0, lr > 0, batch_size >= 1 (got {epochs}, {lr}, {batch_size})"
        )


def _rng_devices(dev: torch.device) -> list[int]:
    if dev.type != "cuda":
        return []
    return [dev.index if dev.index is not None else torch.cuda.current_device()]


def train(
    model: nn.Module,
    data: DataLike,
    *,
    epochs: int = 40,
    lr: float = 0.1,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 128,
    schedule: str = "cosine",
    seed: int = 0,
    device: str | torch.device | None = None,
    test_data: DataLike | None = None,
    adversarial: PGDConfig | Mapping[str, Any] | None = None,
    grad_clip: float | None = None,
    sam_rho: float = 0.05,
    callback: EpochCallback | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a deep copy of ``model`` with cross-entropy; the given model is left untouched.

    Minimises ``mean CE(f(x), y)`` by minibatch SGD (momentum) or Adam/AdamW with weight decay,
    or SAM (Foret et al., ICLR 2021): SGD steps with the gradient ``∇L(θ + ρ g/‖g‖₂)`` taken at
    the worst-case neighbour (see :func:`sam_gradient`). The learning rate follows ``schedule``:
    cosine ``lr * (1 + cos(pi * s / S)) / 2`` per step, constant, or step (x0.1 at 50% and 75%).
    With ``adversarial`` it is PGD adversarial training (Madry et al., ICLR 2018): each batch is
    replaced by PGD-ℓ∞ examples crafted on the current weights (model in eval mode while
    crafting, so BN statistics see only the training batch).

    Deterministic on CPU: the same ``seed`` (and the same number of torch threads) gives
    bit-identical weights (torch's RNG is forked and seeded; shuffling uses a private
    generator). The global RNG state is left unchanged.

    Args:
        model: the network (not modified).
        data: DataLoader, Dataset, ``(inputs, targets)`` or a :class:`modeconn.data.Splits`
            (then ``test_data`` defaults to its test split).
        epochs: passes over the data.
        lr: peak learning rate.
        optimizer: ``"sgd"``, ``"adam"``, ``"adamw"`` or ``"sam"`` (SGD with momentum as base).
        momentum: SGD momentum.
        weight_decay: L2 penalty (decoupled for adamw).
        batch_size: minibatch size (for a Dataset/tuple).
        schedule: ``"cosine"``, ``"constant"`` or ``"step"``.
        seed: seed of initial-state randomness (dropout, PGD starts) and shuffling.
        device: where to train (default: the model's device).
        test_data: evaluated at the end (and its metrics stored).
        adversarial: a :class:`PGDConfig` or dict ``{eps, step, steps}`` for PGD training.
        grad_clip: clip the global gradient norm to this value.
        sam_rho: SAM's neighbourhood radius ρ (with ``optimizer="sam"``).
        callback: ``(epoch, network)`` after every epoch (the network in train mode; e.g. SWA's
            running average). It must not change the network.
        progress: show a progress bar.

    Returns:
        :class:`TrainResult` with the trained copy, final metrics and per-epoch history.

    Example:
        >>> x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
        >>> r = train(nn.Linear(4, 2), (x, y), epochs=2, progress=False)
        >>> sorted(r.metrics)[:2]
        ['time_s', 'train_accuracy']
    """
    _check(optimizer, schedule, epochs, lr, batch_size)
    if optimizer == "sam" and not sam_rho > 0:
        raise ConfigError(f"sam_rho must be > 0 (the paper uses 0.05), got {sam_rho}")
    pgd = PGDConfig.coerce(adversarial) if adversarial is not None else None
    train_data, test_data = _split_data(data, test_data)
    dev = resolve_device(device) if device is not None else model_device(model)

    net = copy.deepcopy(model).to(dev)
    loader = as_loader(train_data, batch_size=batch_size, shuffle=True, seed=seed)
    loop = _Loop(
        lr, schedule, max(epochs * len(loader), 1), optimizer, sam_rho, pgd, grad_clip
    )
    config = {
        "epochs": epochs, "lr": lr, "optimizer": optimizer, "momentum": momentum,
        "weight_decay": weight_decay, "batch_size": batch_size, "schedule": schedule, "seed": seed,
        "adversarial": pgd.model_dump() if pgd else None, "grad_clip": grad_clip,
    }  # fmt: skip
    if optimizer == "sam":
        config["sam_rho"] = sam_rho
    history: list[dict[str, float]] = []
    start = time.perf_counter()

    with torch.random.fork_rng(devices=_rng_devices(dev)):
        torch.manual_seed(seed)
        attack_gen = torch.Generator().manual_seed(seed + 1)
        opt = _optimizer(optimizer, net.parameters(), lr, momentum, weight_decay)
        with progress_bar(progress, total=epochs, description="training") as advance:
            _run_epochs(
                net, opt, loader, loop, first=0, last=epochs, dev=dev, attack_gen=attack_gen,
                history=history, advance=advance, callback=callback,
            )  # fmt: skip

    net.eval()
    metrics: dict[str, float] = {}
    m = evaluate(net, loader.dataset)
    metrics["train_loss"], metrics["train_accuracy"] = m.loss, m.accuracy
    if test_data is not None:
        m = evaluate(net, test_data)
        metrics["test_loss"], metrics["test_accuracy"] = m.loss, m.accuracy
        if pgd is not None:
            r = robust_evaluate(net, test_data, pgd, seed=seed)
            metrics["robust_test_loss"], metrics["robust_test_accuracy"] = r.loss, r.accuracy
    metrics["time_s"] = time.perf_counter() - start
    return TrainResult(net, metrics, history, config)
