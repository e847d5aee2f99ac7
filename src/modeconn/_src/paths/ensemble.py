"""Ensembles from weight space: points on a learned curve, and fast geometric ensembling (FGE).

Both come from Garipov et al. (NeurIPS 2018), "Loss Surfaces, Mode Connectivity, and Fast
Ensembling of DNNs": the prediction of an ensemble of networks ``θ_1 … θ_K`` is the average of
their softmax outputs, ``p̄(y|x) = (1/K) Σ_k softmax(f(x; θ_k))_y``.

- :func:`curve_ensemble`: the members are points ``θ(t_k)`` of a learned curve (BatchNorm
  statistics recomputed for each point).
- :func:`fge`: the members are snapshots of one network trained on with a cyclic learning rate,
  taken at each cycle's learning-rate minimum.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, DataError
from ..evaluation import (
    DataLike,
    StateRunner,
    as_loader,
    cache_batches,
    model_device,
    resolve_device,
)
from ..progress import progress_bar
from ..state import check_compatible
from .base import Path
from .evaluate import path_point

State = dict[str, Tensor]

__all__ = ["EnsembleResult", "curve_ensemble", "evaluate_ensemble", "fge", "fge_lr"]


@dataclass(frozen=True)
class EnsembleResult:
    """Accuracy and loss of an ensemble (averaged softmax) and of each member.

    Attributes:
        accuracy: accuracy of ``argmax p̄(y|x)``.
        loss: negative log-likelihood ``−mean log p̄(y|x)`` of the averaged probabilities.
        member_accuracies: accuracy of each member alone.
        member_losses: cross-entropy of each member alone.
        ts: the curve positions of the members (:func:`curve_ensemble`), else ``None``.
    """

    accuracy: float
    loss: float
    member_accuracies: list[float]
    member_losses: list[float] = field(default_factory=list)
    ts: list[float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "loss": self.loss,
            "member_accuracies": list(self.member_accuracies),
            "member_losses": list(self.member_losses),
            "ts": None if self.ts is None else list(self.ts),
        }


@torch.no_grad()
def evaluate_ensemble(
    model: nn.Module,
    states: Iterable[Mapping[str, Tensor]],
    data: DataLike,
    *,
    bn_data: DataLike | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 1024,
) -> EnsembleResult:
    """Evaluate the ensemble averaging the softmax outputs of ``model`` holding each state.

    ``p̄(y|x) = (1/K) Σ_k softmax(f(x; θ_k))_y``; accuracy of ``argmax p̄`` and NLL
    ``−mean log p̄(y|x)``. With BatchNorm layers and ``bn_data``, each member's running statistics
    are recomputed (``mc.reset_bn``) first. The data are read once, so a shuffling DataLoader is
    fine; the members may be a generator (one state alive at a time).

    Args:
        model: the architecture (not modified).
        states: the members' state dicts (at least one; any iterable).
        data: evaluation data.
        bn_data: data for BatchNorm statistics (typically the training set), or ``None``.
        device: where to run (default: the model's device).
        batch_size: for a Dataset/tuple.

    Returns:
        :class:`EnsembleResult`.

    Example:
        >>> m = nn.Linear(3, 2); x, y = torch.randn(8, 3), torch.zeros(8, dtype=torch.long)
        >>> r = evaluate_ensemble(m, [m.state_dict(), m.state_dict()], (x, y))
        >>> len(r.member_accuracies)
        2
    """
    run = StateRunner(model, device=device, bn_data=bn_data, batch_size=batch_size)
    batches = cache_batches(data, run.device, batch_size)
    prob_sum: list[Tensor] = []

    def collect(i: int, out: Tensor, y: Tensor) -> None:
        p = out.double().softmax(-1)
        if i < len(prob_sum):
            prob_sum[i] += p
        else:
            prob_sum.append(p)

    member_acc, member_loss = [], []
    first: Mapping[str, Tensor] | None = None
    for k, state in enumerate(states):  # one member alive at a time
        first = state if first is None else first
        check_compatible([first, state], ["member 0", f"member {k}"])
        m = run(state, batches, on_output=collect)
        member_acc.append(m.accuracy)
        member_loss.append(m.loss)
    if first is None:
        raise ConfigError("an ensemble needs at least one member state")
    correct, nll, n = 0, 0.0, 0
    for (_, y), ps in zip(batches, prob_sum, strict=True):
        p = ps / len(member_acc)
        correct += int((p.argmax(-1) == y).sum())
        nll += float(-p.gather(1, y.view(-1, 1)).clamp_min(1e-12).log().sum())
        n += len(y)
    return EnsembleResult(correct / n, nll / n, member_acc, member_loss)


def curve_ensemble(
    model: nn.Module,
    path: Any,
    data: DataLike,
    *,
    ts: int | Sequence[float] = 5,
    bn_data: DataLike | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 1024,
) -> EnsembleResult:
    """Ensemble of points on a curve (Garipov et al. 2018): average the softmax of ``θ(t_k)``.

    ``p̄(y|x) = (1/K) Σ_k softmax(f(x; θ(t_k)))_y``. BatchNorm statistics are recomputed at every
    point when ``bn_data`` is given (running statistics are meaningless along a curve).

    Args:
        model: the architecture (not modified).
        path: a path (``mc.LinearPath``, ``mc.BezierCurve``, ``mc.PolyChain`` or anything with
            ``.state(t)``).
        data: evaluation data.
        ts: number of evenly spaced points in ``[0, 1]`` (endpoints included), or the ``t`` values.
        bn_data: data for BatchNorm statistics, or ``None``.
        device: where to run.
        batch_size: for a Dataset/tuple.

    Returns:
        :class:`EnsembleResult` (``.ts`` lists the members' positions).

    Example:
        >>> import modeconn as mc
        >>> m = nn.Linear(3, 2); x, y = torch.randn(8, 3), torch.zeros(8, dtype=torch.long)
        >>> path = mc.LinearPath(m.state_dict(), m.state_dict())
        >>> curve_ensemble(m, path, (x, y), ts=3).ts
        [0.0, 0.5, 1.0]
    """
    if isinstance(ts, int):
        if ts < 1:
            raise ConfigError(f"ts must be >= 1, got {ts}")
        grid = [0.5] if ts == 1 else torch.linspace(0, 1, ts, dtype=torch.float64).tolist()
    else:
        grid = [float(t) for t in ts]
        if not grid or any(not 0.0 <= t <= 1.0 for t in grid):
            raise ConfigError("ts must be a non-empty list of values in [0, 1]")
    # built one at a time as the ensemble runs (endpoints as they are)
    states = (
        (path_point(path, t)[0] for t in grid)
        if isinstance(path, Path)
        else (path.state(t) for t in grid)
    )
    res = evaluate_ensemble(
        model, states, data, bn_data=bn_data, device=device, batch_size=batch_size
    )
    return EnsembleResult(res.accuracy, res.loss, res.member_accuracies, res.member_losses, grid)


def fge_lr(step: int, steps_per_cycle: int, lr_max: float, lr_min: float) -> float:
    """The triangular cyclic learning rate of FGE at iteration ``step``.

    Within a cycle, with ``s = (step mod c)/c`` (``c`` iterations per cycle), the rate rises
    linearly from ``lr_min`` at ``s = 0`` to ``lr_max`` at ``s = ½`` and falls back; the last
    iteration of each cycle runs at (nearly) ``lr_min``, where the snapshot is taken. This is
    Garipov et al.'s piecewise-linear schedule (α1 = ``lr_max``, α2 = ``lr_min``) shifted by half
    a cycle so that training starts gently from the trained model.

    Example:
        >>> [round(fge_lr(i, 4, 1.0, 0.0), 2) for i in range(5)]
        [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    s = (step % steps_per_cycle) / steps_per_cycle
    return lr_min + (lr_max - lr_min) * (1.0 - abs(2.0 * s - 1.0))


def fge(
    model: nn.Module,
    data: DataLike,
    *,
    cycles: int = 4,
    cycle_epochs: int = 2,
    lr_max: float = 0.05,
    lr_min: float = 5e-4,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 128,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> list[State]:
    """Fast geometric ensembling (Garipov et al., NeurIPS 2018): snapshots along a cyclic LR.

    Starting from a trained model, train on with SGD and the triangular cyclic learning rate of
    :func:`fge_lr` (``cycle_epochs`` epochs per cycle, per-iteration updates); at the end of each
    cycle, where the rate is at its minimum ``lr_min``, snapshot the weights. The ensemble
    averages the snapshots' softmax outputs (:func:`evaluate_ensemble`).

    Args:
        model: a trained network (not modified; a copy is trained).
        data: training data; a Dataset/tuple is shuffled with a generator seeded by ``seed``.
        cycles: number of cycles = number of snapshots.
        cycle_epochs: epochs per cycle.
        lr_max, lr_min: the cyclic learning-rate range (Garipov's α1, α2).
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        batch_size: for a Dataset/tuple.
        seed: seeds the data order and ``torch`` RNG (dropout) inside a forked RNG.
        device: where to train (default: the model's device).
        progress: show a progress bar.

    Returns:
        ``cycles`` state dicts (new tensors), in the order they were taken.

    Example:
        >>> snaps = fge(model, train, cycles=4, cycle_epochs=2)  # doctest: +SKIP
        >>> evaluate_ensemble(model, snaps, test).accuracy  # doctest: +SKIP
    """
    if cycles < 1 or cycle_epochs < 1:
        raise ConfigError(
            f"fge needs cycles >= 1 and cycle_epochs >= 1, got {cycles} and {cycle_epochs}"
        )
    if not 0 < lr_min <= lr_max:
        raise ConfigError(f"fge needs 0 < lr_min <= lr_max, got lr_min={lr_min}, lr_max={lr_max}")
    dev = resolve_device(device) if device is not None else model_device(model)
    net = copy.deepcopy(model).to(dev)
    net.train()
    loader = as_loader(data, batch_size=batch_size, shuffle=True, seed=seed)
    per_epoch = len(loader)
    if per_epoch == 0:
        raise DataError("cannot run FGE on an empty dataset")
    steps_per_cycle = per_epoch * cycle_epochs
    opt = torch.optim.SGD(net.parameters(), lr=lr_min, momentum=momentum, weight_decay=weight_decay)
    snapshots: list[State] = []
    step = 0
    with (
        progress_bar(progress, total=cycles * steps_per_cycle, description="FGE") as advance,
        torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []),
    ):
        torch.manual_seed(seed)
        for cycle in range(cycles):
            for _epoch in range(cycle_epochs):
                for x, y in loader:
                    # the rate at the end of this iteration (the cycle's last one runs at lr_min)
                    lr = fge_lr(step + 1, steps_per_cycle, lr_max, lr_min)
                    for g in opt.param_groups:
                        g["lr"] = lr
                    x, y = x.to(dev), y.to(dev)
                    loss = F.cross_entropy(net(x), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step += 1
                    advance(f"cycle {cycle + 1}/{cycles}")
            snapshots.append({k: v.detach().clone() for k, v in net.state_dict().items()})
    return snapshots
