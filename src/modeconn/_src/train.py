"""Deterministic supervised training of a copy of a model (SGD/Adam, schedules, optional PGD)."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .adversarial import PGDConfig, _pgd, robust_evaluate
from .errors import ConfigError, NonFiniteError
from .evaluation import DataLike, as_loader, evaluate, model_device, resolve_device
from .progress import progress_bar

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "constant", "step")


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
    if name == "sgd":
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
    progress: bool = True,
) -> TrainResult:
    """Train a deep copy of ``model`` with cross-entropy; the given model is left untouched.

    Minimises ``mean CE(f(x), y)`` by minibatch SGD (momentum) or Adam/AdamW with weight decay.
    The learning rate follows ``schedule``: cosine ``lr * (1 + cos(pi * s / S)) / 2`` per step,
    constant, or step (x0.1 at 50% and 75%). With ``adversarial`` it is PGD adversarial training
    (Madry et al., ICLR 2018): each batch is replaced by PGD-ℓ∞ examples crafted on the current
    weights (model in eval mode while crafting, so BN statistics see only the training batch).

    Deterministic on CPU: the same ``seed`` (and the same number of torch threads) gives
    bit-identical weights (torch's RNG is forked and seeded; shuffling uses a private
    generator). The global RNG state is left unchanged.

    Args:
        model: the network (not modified).
        data: DataLoader, Dataset, ``(inputs, targets)`` or a :class:`modeconn.data.Splits`
            (then ``test_data`` defaults to its test split).
        epochs: passes over the data.
        lr: peak learning rate.
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        momentum: SGD momentum.
        weight_decay: L2 penalty (decoupled for adamw).
        batch_size: minibatch size (for a Dataset/tuple).
        schedule: ``"cosine"``, ``"constant"`` or ``"step"``.
        seed: seed of initial-state randomness (dropout, PGD starts) and shuffling.
        device: where to train (default: the model's device).
        test_data: evaluated at the end (and its metrics stored).
        adversarial: a :class:`PGDConfig` or dict ``{eps, step, steps}`` for PGD training.
        grad_clip: clip the global gradient norm to this value.
        progress: show a progress bar.

    Returns:
        :class:`TrainResult` with the trained copy, final metrics and per-epoch history.

    Example:
        >>> x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
        >>> r = train(nn.Linear(4, 2), (x, y), epochs=2, progress=False)
        >>> sorted(r.metrics)[:2]
        ['time_s', 'train_accuracy']
    """
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if epochs < 0 or lr <= 0 or batch_size < 1:
        raise ConfigError(
            f"need epochs >= 0, lr > 0, batch_size >= 1 (got {epochs}, {lr}, {batch_size})"
        )
    pgd = PGDConfig.coerce(adversarial) if adversarial is not None else None
    train_data, test_data = _split_data(data, test_data)
    dev = resolve_device(device) if device is not None else model_device(model)

    net = copy.deepcopy(model).to(dev)
    loader = as_loader(train_data, batch_size=batch_size, shuffle=True, seed=seed)
    total_steps = max(epochs * len(loader), 1)
    config = {
        "epochs": epochs, "lr": lr, "optimizer": optimizer, "momentum": momentum,
        "weight_decay": weight_decay, "batch_size": batch_size, "schedule": schedule, "seed": seed,
        "adversarial": pgd.model_dump() if pgd else None, "grad_clip": grad_clip,
    }  # fmt: skip
    history: list[dict[str, float]] = []
    start = time.perf_counter()

    cuda_ids = (
        [dev.index if dev.index is not None else torch.cuda.current_device()]
        if (dev.type == "cuda")
        else []
    )
    with torch.random.fork_rng(devices=cuda_ids):
        torch.manual_seed(seed)
        attack_gen = torch.Generator().manual_seed(seed + 1)
        opt = _optimizer(optimizer, net.parameters(), lr, momentum, weight_decay)
        step = 0
        with progress_bar(progress, total=epochs, description="training") as advance:
            for epoch in range(epochs):
                net.train()
                loss_sum, correct, n = 0.0, 0, 0
                for x, y in loader:
                    x, y = x.to(dev), y.to(dev)
                    if pgd is not None:
                        net.eval()
                        x = _pgd(net, x, y, pgd, attack_gen)
                        net.train()
                    for g in opt.param_groups:
                        g["lr"] = lr * _lr_factor(schedule, step, total_steps)
                    out = net(x)
                    loss = F.cross_entropy(out, y)
                    if not torch.isfinite(loss):
                        raise DivergedError(
                            f"training diverged at epoch {epoch + 1} "
                            f"(loss {float(loss.detach())}); lower the learning rate"
                        )
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if grad_clip is not None:
                        nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
                    opt.step()
                    step += 1
                    loss_sum += float(loss.detach()) * len(y)
                    correct += int((out.argmax(-1) == y).sum())
                    n += len(y)
                history.append({
                    "epoch": epoch + 1, "lr": opt.param_groups[0]["lr"],
                    "loss": loss_sum / max(n, 1), "accuracy": correct / max(n, 1),
                })  # fmt: skip
                advance(f"epoch {epoch + 1}/{epochs} loss {loss_sum / max(n, 1):.3f}")

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
