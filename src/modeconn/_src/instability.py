"""Instability analysis: when does training become linearly connected? (Frankle et al. 2020)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .evaluation import DataLike, as_loader, model_device, resolve_device
from .paths.base import LinearPath
from .paths.evaluate import evaluate_path
from .progress import progress_bar
from .train import _check, _Loop, _optimizer, _rng_devices, _run_epochs, _split_data


@dataclass
class InstabilityResult:
    """What :func:`instability` returns (one entry per spawn epoch, in increasing order).

    Attributes:
        spawn: the spawn epochs k.
        barrier: loss barrier between the two children (test split when the data has one,
            modeconn's barrier convention).
        error_barrier: error barrier between the children (test split when the data has one).
        child_accuracy: the two children's accuracies on that split, per k.
        splits: ``{"loss": split, "error": split}`` the barriers were measured on.
        settings: the training settings.
        states: with ``keep_states=True``, the two children's state dicts per k (CPU).
    """

    spawn: list[int]
    barrier: list[float]
    error_barrier: list[float]
    child_accuracy: list[tuple[float, float]] = field(default_factory=list)
    splits: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    states: list[tuple[dict[str, Tensor], dict[str, Tensor]]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values.

        Example:
            >>> InstabilityResult([0], [0.5], [0.1]).to_dict()["barrier"]
            [0.5]
        """
        return {
            "spawn": self.spawn,
            "barrier": self.barrier,
            "error_barrier": self.error_barrier,
            "child_accuracy": [list(a) for a in self.child_accuracy],
            "splits": self.splits,
            "settings": self.settings,
        }


def instability(
    model: nn.Module,
    data: DataLike,
    *,
    spawn: Sequence[int] = (0, 1, 2),
    epochs: int = 10,
    seeds: tuple[int, int] = (0, 1),
    seed: int = 0,
    lr: float = 0.1,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 128,
    schedule: str = "cosine",
    sam_rho: float = 0.05,
    ts: int = 25,
    device: str | torch.device | None = None,
    keep_states: bool = False,
    progress: bool = True,
) -> InstabilityResult:
    """Instability analysis (Frankle et al., ICML 2020, "Linear Mode Connectivity and the
    Lottery Ticket Hypothesis").

    Train ``model`` once (seed ``seed``: data order and dropout) to each spawn epoch k; there,
    copy the network *and the optimiser state* twice and finish both copies to ``epochs`` with
    the same learning-rate schedule but different SGD noise (data order and dropout from
    ``seeds[0]`` and ``seeds[1]``). The instability at k is the barrier on the straight line
    between the two children, ``max_α [L(αθ_1 + (1−α)θ_2) − ((1−α) L(θ_2) + α L(θ_1))]``
    (:meth:`PathEvaluation.barrier`, at ``ts`` points; the paper subtracts the endpoints' mean,
    which is the same baseline at α = ½), for the loss and the error. "Stable" means an error
    barrier ≈ 0; networks become stable early in training. The parent is trained once up to
    ``max(spawn)``; the cost is ``max(spawn) + 2 Σ_k (epochs − k)`` epochs.

    Args:
        model: the initial network (not modified).
        data: training data, or a ``Splits`` (barriers on its test split).
        spawn: spawn epochs k, each in ``[0, epochs)``.
        epochs: total training epochs.
        seeds: the two children's seeds.
        seed: the parent's seed (epochs before k).
        lr: peak learning rate.
        optimizer: any :func:`modeconn.train` optimiser (``"sam"`` included).
        momentum: SGD momentum.
        weight_decay: weight decay.
        batch_size: minibatch size.
        schedule: learning-rate schedule over the whole run.
        sam_rho: SAM's ρ with ``optimizer="sam"``.
        ts: points evaluated on each line.
        device: where to train (default: the model's device).
        keep_states: also return the children's weights (``result.states``).
        progress: show a progress bar.

    Returns:
        :class:`InstabilityResult` (``.spawn``, ``.barrier``, ``.error_barrier``).

    Example:
        >>> x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
        >>> r = instability(nn.Linear(4, 2), (x, y), spawn=[0, 1], epochs=2, progress=False)
        >>> r.spawn, len(r.barrier)
        ([0, 1], 2)
    """
    _check(optimizer, schedule, epochs, lr, batch_size)
    ks = sorted({int(k) for k in spawn})
    if not ks or ks[0] < 0 or ks[-1] >= epochs:
        raise ConfigError(f"spawn epochs must lie in [0, {epochs}) (epochs={epochs}), got {spawn}")
    if len(seeds) != 2 or seeds[0] == seeds[1]:
        raise ConfigError(f"seeds must be two different seeds, got {seeds}")
    train_data, test_data = _split_data(data, None)
    dev = resolve_device(device) if device is not None else model_device(model)
    steps_per_epoch = len(as_loader(train_data, batch_size=batch_size))
    loop = _Loop(lr, schedule, max(epochs * steps_per_epoch, 1), optimizer, sam_rho)

    def run(net: nn.Module, opt: torch.optim.Optimizer, run_seed: int, first: int, last: int,
            loader: Any, advance: Any) -> None:  # fmt: skip
        with torch.random.fork_rng(devices=_rng_devices(dev)):
            torch.manual_seed(run_seed * 1_000_003 + first)
            _run_epochs(
                net, opt, loader, loop, first=first, last=last, dev=dev,
                attack_gen=torch.Generator(), history=[], advance=advance,
            )  # fmt: skip

    work = ks[-1] + 2 * sum(epochs - k for k in ks)
    children: list[tuple[dict[str, Tensor], dict[str, Tensor]]] = []
    with progress_bar(progress, total=work, description="instability") as advance:
        parent = copy.deepcopy(model).to(dev)
        popt = _optimizer(optimizer, parent.parameters(), lr, momentum, weight_decay)
        ploader = as_loader(train_data, batch_size=batch_size, shuffle=True, seed=seed)
        done = 0
        for k in ks:
            run(parent, popt, seed, done, k, ploader, advance)
            done = k
            pair = []
            for s in seeds:
                child = copy.deepcopy(parent)
                copt = _optimizer(optimizer, child.parameters(), lr, momentum, weight_decay)
                copt.load_state_dict(copy.deepcopy(popt.state_dict()))
                loader = as_loader(train_data, batch_size=batch_size, shuffle=True, seed=s)
                run(child, copt, s, k, epochs, loader, advance)
                pair.append({n: v.detach().cpu().clone() for n, v in child.state_dict().items()})
            children.append((pair[0], pair[1]))

    if test_data is not None:
        named = {"train": train_data, "test": test_data}
        loss_split, err_split = "test", "test"
    else:
        named, loss_split, err_split = {"data": train_data}, "data", "data"
    result = InstabilityResult([], [], [], splits={"loss": loss_split, "error": err_split})
    for k, (a, b) in zip(ks, children, strict=True):
        ev = evaluate_path(model, LinearPath(a, b), named, ts=ts, bn_data=train_data,
                           device=dev, progress=False)  # fmt: skip
        acc = ev.values("accuracy", err_split)
        result.spawn.append(k)
        result.barrier.append(ev.barrier("loss", loss_split))
        result.error_barrier.append(ev.barrier("error", err_split))
        result.child_accuracy.append((float(acc[0]), float(acc[-1])))
    result.settings = {
        "epochs": epochs, "seeds": list(seeds), "seed": seed, "lr": lr, "optimizer": optimizer,
        "momentum": momentum, "weight_decay": weight_decay, "batch_size": batch_size,
        "schedule": schedule, "ts": ts,
    }  # fmt: skip
    if keep_states:
        result.states = children
    return result
