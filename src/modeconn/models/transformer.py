"""Small pre-LN Transformer encoder classifier (Vaswani et al., 2017; Xiong et al., 2020)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import register
from ._common import check_shape, get_activation


class Attention(nn.Module):
    """Multi-head self-attention with separate ``q``, ``k``, ``v`` and ``out`` Linear layers:
    ``out(concat_h softmax(q_h k_h^T / sqrt(d_h)) v_h)``; head ``h`` owns dims
    ``[h*d_h, (h+1)*d_h)`` of q, k and v."""

    def __init__(self, dim: int, num_heads: int, num_tokens: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"transformer dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim, self.num_tokens = num_heads, dim // num_heads, num_tokens
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, x: Tensor) -> Tensor:  # (B, T, D) -> (B, H, T, Dh)
        return x.reshape(-1, self.num_tokens, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(-1, self.num_tokens, self.num_heads * self.head_dim)
        return self.out(y)


class MLPBlock(nn.Module):
    """``fc2(act(fc1(x)))``."""

    def __init__(self, dim: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = get_activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN encoder block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(
        self, dim: int, num_heads: int, hidden: int, num_tokens: int, activation: str
    ) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, num_tokens)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, hidden, activation)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


@register("transformer")
class Transformer(nn.Module):
    """Patch embedding (Linear) + learned positional embedding, ``depth`` pre-LN blocks, final
    LayerNorm, mean over tokens, Linear head.

    Tokens: a 1-D input ``(L,)`` is cut into ``L / patch_size`` patches of ``patch_size`` values;
    ``(C, L)`` gives ``L / patch_size`` tokens of ``C * patch_size`` values; an image
    ``(C, H, W)`` gives ``(H / p) * (W / p)`` patches of ``C * p * p`` values (as in ViT).
    Parameters: ``embed``, ``pos``, ``blocks.{i}.{ln1, attn.{q,k,v,out}, ln2, mlp.{fc1,fc2}}``,
    ``ln_f``, ``head``.

    Args:
        input_shape: ``(L,)``, ``(C, L)`` or ``(C, H, W)``.
        num_classes: outputs of the head.
        dim: model width (residual stream).
        depth: number of encoder blocks.
        num_heads: attention heads (must divide ``dim``).
        mlp_ratio: hidden width of each MLP block is ``mlp_ratio * dim``.
        patch_size: values per token along each spatial axis (default 4 for 1-D, 2 for 2-D).
        activation: activation of the MLP blocks (``"gelu"`` default).

    Example:
        >>> import torch
        >>> Transformer((40,), 10)(torch.zeros(2, 40)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (40,),
        num_classes: int = 10,
        dim: int = 32,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: int = 2,
        patch_size: int | None = None,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        shape = check_shape(input_shape, (1, 2, 3), "transformer")
        if depth < 1 or dim < 1 or num_heads < 1 or mlp_ratio < 1:
            raise ValueError("transformer needs depth, dim, num_heads and mlp_ratio >= 1")
        self.in_shape = (1, shape[0]) if len(shape) == 1 else shape
        spatial = self.in_shape[1:]
        p = patch_size if patch_size is not None else (4 if len(spatial) == 1 else 2)
        if p < 1 or any(s % p for s in spatial):
            raise ValueError(f"patch_size {p} must divide every spatial size of {tuple(spatial)}")
        self.patch = p
        c = self.in_shape[0]
        if len(spatial) == 1:
            self.grid: tuple[int, ...] = (spatial[0] // p,)
        else:
            self.grid = (spatial[0] // p, spatial[1] // p)
        num_tokens = math.prod(self.grid)
        patch_dim = c * p ** len(spatial)
        self.num_tokens, self.patch_dim = num_tokens, patch_dim
        self.embed = nn.Linear(patch_dim, dim)
        self.pos = nn.Parameter(torch.randn(1, num_tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio * dim, num_tokens, activation) for _ in range(depth)
        )
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def _tokens(self, x: Tensor) -> Tensor:
        c, p = self.in_shape[0], self.patch
        if len(self.grid) == 1:  # (B, C, L) -> (B, T, C*p)
            x = x.reshape(-1, c, self.grid[0], p).permute(0, 2, 1, 3)
        else:  # (B, C, H, W) -> (B, T, C*p*p)
            gh, gw = self.grid
            x = x.reshape(-1, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(-1, self.num_tokens, self.patch_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(self._tokens(x)) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x).mean(1))
