"""CIFAR-style ResNet (He et al., 2016, Sec. 4.2): depth 6n+2, BasicBlocks, BN, width multiplier."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from . import register
from ._common import check_shape


def _conv(dim: int, cin: int, cout: int, k: int, stride: int) -> nn.Module:
    cls = nn.Conv2d if dim == 2 else nn.Conv1d
    return cls(cin, cout, k, stride=stride, padding=k // 2, bias=False)


def _bn(dim: int, c: int) -> nn.Module:
    return nn.BatchNorm2d(c) if dim == 2 else nn.BatchNorm1d(c)


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; the shortcut is the identity, or
    a 1x1 conv + BN projection (``shortcut.0``, ``shortcut.1``) when the shape changes."""

    def __init__(self, dim: int, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv(dim, cin, cout, 3, stride)
        self.bn1 = _bn(dim, cout)
        self.conv2 = _conv(dim, cout, cout, 3, 1)
        self.bn2 = _bn(dim, cout)
        if stride != 1 or cin != cout:
            self.shortcut: nn.Module = nn.Sequential(
                _conv(dim, cin, cout, 1, stride), _bn(dim, cout)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


@register("resnet")
class ResNet(nn.Module):
    """ResNet-(6n+2) for small inputs: stem conv, three stages of ``n`` BasicBlocks with
    ``16w, 32w, 64w`` channels (strides 1, 2, 2), global average pool, Linear head.

    ``depth=20, width=1`` is the paper's ResNet-20. 3-D inputs ``(C, H, W)`` use 2-D convolutions;
    1-D inputs ``(L,)`` (one channel) or ``(C, L)`` use the same network built from 1-D
    convolutions. Parameters: ``stem``, ``stem_bn``, ``layers.{i}`` (blocks), ``head``.

    Args:
        input_shape: ``(C, H, W)``, ``(C, L)`` or ``(L,)``.
        num_classes: outputs of the head.
        depth: ``6n + 2`` (8, 14, 20, 32, ...).
        width: channel multiplier ``w`` (channels ``16w, 32w, 64w``).

    Example:
        >>> import torch
        >>> ResNet((1, 8, 8), 10, depth=8)(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 8, 8),
        num_classes: int = 10,
        depth: int = 8,
        width: int = 1,
    ) -> None:
        super().__init__()
        shape = check_shape(input_shape, (1, 2, 3), "resnet")
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"resnet depth must be 6n+2 with n >= 1 (8, 14, 20, ...), got {depth}")
        if width < 1:
            raise ValueError(f"resnet width multiplier must be >= 1, got {width}")
        self.in_shape = (1, shape[0]) if len(shape) == 1 else shape
        dim = len(self.in_shape) - 1
        n = (depth - 2) // 6
        c = 16 * width
        self.stem = _conv(dim, self.in_shape[0], c, 3, 1)
        self.stem_bn = _bn(dim, c)
        blocks: list[nn.Module] = []
        for stage, mult in enumerate((1, 2, 4)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(dim, c, 16 * width * mult, stride))
                c = 16 * width * mult
        self.layers = nn.Sequential(*blocks)
        self.head = nn.Linear(c, num_classes)
        self._pool_dims = tuple(range(2, 2 + dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(-1, *self.in_shape)
        x = F.relu(self.stem_bn(self.stem(x)))
        x = self.layers(x)
        return self.head(x.mean(self._pool_dims))
