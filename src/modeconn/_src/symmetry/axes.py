"""Union-find over tensor-axis variables, with sum/product structure and the reason for each pin.

Every axis of every tensor in a trace gets a variable. Rules relate them:

- *tie* ``a ~ b``: the two axes are reordered by the same permutation;
- *pin* ``a``: the axis is never reordered (the reason is kept for ``PermutationSpec.table``);
- *structure*: an axis is a direct sum of others (``cat``, ``split``, fused q/k/v: ``a = b ⊕ c``)
  or their row-major product (``view``/``flatten``: ``a = b ⊗ c``).

Ties merge classes with congruence (two axes with the same structure over the same classes are
one class); pins spread to every tied class and down the structure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["AxisVars"]


class AxisVars:
    """The union-find: ``new`` makes a variable, ``union`` ties, ``pin`` pins, ``close`` spreads.

    Example:
        >>> V = AxisVars()
        >>> a, b = V.new(4), V.new(4)
        >>> V.union(a, b); V.pin(b, "network output"); V.is_pinned(a), V.reason(a)
        (True, 'network output')
    """

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.pinned: list[bool] = []
        self.why: dict[int, str] = {}  # root -> why it is pinned (the first reason given)
        self.defn: dict[int, tuple[str, tuple[int, ...]]] = {}  # root -> ("sum"|"prod", children)
        self.label: dict[int, str] = {}  # var -> producer label (module path / param name)

    def new(
        self, size: int, pinned: bool = False, *, label: str | None = None, why: str | None = None
    ) -> int:
        v = len(self.parent)
        self.parent.append(v)
        self.size.append(int(size))
        self.pinned.append(pinned)
        if pinned and why:
            self.why[v] = why
        if label:
            self.label[v] = label
        return v

    def find(self, v: int) -> int:
        root = v
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[v] != root:
            self.parent[v], v = root, self.parent[v]
        return root

    def pin(self, v: int, why: str | None = None) -> None:
        r = self.find(v)
        if why and (not self.pinned[r] or r not in self.why):
            self.why[r] = why
        self.pinned[r] = True

    def is_pinned(self, v: int) -> bool:
        return self.pinned[self.find(v)]

    def reason(self, v: int) -> str | None:
        """Why the class of ``v`` is pinned (None if free, or if no rule said)."""
        r = self.find(v)
        return self.why.get(r) if self.pinned[r] else None

    def structure(self, kind: str, children: Sequence[int]) -> int:
        """A new variable equal to the sum/product of ``children`` (trivial factors dropped)."""
        ch = [c for c in children if self.size[c] != (1 if kind == "prod" else 0)]
        if len(ch) == 1:
            return ch[0]
        if kind == "prod" and len(ch) > 2:  # canonical: right-nested binary products
            ch = [ch[0], self.structure("prod", ch[1:])]
        total = (
            math.prod(self.size[c] for c in ch) if kind == "prod" else sum(self.size[c] for c in ch)
        )
        v = self.new(total)
        if ch:
            self.defn[v] = (kind, tuple(ch))
        return v

    def _merge_pin(self, ra: int, rb: int) -> None:
        self.pinned[ra] = self.pinned[ra] or self.pinned[rb]
        if ra not in self.why and rb in self.why:
            self.why[ra] = self.why[rb]

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:  # cannot happen for sound rules; stay safe
            self.pin(ra, "axes of different sizes were tied")
            self.pin(rb, "axes of different sizes were tied")
            return
        da, db = self.defn.pop(ra, None), self.defn.pop(rb, None)
        self.parent[rb] = ra
        self._merge_pin(ra, rb)
        if da and db:
            same = (
                da[0] == db[0]
                and len(da[1]) == len(db[1])
                and all(self.size[x] == self.size[y] for x, y in zip(da[1], db[1], strict=True))
            )
            self.defn[self.find(ra)] = da
            if same:
                for x, y in zip(da[1], db[1], strict=True):
                    self.union(x, y)
            else:  # two incompatible structures: no permutation respects both
                why = "split into parts in two incompatible ways"
                self.pin(ra, why)
                for c in (*da[1], *db[1]):
                    self.pin(c, why)
        elif da or db:
            self.defn[self.find(ra)] = da or db  # type: ignore[assignment]

    def defn_of(self, v: int) -> tuple[str, tuple[int, ...]] | None:
        return self.defn.get(self.find(v))

    def close(self) -> None:
        """Spread pins down (and up, when all parts are pinned); merge congruent structures."""
        changed = True
        while changed:
            changed = False
            table: dict[tuple[Any, ...], int] = {}
            for r in list(self.defn):
                if r not in self.defn or self.find(r) != r:
                    continue
                kind, ch = self.defn[r]
                if self.pinned[r]:
                    for c in ch:
                        if not self.is_pinned(c):
                            self.pin(c, self.why.get(r))
                            changed = True
                elif all(self.is_pinned(c) for c in ch):
                    self.pin(r, self.reason(ch[0]))
                    changed = True
                key = (kind, tuple(self.find(c) for c in ch))
                other = table.get(key)
                if other is not None and self.find(other) != self.find(r):
                    self.union(other, r)
                    changed = True
                else:
                    table[key] = r
