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

DataLike = Any  # DataLoader | Dataset | tuple[Tensor, Tensor] | Batches


class Batches(list[tuple[Tensor, Tensor]]):
    """Batches ``(inputs, targets)`` already on one device (:func:`cache_batches`).

    Accepted wherever data is (``as_loader`` yields them as they are), so a loop over many
    networks -- points of a path, of a plane, members of an ensemble -- collates and moves its data
    once, not once per network.
    """


def cache_batches(
    data: DataLike, device: str | torch.device | None = None, batch_size: int = 1024
) -> Batches:
    """Read ``data`` once into :class:`Batches` on ``device`` (whole tensors sliced directly).

    Args:
        data: DataLoader, Dataset, ``(inputs, targets)`` or :class:`Batches` (returned as it is
            when already on ``device``).
        device: where the batches live (default: CPU).
        batch_size: for a Dataset/tuple.

    Returns:
        :class:`Batches` (at least one).

    Example:
        >>> x, y = torch.zeros(10, 3), torch.zeros(10, dtype=torch.long)
        >>> [len(b[1]) for b in cache_batches((x, y), batch_size=4)]
        [4, 4, 2]
    """
    dev = resolve_device(device)
    if isinstance(data, Batches) and all(x.device == dev for x, _ in data):
        return data
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        data = tuple(data.tensors)
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = (t.to(dev) for t in data)
        if len(x) != len(y):
            raise DataError(f"inputs have {len(x)} rows but targets have {len(y)}")
        out = Batches(
            (x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)
        )
    else:
        out = Batches((x.to(dev), y.to(dev)) for x, y in as_loader(data, batch_size=batch_size))
    if not out:
        raise DataError("cannot evaluate on an empty dataset")
    return out


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
    if isinstance(data, Batches):
        return DataLoader(data, batch_size=None)  # type: ignore[arg-type]  # a list is a dataset
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
    on_output: Callable[[int, Tensor, Tensor], None] | None = None,
) -> Metrics:
    """Loss and accuracy of ``model`` (in eval mode) on ``data``: the one evaluation loop.

    Mean cross-entropy ``-1/n sum_i log softmax(f(x_i))_{y_i}`` and accuracy of ``argmax f(x_i)``.
    Path evaluation, landscapes, ensembles and robust evaluation all run through it.

    Args:
        model: the network; not modified (its train/eval mode is restored).
        data: DataLoader, Dataset or ``(inputs, targets)``.
        state: evaluate these weights instead of the model's own (``torch.func.functional_call``).
        device: where to run (default: the model's device).
        batch_size: for a Dataset/tuple.
        input_transform: ``(forward, x, y) -> x'`` applied to each batch before the measured
            forward pass, with gradients enabled (PGD inputs: ``robust_evaluate``).
        on_output: called as ``on_output(batch_index, outputs, targets)`` after each batch
            (ensembles collect their members' probabilities).

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
    params = None if state is None else {k: v.to(dev) for k, v in state.items()}

    def forward(inp: Tensor) -> Tensor:
        if params is None:
            return model(inp)
        return torch.func.functional_call(model, params, (inp,))

    # sums stay on the device (one synchronisation at the end, not two per batch)
    total_loss = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros((), dtype=torch.long, device=dev)
    n = 0
    try:
        batches = data if isinstance(data, Batches) else as_loader(data, batch_size=batch_size)
        for i, (x, y) in enumerate(batches):
            x, y = x.to(dev), y.to(dev)
            if input_transform is not None:
                x = input_transform(forward, x, y)
            with torch.no_grad():
                out = forward(x)
                if out.dtype in (torch.float16, torch.bfloat16):
                    out = out.float()  # the loss of a half-precision model, summed in float32
                total_loss += F.cross_entropy(out, y, reduction="sum")
                correct += (out.argmax(-1) == y).sum()
                n += len(y)
                if on_output is not None:
                    on_output(i, out, y)
    finally:
        if was_training:
            model.train()
    if n == 0:
        raise DataError("cannot evaluate on an empty dataset")
    return Metrics(float(total_loss) / n, int(correct) / n, n)


class StateRunner:
    """Runs one architecture at many states: each state evaluated through
    ``torch.func.functional_call`` on the model (copied only to reach ``device``; never modified),
    no copy of the network per state; for a network with BatchNorm and ``bn_data``, each state is
    loaded into one working copy and its statistics recomputed (``mc.reset_bn``) first.

    Args:
        model: the architecture (not modified).
        device: where to run (default: the model's device).
        bn_data: data for the BatchNorm statistics (ignored without BatchNorm layers).
        batch_size: for a Dataset/tuple.

    Example:
        >>> m = nn.Linear(3, 2); x, y = torch.randn(8, 3), torch.zeros(8, dtype=torch.long)
        >>> run = StateRunner(m)
        >>> run(m.state_dict(), cache_batches((x, y))).n
        8
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        device: str | torch.device | None = None,
        bn_data: DataLike | None = None,
        batch_size: int = 1024,
    ) -> None:
        from .norm import needs_bn_reset

        self.device = resolve_device(device) if device is not None else model_device(model)
        self.bn = bn_data is not None and needs_bn_reset(model)
        # functional_call leaves the network as it is (evaluate restores its mode): copied only
        # to move it, or to load each state for its BatchNorm statistics
        same = model_device(model) == self.device
        self.net = model if same and not self.bn else copy.deepcopy(model).to(self.device)
        self.bn_data = cache_batches(bn_data, self.device, batch_size) if self.bn else None
        self.batch_size = batch_size

    def network(self, state: Mapping[str, Tensor]) -> tuple[nn.Module, dict[str, Tensor] | None]:
        """``(net, params)`` computing ``state``: run ``functional_call(net, params, x)``, or
        ``net(x)`` when ``params`` is ``None`` (BatchNorm statistics recomputed)."""
        if not self.bn:
            return self.net, dict(state)
        from .norm import reset_bn

        self.net.load_state_dict(dict(state), strict=True)
        return reset_bn(self.net, self.bn_data, device=self.device), None

    def __call__(
        self,
        state: Mapping[str, Tensor],
        data: DataLike,
        *,
        on_output: Callable[[int, Tensor, Tensor], None] | None = None,
    ) -> Metrics:
        """:func:`evaluate` of ``state`` on ``data`` (best given as :class:`Batches`)."""
        net, params = self.network(state)
        return evaluate(
            net,
            data,
            state=params,
            device=self.device,
            batch_size=self.batch_size,
            on_output=on_output,
        )
