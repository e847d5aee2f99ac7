"""Shared plumbing for running models: data in any accepted form, devices, loss/accuracy."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .errors import ConfigError, DataError

DataLike = Any  # DataLoader | Dataset | tuple[Tensor, Tensor]


def as_loader(
    data: DataLike,
    *,
    batch_size: int = 256,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """Turn a ``DataLoader``, a ``Dataset`` or a tuple ``(inputs, targets)`` into a DataLoader.

    A DataLoader is returned as it is; otherwise batches are drawn with a private generator
    seeded by ``seed`` (so shuffling is reproducible and leaves the global RNG alone).

    Args:
        data: the data.
        batch_size: batch size for a Dataset/tuple.
        shuffle: shuffle each epoch.
        seed: seed of the shuffling generator.
        drop_last: drop a final incomplete batch.

    Returns:
        A ``torch.utils.data.DataLoader`` yielding ``(inputs, targets)``.

    Example:
        >>> x, y = torch.zeros(10, 3), torch.zeros(10, dtype=torch.long)
        >>> len(as_loader((x, y), batch_size=4))
        3
    """
    if isinstance(data, DataLoader):
        return data
    if (
        isinstance(data, tuple | list)
        and len(data) == 2
        and all(isinstance(t, Tensor) for t in data)
    ):
        x, y = data
        if len(x) != len(y):
            raise DataError(f"inputs have {len(x)} rows but targets have {len(y)}")
        data = TensorDataset(x, y)
    if not isinstance(data, Dataset):
        raise DataError(
            "expected a DataLoader, a Dataset or a tuple (inputs, targets), "
            f"got {type(data).__name__}"
        )
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(
        data, batch_size=batch_size, shuffle=shuffle, generator=gen, drop_last=drop_last
    )


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` -> CPU; otherwise the named device, with a clear error if it is not available.

    Args:
        device: ``None``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or a ``torch.device``.

    Returns:
        The ``torch.device``.

    Raises:
        ConfigError: the name is not a device, or that device is not available here.

    Example:
        >>> resolve_device(None)
        device(type='cpu')
    """
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(
            f"--device {device!r} is not a device; use cpu, cuda, cuda:N or mps"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                "--device cuda was asked for, but no CUDA GPU is available; use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {device!s} was asked for, but there are only "
                f"{torch.cuda.device_count()} CUDA GPU(s) (cuda:0 ...)"
            )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps was asked for, but MPS is not available; use --device cpu")
    return dev


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for an empty model)."""
    for t in model.parameters():
        return t.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def with_state(model: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    """A deep copy of ``model`` holding ``state`` (strict load); ``model`` is left untouched.

    Example:
        >>> m = nn.Linear(2, 1); s = {k: torch.zeros_like(v) for k, v in m.state_dict().items()}
        >>> with_state(m, s).weight.abs().sum().item()
        0.0
    """
    new = copy.deepcopy(model)
    new.load_state_dict(dict(state), strict=True)
    return new


@dataclass(frozen=True)
class Metrics:
    """Mean cross-entropy loss and accuracy over ``n`` examples."""

    loss: float
    accuracy: float
    n: int

    def to_dict(self) -> dict[str, float]:
        """``{"loss": ..., "accuracy": ..., "n": ...}`` (JSON-ready)."""
        return {"loss": self.loss, "accuracy": self.accuracy, "n": self.n}


def evaluate(
    model: nn.Module,
    data: DataLike,
    *,
    state: Mapping[str, Tensor] | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 1024,
    input_transform: Callable[[Callable[[Tensor], Tensor], Tensor, Tensor], Tensor] | None = None,
) -> Metrics:
    """Loss and accuracy of ``model`` (in eval mode) on ``data``.

    Args:
        model: the network; not modified (its train/eval mode is restored).
        data: DataLoader, Dataset or ``(inputs, targets)``.
        state: evaluate these weights instead of the model's own (``torch.func.functional_call``).
        device: where to run (default: the model's device).
        batch_size: for a Dataset/tuple.
        input_transform: ``(forward, x, y) -> x'`` applied to each batch before the measured
            forward pass, with gradients enabled (PGD inputs: ``robust_evaluate``).

    Returns:
        :class:`Metrics`.

    Example:
        >>> m = nn.Linear(3, 2); x, y = torch.randn(8, 3), torch.zeros(8, dtype=torch.long)
        >>> 0.0 <= evaluate(m, (x, y)).accuracy <= 1.0
        True
    """
    dev = resolve_device(device) if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    if state is not None:
        state = {k: v.to(dev) for k, v in state.items()}
    params = state

    def forward(inp: Tensor) -> Tensor:
        if params is None:
            return model(inp)
        return torch.func.functional_call(model, params, (inp,))

    total_loss, correct, n = 0.0, 0, 0
    try:
        for x, y in as_loader(data, batch_size=batch_size):
            x, y = x.to(dev), y.to(dev)
            if input_transform is not None:
                x = input_transform(forward, x, y)
            with torch.no_grad():
                out = forward(x)
            total_loss += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(-1) == y).sum())
            n += len(y)
    finally:
        model.train(was_training)
    if n == 0:
        raise DataError("cannot evaluate on an empty dataset")
    return Metrics(total_loss / n, correct / n, n)


# ``input_transform(model_fn, x, y) -> x'``: replaces a minibatch's inputs (e.g. PGD examples);
# used by curve fitting and PAM.
InputTransform = Callable[[nn.Module, Tensor, Tensor], Tensor]


class AtParams(nn.Module):
    """``net`` evaluated at fixed ``params`` (``torch.func.functional_call``), as a module.

    Example:
        >>> net = nn.Linear(2, 1)
        >>> f = AtParams(net, {"weight": torch.ones(1, 2), "bias": torch.zeros(1)})
        >>> f(torch.ones(1, 2)).item()
        2.0
    """

    def __init__(self, net: nn.Module, params: dict[str, Tensor]):
        super().__init__()
        self.net = net
        self.params = params

    def forward(self, x: Tensor) -> Tensor:
        return torch.func.functional_call(self.net, self.params, (x,))
