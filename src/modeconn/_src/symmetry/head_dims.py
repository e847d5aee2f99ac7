"""Head-dim helpers of head resolution: products and their cores, and head dims that are a
direct sum (partial rotary: rotated ⊕ passed dims; GPT-NeoX's q ⊕ k ⊕ v fused per head)."""

from __future__ import annotations

from .axes import AxisVars

__all__ = ["head_local", "split_dims"]


def _flatten(V: AxisVars, v: int) -> list[int]:
    """The factors of a class: a product's children, recursively (sums and atoms stay whole)."""
    r = V.find(v)
    d = V.defn.get(r)
    if d is None or d[0] != "prod":
        return [r]
    return [x for c in d[1] for x in _flatten(V, c)]


def _parts(V: AxisVars, d: int) -> list[int] | None:
    """The parts of a head dim class that is a direct sum (nested sums flattened; a pinned part
    stays whole), or None if ``d`` is not a sum or a free part has a product structure."""
    r = V.find(d)
    k = V.defn.get(r)
    if k is None or k[0] != "sum" or V.pinned[r]:
        return None
    out: list[int] = []
    for c in k[1]:
        c = V.find(c)
        if _blockish(V, c) or c not in V.defn:
            out.append(c)
        elif V.defn[c][0] == "sum":
            sub = _parts(V, c)
            if sub is None:
                return None
            out += sub
        else:
            return None
    return out


def _blockish(V: AxisVars, c: int) -> bool:
    """A part that moves whole with its head: pinned (rotary dims), or made of single
    positions only (a rotary half of one dim: nothing in it to permute)."""
    r = V.find(c)
    if V.pinned[r] or V.size[r] == 1:
        return True
    k = V.defn.get(r)
    return k is not None and k[0] == "sum" and all(_blockish(V, x) for x in k[1])


def _sums_in(V: AxisVars, d: int) -> set[int]:
    """``d`` and the sums nested in it."""
    r = V.find(d)
    k = V.defn.get(r)
    if k is None or k[0] != "sum":
        return set()
    return {r}.union(*(_sums_in(V, c) for c in k[1]))


def _core(V: AxisVars, flat: list[int], lead: bool = False) -> tuple[list[int], int]:
    """``flat`` without its trailing pinned factors, and their total size (the block); with
    ``lead`` also without leading pinned factors (a batch axis merged with the heads, ``b*h``)."""
    block = 1
    core = list(flat)
    while core and V.pinned[core[-1]]:
        block *= V.size[core.pop()]
    while lead and core and V.pinned[core[0]]:
        core.pop(0)
    return core, block


def _carries(V: AxisVars, desc: tuple[int, ...], c: int, cache: dict[int, list[int]]) -> bool:
    for v in desc:
        r = V.find(v)
        if r not in cache:
            cache[r] = _flatten(V, r)
        if c in cache[r]:
            return True
    return False


def head_local(
    V: AxisVars,
    g: int,
    c: int,
    prods: dict[int, list[int]],
    descs: list[tuple[int, ...]],
    cache: dict[int, list[int]],
) -> bool:
    """Every product holding ``c`` is ``[g, c]`` (pinned factors aside) and every tensor that
    carries ``c`` also carries the head axis ``g``."""
    return not any(
        c in flat and _core(V, flat, lead=True)[0] != [g, c] for flat in prods.values()
    ) and not any(_carries(V, t, c, cache) and not _carries(V, t, g, cache) for t in descs)


def split_dims(
    V: AxisVars,
    g: int,
    dims: set[int],
    pcs: set[int],
    prods: dict[int, list[int]],
    descs: list[tuple[int, ...]],
    cache: dict[int, list[int]],
    bad: set[int],
) -> tuple[set[int], set[int]]:
    """The head dims of ``g`` that are direct sums, and their head-local free parts.

    A split dim whose free part is a parameter axis, a part of another sum, or not head-local is
    added to ``bad`` (pinned by the caller: its heads then move whole). Parts made of single
    positions or pinned (rotary) move whole with their head (one unit, a block).
    """
    split = {d for d in dims if _parts(V, d) is not None}
    nested = set().union(*(_sums_in(V, d) for d in split))
    sums = [(V.find(r), {V.find(x) for x in ch}) for r, (k, ch) in V.defn.items() if k == "sum"]
    for d in split:
        for c in _parts(V, d) or []:
            if _blockish(V, c):
                continue
            if (
                c in pcs
                or any(r not in nested and c in ch for r, ch in sums)
                or not head_local(V, g, c, prods, descs, cache)
            ):
                bad.add(d)
                break
    in_split = {c for d in split - bad for c in _parts(V, d) or [] if not _blockish(V, c)}
    return split, in_split
