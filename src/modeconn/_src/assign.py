"""Linear assignment for one permutation group: plain, or heads-structured for attention.

Every alignment method reduces a group to a score matrix ``S`` (``S[i, j]``: how well B's unit
``j`` fits A's unit ``i``) and asks for the permutation maximising ``sum_i S[i, p[i]]``.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .spec import Heads


def solve_assignment(score: Tensor, heads: Heads | None = None) -> Tensor:
    """The permutation ``p`` maximising ``sum_i score[i, p[i]]`` (Hungarian, via scipy).

    With ``heads`` (attention groups), ``p`` must move whole heads and may only permute dims
    within a head and segment. The optimum then decomposes exactly: for every pair of heads
    ``(a, b)`` solve each segment's within-head assignment, sum the optimal values into a head-level
    score ``H[a, b]``, solve that assignment, and assemble.

    Args:
        score: ``(n, n)`` real matrix (any float dtype, any device).
        heads: the group's attention structure, or ``None``.

    Returns:
        ``LongTensor`` of shape ``(n,)`` (on the CPU).

    Example:
        >>> solve_assignment(torch.tensor([[0.0, 1.0], [1.0, 0.0]])).tolist()
        [1, 0]
    """
    if score.dim() != 2 or score.shape[0] != score.shape[1]:
        raise ValueError(f"score must be a square matrix, got shape {tuple(score.shape)}")
    s = score.detach().double().cpu().numpy()
    if not np.isfinite(s).all():
        raise ValueError(
            "score matrix contains NaN or inf (are the weights or activations finite?)"
        )
    n = s.shape[0]
    if heads is None:
        return torch.from_numpy(_lap(s)).long()
    p = np.arange(n)
    H = heads.num_heads
    head_score = np.zeros((H, H))
    inner: dict[tuple[int, int, int], np.ndarray] = {}
    for si, (start, d) in enumerate(heads.segments):
        for a in range(H):
            ra = slice(start + a * d, start + (a + 1) * d)
            for b in range(H):
                rb = slice(start + b * d, start + (b + 1) * d)
                sub = s[ra, rb]
                q = _lap(sub)
                inner[(si, a, b)] = q
                head_score[a, b] += sub[np.arange(d), q].sum()
    pi = _lap(head_score)
    for si, (start, d) in enumerate(heads.segments):
        for a in range(H):
            b = int(pi[a])
            p[start + a * d : start + (a + 1) * d] = start + b * d + inner[(si, a, b)]
    return torch.from_numpy(p).long()


def _lap(s: np.ndarray) -> np.ndarray:
    if s.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    rows, cols = linear_sum_assignment(s, maximize=True)
    out = np.empty(s.shape[0], dtype=np.int64)
    out[rows] = cols
    return out
