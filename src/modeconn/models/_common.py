"""Small helpers shared by the zoo's model families (activation lookup, shape checks)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "tanh": F.tanh,
}


def get_activation(name: str) -> Callable[[Tensor], Tensor]:
    """The elementwise activation function called ``name`` (relu, gelu, tanh)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def check_shape(input_shape: Sequence[int], ndims: tuple[int, ...], model: str) -> tuple[int, ...]:
    """Validate ``input_shape`` (per-example, no batch axis) and return it as a tuple of ints."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) not in ndims or any(s <= 0 for s in shape):
        want = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"{model} needs a {want} input_shape (no batch axis), got {shape}")
    return shape


def numel(shape: Sequence[int]) -> int:
    """Number of elements of one example."""
    return math.prod(shape)


def check_norm(norm: str | None, allowed: tuple[str | None, ...]) -> str | None:
    """Validate a ``norm`` option."""
    if norm not in allowed:
        raise ValueError(f"norm must be one of {allowed}, got {norm!r}")
    return norm
