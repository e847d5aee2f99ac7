"""Small VGG-style 2-D convolutional classifier (Simonyan & Zisserman, 2015), for images."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from . import register
from ._common import check_norm, check_shape, get_activation


@register("cnn")
class CNN(nn.Module):
    """``depth`` x [Conv2d 3x3 -> optional BatchNorm2d -> act -> MaxPool 2x2], mean-pool, head.

    Channels double every layer starting at ``width`` (capped at ``8 * width``); a max-pool
    follows each layer while the feature map is at least 2x2. Parameters: ``convs.{i}``,
    ``norms.{i}``, ``head``.

    Args:
        input_shape: ``(C, H, W)``, e.g. ``(1, 8, 8)`` for digits; ``(H, W)`` means one channel.
        num_classes: outputs of the head.
        width: channels of the first layer.
        depth: number of conv layers.
        norm: ``None`` or ``"bn"``.
        activation: ``"relu"``, ``"gelu"`` or ``"tanh"``.

    Example:
        >>> import torch
        >>> CNN((1, 8, 8), 10)(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 8, 8),
        num_classes: int = 10,
        width: int = 16,
        depth: int = 3,
        norm: str | None = None,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        shape = check_shape(input_shape, (2, 3), "cnn")
        check_norm(norm, (None, "bn"))
        if depth < 1 or width < 1:
            raise ValueError(
                f"cnn needs depth >= 1 and width >= 1, got depth={depth}, width={width}"
            )
        self.in_shape = (1, *shape) if len(shape) == 2 else shape
        self.act = get_activation(activation)
        c, h, w = self.in_shape
        convs: list[nn.Module] = []
        norms: list[nn.Module] = []
        pools: list[nn.Module] = []
        for i in range(depth):
            out = width * 2 ** min(i, 3)
            convs.append(nn.Conv2d(c, out, 3, padding=1))
            norms.append(nn.BatchNorm2d(out) if norm == "bn" else nn.Identity())
            if h >= 2 and w >= 2:
                pools.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            else:
                pools.append(nn.Identity())
            c = out
        self.convs = nn.ModuleList(convs)
        self.norms = nn.ModuleList(norms)
        self.pools = nn.ModuleList(pools)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(-1, *self.in_shape)
        for conv, norm, pool in zip(self.convs, self.norms, self.pools, strict=True):
            x = pool(self.act(norm(conv(x))))
        return self.head(x.mean((-2, -1)))
