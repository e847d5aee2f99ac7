"""Multi-layer perceptron: flatten, ``depth`` hidden Linear layers (+ optional norm), a head."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from . import register
from ._common import check_norm, check_shape, get_activation, numel


@register("mlp")
class MLP(nn.Module):
    """``head(act(norm(fc_{d-1}(... act(norm(fc_0(flatten(x))))))))``.

    Parameters are named ``layers.{i}`` (Linear), ``norms.{i}`` (BatchNorm1d / LayerNorm /
    Identity) and ``head``.

    Args:
        input_shape: one example's shape; it is flattened (e.g. ``(40,)`` or ``(1, 8, 8)``).
        num_classes: outputs of the head.
        width: units per hidden layer.
        depth: number of hidden layers (0 gives a linear classifier).
        norm: ``None``, ``"bn"`` (BatchNorm1d) or ``"ln"`` (LayerNorm) after each hidden Linear.
        activation: ``"relu"`` (default), ``"gelu"`` or ``"tanh"``.

    Example:
        >>> import torch
        >>> MLP((40,), 10, width=16, depth=2)(torch.zeros(3, 40)).shape
        torch.Size([3, 10])
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (40,),
        num_classes: int = 10,
        width: int = 128,
        depth: int = 3,
        norm: str | None = None,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        shape = check_shape(input_shape, (1, 2, 3), "mlp")
        check_norm(norm, (None, "bn", "ln"))
        if depth < 0 or width < 1:
            raise ValueError(
                f"mlp needs depth >= 0 and width >= 1, got depth={depth}, width={width}"
            )
        self.act = get_activation(activation)
        dims = [numel(shape)] + [width] * depth
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)
        )
        self.norms = nn.ModuleList(
            nn.BatchNorm1d(width)
            if norm == "bn"
            else nn.LayerNorm(width)
            if norm == "ln"
            else nn.Identity()
            for _ in range(depth)
        )
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        for fc, norm in zip(self.layers, self.norms, strict=True):
            x = self.act(norm(fc(x)))
        return self.head(x)
