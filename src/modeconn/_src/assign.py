"""Linear assignment for one permutation group: plain, or heads-structured (MHA, GQA, MQA).

Every alignment method reduces a group to a score matrix ``S`` (``S[i, j]``: how well B's unit
``j`` fits A's unit ``i``) and asks for the permutation maximising ``sum_i S[i, p[i]]``.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .heads import Heads, HeadsMoves, assemble


def solve_assignment(score: Tensor, heads: Heads | None = None) -> Tensor:
    """The permutation ``p`` maximising ``sum_i score[i, p[i]]`` (Hungarian, via scipy).

    With ``heads`` (attention groups, :class:`~modeconn.Heads`), ``p`` must be a valid heads
    permutation: key/value heads move as wholes, query heads within their group, dims within each
    head (linked q dims with their key head's dims). The objective splits over key/value-head
    pairs: for every destination/source pair ``(a, b)`` the best inner value ``V[a, b]`` (query
    heads of ``b`` onto those of ``a``, and the dims) is computed, then ``sigma`` solves the
    assignment on ``V`` -- exact whenever the inner values are. The inner problem is exact when
    no segment is linked or a group has one query head (multi-head attention: each segment's
    within-head assignment, summed, exactly as before), and when ``R! <= 24`` (``R`` query heads
    per group; every query-head order is tried, each with its exact dim assignments). Otherwise it
    is solved by alternation (coordinate ascent) between the query-head order and the linked dim
    permutations, started from the assignment that ignores the linking; each step is an exact
    assignment, so the value never decreases. ``fixed`` heads: only dims are assigned (exact).

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
    if heads is None:
        return torch.from_numpy(_lap(s)).long()
    return solve_heads(s, heads)


def solve_heads(s: np.ndarray, heads: Heads, exact_limit: int = 24) -> Tensor:
    """Heads-structured assignment on a float64 score (see :func:`solve_assignment`).

    ``exact_limit``: the most query-head orders tried per key/value-head pair before alternation
    takes over (``R! <= exact_limit``).
    """
    n = s.shape[0]
    G = heads.group_size
    pairs = (
        [(a, a) for a in range(G)] if heads.fixed else [(a, b) for a in range(G) for b in range(G)]
    )
    value = np.full((G, G), -np.inf)
    best: dict[tuple[int, int], _Inner] = {}
    for a, b in pairs:
        best[(a, b)] = _inner(s, heads, a, b, exact_limit)
        value[a, b] = best[(a, b)].value
    sigma = list(range(G)) if heads.fixed else [int(x) for x in _lap(value)]
    moves = HeadsMoves(sigma, [], [[] for _ in heads.kv_segments], [])
    moves.q_dims = [[[] for _ in range(heads.num_heads)] for _ in heads.segments]
    R = heads.heads_per_group
    for a in range(G):
        inner = best[(a, sigma[a])]
        moves.tau.append(inner.tau)
        for k in range(len(heads.kv_segments)):
            moves.kv_dims[k].append(inner.kv_dims[k])
        for j in range(len(heads.segments)):
            for r in range(R if heads.link(j) < 0 else 0):
                moves.q_dims[j][a * R + r] = inner.q_dims[j][r]
    return assemble(heads, moves, n).long()


class _Inner:
    """The best query-head order and dim assignments of one key/value-head pair."""

    def __init__(
        self, value: float, tau: list[int], kv_dims: list[list[int]], q_dims: list[list[list[int]]]
    ) -> None:
        self.value, self.tau, self.kv_dims, self.q_dims = value, tau, kv_dims, q_dims


def _inner(s: np.ndarray, heads: Heads, a: int, b: int, exact_limit: int) -> _Inner:
    R = heads.heads_per_group
    segs, kvs = heads.segments, heads.kv_segments

    def qblock(j: int, r: int, r2: int) -> np.ndarray:
        start, d = segs[j]
        ha, hb = start + (a * R + r) * d, start + (b * R + r2) * d
        return s[ha : ha + d, hb : hb + d]

    kv_blocks = [s[st + a * d : st + (a + 1) * d, st + b * d : st + (b + 1) * d] for st, d in kvs]
    unlinked = [j for j in range(len(segs)) if heads.link(j) < 0]
    linked = [j for j in range(len(segs)) if heads.link(j) >= 0]
    # query-head pair scores of the unlinked segments (their dims are free per head): exact
    q_val = np.zeros((R, R))
    q_arg: dict[tuple[int, int, int], np.ndarray] = {}
    for j in unlinked:
        for r in range(R):
            for r2 in range(R):
                blk = qblock(j, r, r2)
                q_arg[(j, r, r2)] = x = _lap(blk)
                q_val[r, r2] += blk[np.arange(len(x)), x].sum()

    def dims_for(tau: list[int]) -> tuple[float, list[np.ndarray]]:
        """Exact kv dims given the query-head order: one assignment per kv segment."""
        total = float(q_val[np.arange(R), tau].sum())
        dims = []
        for k, blk in enumerate(kv_blocks):
            m = blk.copy()
            for j in linked:
                if heads.link(j) == k:
                    for r in range(R):
                        m += qblock(j, r, tau[r])
            x = _lap(m)
            dims.append(x)
            total += float(m[np.arange(len(x)), x].sum())
        return total, dims

    if heads.fixed:
        tau = list(range(R))
        value, dims = dims_for(tau)
    elif not linked or R == 1:
        tau = [int(x) for x in _lap(q_val)] if R > 1 else [0]
        value, dims = dims_for(tau)
    elif math.factorial(R) <= exact_limit:
        value, tau, dims = -np.inf, [], []
        for cand in itertools.permutations(range(R)):
            v, d = dims_for(list(cand))
            if v > value:
                value, tau, dims = v, list(cand), d
    else:
        # alternation: start from the order that lets every linked head pick its own dims
        relax = q_val.copy()
        for j in linked:
            for r in range(R):
                for r2 in range(R):
                    blk = qblock(j, r, r2)
                    x = _lap(blk)
                    relax[r, r2] += blk[np.arange(len(x)), x].sum()
        tau = [int(x) for x in _lap(relax)]
        value, dims = dims_for(tau)
        for _ in range(50):
            t_score = q_val.copy()
            for j in linked:
                x = dims[heads.link(j)]
                for r in range(R):
                    for r2 in range(R):
                        t_score[r, r2] += qblock(j, r, r2)[np.arange(len(x)), x].sum()
            new_tau = [int(x) for x in _lap(t_score)]
            v, d = dims_for(new_tau)
            if v <= value + 1e-12 * (1 + abs(value)):
                break
            value, tau, dims = v, new_tau, d
    q_dims = [
        [q_arg[(j, r, tau[r])].tolist() for r in range(R)] if j in unlinked else []
        for j in range(len(segs))
    ]
    return _Inner(value, tau, [x.tolist() for x in dims], q_dims)


def _lap(s: np.ndarray) -> np.ndarray:
    if s.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    rows, cols = linear_sum_assignment(s, maximize=True)
    out = np.empty(s.shape[0], dtype=np.int64)
    out[rows] = cols
    return out
