"""What every landscape view shares: evaluating a state, one runner per grid, flat vectors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import IncompatibleModelsError
from ..evaluation import Batches, DataLike, Metrics, StateRunner, cache_batches
from ..progress import progress_bar

State = dict[str, Tensor]


# --- shared helpers --------------------------------------------------------------------------
def evaluate_state(
    model: nn.Module,
    state: Mapping[str, Tensor],
    data: DataLike,
    *,
    bn_data: DataLike | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 1024,
) -> Metrics:
    """Loss and accuracy of ``model`` holding ``state``; BatchNorm statistics recomputed first.

    When the model has BatchNorm layers and ``bn_data`` is given, the running statistics are
    recomputed on ``bn_data`` with an exact cumulative average (``mc.reset_bn``) before evaluating;
    otherwise the state's own buffers are used.

    Args:
        model: the architecture (not modified).
        state: the weights to evaluate.
        data: evaluation data (DataLoader, Dataset or ``(inputs, targets)``).
        bn_data: data for the BatchNorm statistics (typically the training set), or ``None``.
        device: where to run (default: the model's device).
        batch_size: for a Dataset/tuple.

    Returns:
        :class:`~modeconn.Metrics`.

    Example:
        >>> m = nn.Linear(3, 2); x, y = torch.randn(8, 3), torch.zeros(8, dtype=torch.long)
        >>> evaluate_state(m, m.state_dict(), (x, y)).n
        8
    """
    run = StateRunner(model, device=device, bn_data=bn_data, batch_size=batch_size)
    return run(state, data)


def _runner(
    model: nn.Module,
    data: DataLike,
    bn_data: DataLike | None,
    device: str | torch.device | None,
    batch_size: int,
) -> tuple[StateRunner, Batches]:
    """One runner and the data read once, for a grid of states."""
    run = StateRunner(model, device=device, bn_data=bn_data, batch_size=batch_size)
    return run, cache_batches(data, run.device, batch_size)


def _param_names(model: nn.Module, state: Mapping[str, Tensor]) -> list[str]:
    names = [n for n, _ in model.named_parameters() if n in state and state[n].is_floating_point()]
    if not names:
        raise IncompatibleModelsError("the state has no floating-point parameters of the model")
    return names


def _flat(state: Mapping[str, Tensor], names: Sequence[str]) -> Tensor:
    return torch.cat([state[n].detach().reshape(-1).to("cpu", torch.float64) for n in names])


def _progress(iterable: Any, total: int, description: str, enabled: bool) -> Any:
    with progress_bar(enabled, total=total, description=description) as advance:
        for item in iterable:
            yield item
            advance(None)


def _grid_axis(lo: float, hi: float, margin: float, n: int) -> Tensor:
    span = hi - lo
    return torch.linspace(lo - margin * span, hi + margin * span, n, dtype=torch.float64)
