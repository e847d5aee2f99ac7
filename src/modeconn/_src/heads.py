"""The permutation symmetry of multi-head attention (MHA, MQA, GQA): :class:`Heads`.

Attention ``o_h = softmax(q_h k_{g(h)}^T) v_{g(h)}`` with ``H`` query heads sharing ``G``
key/value heads (query head ``h = g * R + r``, ``R = H / G``; ``G = H`` is multi-head attention
(Vaswani et al., 2017), ``G = 1`` multi-query (Shazeer, 2019), else grouped-query attention
(Ainslie et al., 2023)) is unchanged when

- the key/value heads are permuted (``sigma``, each taking its query heads along),
- the query heads are permuted within their key/value group (``tau_g``),
- the q/k dims are permuted inside each head, by one permutation per key/value group (q and k
  share it; rotary embeddings pin these dims: a pinned dim block is a segment of ``head_dim`` 1
  whose slots have ``block`` = the pinned width),
- the value dims are permuted inside each key/value head, and the output projection's input
  columns of every query head of that group with them.

A :class:`Heads` names where each of these units lives inside one permutation group: *segments*
indexed by query head, *kv_segments* indexed by key/value head, and which segment's dims follow
which kv segment's (``links``). ALiBi's per-head slopes fix the head order (``fixed``), not the
dims. The helpers here compose, decompose and sample such permutations; the solver lives in
:mod:`modeconn._src.assign`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import SpecError


@dataclass(frozen=True)
class Heads:
    """Attention structure of one permutation group.

    A *segment* ``(start, head_dim)`` holds units ``start + h * head_dim + i`` for query head
    ``h < num_heads`` and dim ``i``; a *kv segment* holds ``start + g * head_dim + i`` for
    key/value head ``g < num_kv_heads``. Query head ``h`` belongs to key/value group
    ``h // (num_heads // num_kv_heads)``. A valid permutation

    - moves key/value head ``g`` to one position ``sigma(g)`` in every segment and kv segment,
      its query heads along with it, and may reorder the query heads inside each group;
    - permutes the dims inside each head of each segment freely, except that a segment linked to
      a kv segment (``links[j] = k``: the q dims of grouped-query attention, which share their
      key head's dims) uses that kv segment's dim permutation for every query head of the group;
    - moves no head at all when ``fixed`` (ALiBi slopes pin the head order), only dims.

    Units of the group outside every segment stay where they are.
    ``Heads(num_heads, segments)`` alone is multi-head attention: whole heads move, q/k and v
    heads together, dims freely per head and segment.

    Args:
        num_heads: query heads ``H``.
        segments: ``(start, head_dim)`` per query-head segment.
        num_kv_heads: key/value heads ``G`` (divides ``H``); ``None``: ``G = H``.
        kv_segments: ``(start, head_dim)`` per key/value-head segment.
        links: for each segment, the kv segment whose dim permutation it shares, or ``-1``
            (empty: none linked).
        fixed: the head order is pinned (ALiBi); only dims inside heads move.

    Example:
        >>> gqa = Heads(4, ((0, 2), (8, 2)), num_kv_heads=2, kv_segments=((16, 2), (20, 2)),
        ...             links=(0, 1))  # q | o-columns | k | v
        >>> gqa.group_size, gqa.heads_per_group
        (2, 2)
    """

    num_heads: int
    segments: tuple[tuple[int, int], ...]
    num_kv_heads: int | None = None
    kv_segments: tuple[tuple[int, int], ...] = ()
    links: tuple[int, ...] = ()
    fixed: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "segments", tuple(tuple(map(int, s)) for s in self.segments))
        object.__setattr__(self, "kv_segments", tuple(tuple(map(int, s)) for s in self.kv_segments))
        object.__setattr__(self, "links", tuple(int(x) for x in self.links))
        H, G = self.num_heads, self.group_size
        if H < 1 or G < 1 or H % G:
            raise SpecError(f"Heads: {G} key/value heads must divide {H} query heads (both >= 1)")
        if self.links and len(self.links) != len(self.segments):
            raise SpecError(f"Heads: {len(self.links)} links for {len(self.segments)} segments")
        for j, k in enumerate(self.links):
            if k == -1:
                continue
            if not 0 <= k < len(self.kv_segments):
                raise SpecError(f"Heads: segment {j} links to kv segment {k}, which is absent")
            if self.kv_segments[k][1] != self.segments[j][1]:
                raise SpecError(f"Heads: segment {j} and its linked kv segment {k} differ in dims")
        for start, d in (*self.segments, *self.kv_segments):
            if start < 0 or d < 1:
                raise SpecError(f"Heads: bad segment ({start}, {d})")

    @property
    def group_size(self) -> int:
        """Number of key/value heads ``G``."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def heads_per_group(self) -> int:
        """Query heads per key/value head ``R = H / G``."""
        return self.num_heads // self.group_size

    def link(self, j: int) -> int:
        """The kv segment segment ``j`` shares its dims with, or ``-1``."""
        return self.links[j] if self.links else -1

    def extent(self) -> int:
        """One past the last unit any segment covers."""
        ends = [s + self.num_heads * d for s, d in self.segments]
        ends += [s + self.group_size * d for s, d in self.kv_segments]
        return max(ends, default=0)

    def unit_ranges(self) -> list[tuple[int, int]]:
        """``(start, stop)`` of every segment and kv segment."""
        out = [(s, s + self.num_heads * d) for s, d in self.segments]
        return out + [(s, s + self.group_size * d) for s, d in self.kv_segments]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; the fields left at their defaults are omitted."""
        d: dict[str, Any] = {
            "num_heads": self.num_heads,
            "segments": [list(x) for x in self.segments],
        }
        if self.num_kv_heads is not None:
            d["num_kv_heads"] = self.num_kv_heads
        if self.kv_segments:
            d["kv_segments"] = [list(x) for x in self.kv_segments]
        if self.links:
            d["links"] = list(self.links)
        if self.fixed:
            d["fixed"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Heads:
        """Inverse of :meth:`to_dict`."""
        kv = d.get("num_kv_heads")
        return cls(
            int(d["num_heads"]),
            tuple(tuple(x) for x in d["segments"]),
            None if kv is None else int(kv),
            tuple(tuple(x) for x in d.get("kv_segments", ())),
            tuple(d.get("links", ())),
            bool(d.get("fixed", False)),
        )

    def describe(self) -> str:
        """A short label: ``"4 heads"``, ``"8 heads / 2 kv"``, ``"4 heads, fixed order"``."""
        s = f"{self.num_heads} heads"
        if self.group_size != self.num_heads:
            s += f" / {self.group_size} kv"
        return s + (", fixed order" if self.fixed else "")


@dataclass
class HeadsMoves:
    """The factors of one valid heads permutation (positions are destinations, git re-basin's
    convention: ``sigma[g]`` is the key/value head of B placed at position ``g``).

    ``tau[g][r]``: the query head (within B's group ``sigma[g]``) placed at ``(g, r)``;
    ``kv_dims[k][g]``: dim permutation of kv segment ``k`` at head position ``g``;
    ``q_dims[j][h]``: dim permutation of unlinked segment ``j`` at query head position ``h``.
    """

    sigma: list[int]
    tau: list[list[int]]
    kv_dims: list[list[list[int]]]
    q_dims: list[list[list[int]]]


def assemble(heads: Heads, moves: HeadsMoves, n: int) -> Tensor:
    """The group permutation (``LongTensor (n,)``) made of ``moves``; other units stay."""
    p = torch.arange(n)
    R = heads.heads_per_group
    for k, (start, d) in enumerate(heads.kv_segments):
        for g in range(heads.group_size):
            src = start + moves.sigma[g] * d
            p[start + g * d : start + (g + 1) * d] = src + torch.tensor(moves.kv_dims[k][g])
    for j, (start, d) in enumerate(heads.segments):
        link = heads.link(j)
        for g in range(heads.group_size):
            for r in range(R):
                h = g * R + r
                src = start + (moves.sigma[g] * R + moves.tau[g][r]) * d
                dims = moves.kv_dims[link][g] if link >= 0 else moves.q_dims[j][h]
                p[start + h * d : start + (h + 1) * d] = src + torch.tensor(dims)
    return p


def random_moves(heads: Heads, gen: torch.Generator) -> HeadsMoves:
    """Uniformly random factors of a valid heads permutation."""
    G, R = heads.group_size, heads.heads_per_group

    def perm(n: int, free: bool = True) -> list[int]:
        return torch.randperm(n, generator=gen).tolist() if free else list(range(n))

    moving = not heads.fixed
    return HeadsMoves(
        sigma=perm(G, moving),
        tau=[perm(R, moving) for _ in range(G)],
        kv_dims=[[perm(d) for _ in range(G)] for _, d in heads.kv_segments],
        q_dims=[
            [perm(d) for _ in range(heads.num_heads)] if heads.link(j) < 0 else []
            for j, (_, d) in enumerate(heads.segments)
        ],
    )


def decompose(heads: Heads, p: Tensor) -> HeadsMoves:
    """The factors of ``p``; raises :class:`SpecError` unless ``p`` is a valid heads permutation
    (the inverse of :func:`assemble`)."""
    p = p.long().cpu()
    n = p.shape[0]
    G, R, H = heads.group_size, heads.heads_per_group, heads.num_heads
    sigma: list[int | None] = [None] * G
    tau: list[list[int | None]] = [[None] * R for _ in range(G)]

    def fix(table: list[Any], i: int, value: int, what: str) -> None:
        if table[i] is None:
            table[i] = value
        elif table[i] != value:
            raise SpecError(f"permutation {what}")

    def blocks(start: int, d: int, count: int) -> tuple[list[int], list[list[int]]]:
        b = p[start : start + count * d].view(count, d) - start
        src = b // d
        if (b < 0).any() or (src >= count).any() or not (src == src[:, :1]).all():
            raise SpecError("permutation splits a head (moves a dim into another head)")
        return src[:, 0].tolist(), (b - src[:, :1] * d).tolist()

    kv_dims: list[list[list[int]]] = []
    for start, d in heads.kv_segments:
        src, dims = blocks(start, d, G)
        for g in range(G):
            fix(sigma, g, src[g], "moves the key/value heads of two segments differently")
        kv_dims.append(dims)
    q_dims: list[list[list[int]]] = []
    for j, (start, d) in enumerate(heads.segments):
        src, dims = blocks(start, d, H)
        for h in range(H):
            g, r = divmod(h, R)
            sg, sr = divmod(src[h], R)
            msg = "moves heads of two segments differently (or a query head out of its group)"
            fix(sigma, g, sg, msg)
            fix(tau[g], r, sr, "moves the query heads of two segments differently")
            link = heads.link(j)
            if link >= 0 and dims[h] != kv_dims[link][g]:
                raise SpecError("permutation moves linked q dims unlike their key/value dims")
        q_dims.append(dims if heads.link(j) < 0 else [])
    sig = [g if s is None else s for g, s in enumerate(sigma)]
    ta = [[r if t is None else t for r, t in enumerate(row)] for row in tau]
    if sorted(sig) != list(range(G)) or any(sorted(t) != list(range(R)) for t in ta):
        raise SpecError("permutation maps two attention heads onto one")
    if heads.fixed and (sig != list(range(G)) or any(t != list(range(R)) for t in ta)):
        raise SpecError("permutation moves attention heads whose order is fixed (ALiBi)")
    moves = HeadsMoves(sig, ta, kv_dims, q_dims)
    if not torch.equal(assemble(heads, moves, n), p):
        raise SpecError("permutation moves units outside the attention segments")
    return moves
