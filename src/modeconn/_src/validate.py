"""Checks run before any work: data that fits the model, finite weights, sane model sizes.

The one rule for non-finite values (README, "Non-finite values"): non-finite *inputs* (weights
in a checkpoint, data values) are refused when loaded; non-finite *results* are reported as NaN
and end a CLI command with :class:`~modeconn.NonFiniteError` (exit code 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, DataError


def check_data_fits(model: nn.Module, splits: Any) -> None:
    """Run two training examples through ``model``: a data set of the wrong shape, or with more
    classes than the model has outputs, is one :class:`DataError` line before any work.

    Args:
        model: the model the data will be fed to.
        splits: ``mc.data.Splits`` (its first training example is used).

    Example:
        >>> import modeconn as mc
        >>> check_data_fits(mc.models.create("mlp", input_shape=(1, 8, 8)), mc.data.load("digits"))
    """
    from .evaluation import model_device

    try:
        x = torch.as_tensor(splits.train[0][0]).unsqueeze(0)
    except Exception:  # noqa: BLE001 - an unusual dataset: let the real run speak for itself
        return
    x = torch.cat([x, x]).to(model_device(model))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:  # noqa: BLE001 - any failure here means the data does not fit
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"data {splits.name!r} (inputs of shape {tuple(splits.input_shape)}) does not fit "
            f"the model: {msg}; pass the --data it was trained on"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        return
    if out.shape[-1] < splits.num_classes:
        raise DataError(
            f"data {splits.name!r} has {splits.num_classes} classes but the model has "
            f"{out.shape[-1]} outputs; pass the --data it was trained on"
        )


def check_finite_state(state: Mapping[str, Any], where: str) -> None:
    """Refuse a state dict with NaN or inf in a floating tensor (one :class:`CheckpointError`).

    Example:
        >>> check_finite_state({"w": torch.ones(2)}, "a.safetensors")
        >>> check_finite_state({"w": torch.tensor([1.0, float("nan")])}, "b")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        modeconn._src.errors.CheckpointError: checkpoint 'b' has non-finite weights ...
    """
    for k, t in state.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(
                f"checkpoint {where!r} has non-finite weights (NaN or inf in {k!r}); modeconn "
                "refuses non-finite inputs: use a checkpoint saved before training diverged"
            )


def state_shapes_fit(
    own: Mapping[str, Any], state: Mapping[str, Any], *, where: str, name: str
) -> None:
    """``own`` (a model's state, real or on the meta device) has exactly ``state``'s names and
    shapes, else one :class:`CheckpointError` naming the first misfit.

    Example:
        >>> state_shapes_fit({"w": torch.zeros(2)}, {"w": torch.ones(2)}, where="a", name="mlp")
    """
    for k, v in own.items():
        if k not in state:
            raise CheckpointError(
                f"checkpoint {where!r} does not fit model {name!r}: it has no tensor {k!r} "
                "(check --model and its options)"
            )
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"checkpoint {where!r} does not fit model {name!r}: tensor {k!r} has shape "
                f"{tuple(state[k].shape)} in the checkpoint but {tuple(v.shape)} in the model"
            )
    extra = [k for k in state if k not in own]
    if extra:
        raise CheckpointError(
            f"checkpoint {where!r} does not fit model {name!r}: unexpected tensor {extra[0]!r} "
            f"({len(extra)} extra; check --model and its options)"
        )


def check_build_fits(
    build: Any, state: Mapping[str, Any], *, where: str, name: str
) -> None:
    """Build the model on the meta device (no memory) and compare its shapes with ``state``.

    Metadata asking for an absurd size (``width: 1e9``) is refused here, before allocating: the
    checkpoint's tensors are the truth. A factory that cannot build on the meta device is let
    through (the real build and the strict load still check it).

    Args:
        build: a no-argument callable returning the ``nn.Module``.
        state: the checkpoint's weights.
        where: the file, for messages.
        name: the model's name, for messages.

    Example:
        >>> check_build_fits(lambda: nn.Linear(2, 1), nn.Linear(2, 1).state_dict(), where="a",
        ...                  name="linear")
    """
    try:
        with torch.device("meta"):
            net = build()
        own = net.state_dict()
    except CheckpointError:
        raise
    except Exception:  # noqa: BLE001 - the real build reports its own errors
        return
    state_shapes_fit(own, state, where=where, name=name)


def memory_bytes() -> int | None:
    """This machine's physical memory in bytes (``None`` where the OS does not say)."""
    import os

    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return None


def check_model_size(build: Any, *, name: str, limit: int | None = None) -> None:
    """Build the model on the meta device (no memory) and refuse one whose weights alone would
    not fit in ``limit`` bytes (default: this machine's memory): options asking for an absurd
    size (``--model-arg width=1000000000``) are one :class:`ConfigError` before allocating.

    Args:
        build: a no-argument callable returning the ``nn.Module``.
        name: the model's name, for the message.
        limit: the byte budget (default :func:`memory_bytes`).

    Example:
        >>> check_model_size(lambda: nn.Linear(10**5, 10**5), name="big", limit=10**9)
        Traceback (most recent call last):
        ...
        modeconn._src.errors.ConfigError: model 'big' would have 10000100000 parameters (40.0 GB \
of weights), more than this machine's 1.0 GB of memory; check its options (--model-arg)
    """
    from .errors import ConfigError

    budget = limit if limit is not None else memory_bytes()
    if budget is None:
        return
    try:
        with torch.device("meta"):
            net = build()
        tensors = list(net.state_dict().values())
    except Exception:  # noqa: BLE001 - the real build reports its own errors
        return
    n = sum(t.numel() for t in tensors)
    size = sum(t.numel() * t.element_size() for t in tensors)
    if size > budget:
        raise ConfigError(
            f"model {name!r} would have {n} parameters ({size / 1e9:.1f} GB of weights), more "
            f"than this machine's {budget / 1e9:.1f} GB of memory; check its options (--model-arg)"
        )
