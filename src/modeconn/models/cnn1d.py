"""1-D convolutional classifier for sequences such as MNIST-1D (Greydanus, 2020)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from . import register
from ._common import check_norm, check_shape, get_activation


@register("cnn1d")
class CNN1d(nn.Module):
    """``depth`` x [Conv1d(k, stride 2) -> optional BatchNorm1d -> act], then a Linear head.

    Follows the MNIST-1D paper's CNN (three strided convolutions, then a linear layer on the
    flattened features). Parameters: ``convs.{i}``, ``norms.{i}``, ``head``.

    Args:
        input_shape: ``(L,)`` (one channel) or ``(C, L)``.
        num_classes: outputs of the head.
        width: channels of every conv layer.
        depth: number of conv layers.
        kernel_size: odd kernel size (padding keeps ``ceil(L / 2)`` per layer).
        norm: ``None`` or ``"bn"``.
        pool: ``"flatten"`` (flatten -> Linear, default) or ``"mean"`` (global average pool).
        activation: ``"relu"``, ``"gelu"`` or ``"tanh"``.

    Example:
        >>> import torch
        >>> CNN1d((40,), 10)(torch.zeros(2, 40)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (40,),
        num_classes: int = 10,
        width: int = 32,
        depth: int = 3,
        kernel_size: int = 5,
        norm: str | None = None,
        pool: str = "flatten",
        activation: str = "relu",
    ) -> None:
        super().__init__()
        shape = check_shape(input_shape, (1, 2), "cnn1d")
        check_norm(norm, (None, "bn"))
        if pool not in ("flatten", "mean"):
            raise ValueError(f"pool must be 'flatten' or 'mean', got {pool!r}")
        if depth < 1 or width < 1 or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError("cnn1d needs depth >= 1, width >= 1 and an odd kernel_size")
        self.in_shape = (1, shape[0]) if len(shape) == 1 else shape
        self.pool = pool
        self.act = get_activation(activation)
        channels, length = self.in_shape
        convs, norms = [], []
        for _ in range(depth):
            convs.append(
                nn.Conv1d(channels, width, kernel_size, stride=2, padding=kernel_size // 2)
            )
            norms.append(nn.BatchNorm1d(width) if norm == "bn" else nn.Identity())
            channels, length = width, (length - 1) // 2 + 1
        self.convs = nn.ModuleList(convs)
        self.norms = nn.ModuleList(norms)
        self.head = nn.Linear(width * length if pool == "flatten" else width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(-1, *self.in_shape)
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = self.act(norm(conv(x)))
        x = x.flatten(1) if self.pool == "flatten" else x.mean(-1)
        return self.head(x)
