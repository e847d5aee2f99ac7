"""Head resolution: which products ``heads ⊗ dims`` of the union-find become attention groups
(:class:`~modeconn.Heads`: multi-head, grouped-query and multi-query attention, rotary blocks,
relative-bias tables), after the walk. The attention ops' rules are in :mod:`.rules_attention`.

Interface (used by :mod:`.emit`): ``resolve_heads(V, param_classes, descs, full) -> HeadLayout``
pins what cannot be a head structure and returns the surviving attention groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..heads import Heads
from . import rules_attention  # noqa: F401 (registers the MHA / SDPA rules)
from .axes import AxisVars
from .head_dims import (
    _blockish,
    _carries,
    _core,
    _flatten,
    _parts,
    head_local,
    split_dims,
)
from .rules_attention import mha_rule, sdpa_rule

__all__ = ["HeadLayout", "resolve_heads", "mha_rule", "sdpa_rule"]


# ================================================================================================
# head resolution
# ================================================================================================
@dataclass
class HeadLayout:
    """The attention groups found by :func:`resolve_heads`.

    ``where[c] = (head class, first unit, units, block)`` for every class ``c`` (a root of the
    union-find) that lives in an attention group: its units are ``units`` consecutive units of
    the group starting at ``first unit``, and each owns ``block`` consecutive positions (a block of
    rotary-pinned q/k dims). ``heads[h]`` is the group's :class:`~modeconn.Heads` and
    ``size[h]`` its number of units. ``segments``/``seg_of`` are the older view (member classes and
    ``(start, head_dim)`` segments per head class; ``seg_of[c] = (head class, first unit)``).
    """

    segments: dict[int, tuple[list[int], list[tuple[int, int]]]] = field(default_factory=dict)
    seg_of: dict[int, tuple[int, int]] = field(default_factory=dict)
    where: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)
    heads: dict[int, Heads] = field(default_factory=dict)
    size: dict[int, int] = field(default_factory=dict)
    simple: set[int] = field(default_factory=set)  # groups the older view expresses
    # split[c] = (head class, heads, [(first unit, units per head, block)] per part): a class
    # ``[g, d]`` whose head dims are a direct sum (partial rotary: rotated ⊕ passed dims)
    split: dict[int, tuple[int, int, list[tuple[int, int, int]]]] = field(default_factory=dict)
    # (what, why, place, vars) for each attention structure pinned here: the walk's warnings
    notes: list[tuple[str, str, str, list[int]]] = field(default_factory=list)


class _Pattern:
    """How one candidate head class ``g`` occurs: as ``[g]``, ``[g, d]``, ``[g, r]``,
    ``[g, r, d]`` (``r``: query heads within a key/value head; ``d``: dims in a head), each
    optionally followed by pinned factors (rotary q/k dims: whole blocks)."""

    def __init__(self, g: int) -> None:
        self.g = g
        self.r: int | None = None
        self.lists: list[tuple[int, ...]] = []  # cores, in order of first appearance
        self.ok = True
        self.shared: set[int] = set()  # dims shared by every head (multi-query k/v dims)


def _patterns(V: AxisVars, prods: dict[int, list[int]], blocked: set[int]) -> dict[int, _Pattern]:
    """Candidate head classes and the shapes they occur in; ``ok`` False where not a head."""
    pats: dict[int, _Pattern] = {}
    for flat in prods.values():
        core, _ = _core(V, flat, lead=True)
        if len(core) >= 2 and V.find(core[0]) not in blocked:
            pats.setdefault(core[0], _Pattern(core[0]))
    for flat in prods.values():
        core, _ = _core(V, flat, lead=True)
        for x in flat:
            if x in pats and (
                not core or x != core[0] or flat.count(x) > 1 or any(V.pinned[y] for y in core)
            ):
                pats[x].ok = False  # a head class inside another structure, or a pinned middle
        if core and core[0] in pats:
            p = pats[core[0]]
            if len(core) > 3:
                p.ok = False
            elif len(core) == 3:
                if p.r not in (None, core[1]):
                    p.ok = False
                p.r = core[1]
            if tuple(core) not in p.lists:
                p.lists.append(tuple(core))
    return pats


def resolve_heads(
    V: AxisVars, param_classes: set[int], descs: list[tuple[int, ...]], full: bool = False
) -> HeadLayout:
    """Find the attention groups: the full symmetry of MHA, GQA and MQA where it is sound.

    A free class ``g`` (key/value heads; all heads in multi-head attention) that occurs only as
    the first factor of products ``[g]``, ``[g, d]``, ``[g, r]``, ``[g, r, d]`` (``r``: query heads
    within a key/value group, from ``repeat_kv``/``expand``; ``d``: dims in a head), each possibly
    followed by pinned factors, is an attention group (:class:`~modeconn.Heads`): ``g`` permutes
    key/value heads, ``r`` query heads within their group, and each ``d`` is permuted per head
    (per key/value head for dims that ``[g, d]`` shares with ``[g, r, d]``: the q dims with the
    k dims, the output projection's columns with the v dims). Pinned trailing factors (rotary
    q/k dims) become blocks: the head moves, its dims stay. This is sound only if every ``d`` is
    head-local (every tensor that carries ``d`` also carries ``g``, and ``r`` where the dims are
    per query head), no parameter axis or concatenation holds ``d`` or ``r`` alone, and they occur
    in no other structure; a ``d`` that fails is pinned (its head then moves as a block), an ``r``
    that fails is pinned with its dims (whole key/value groups move). A ``g`` that occurs
    inside another structure is left to the plain union-find (one permutation per class).

    Args:
        V: the union-find after the walk (closed and modified here: pins).
        param_classes: classes of parameter axes (``V.find`` of each).
        descs: every tensor's axis variables (for head locality).
        full: the caller emits every group through ``HeadLayout.where``/``heads``/``size``;
            without it only what the older ``segments``/``seg_of`` view expresses is kept
            (multi-head attention without rotary blocks; the rest is pinned to whole heads).

    Returns:
        The :class:`HeadLayout`.
    """
    while True:
        layout, pats = _resolve(V, param_classes, descs)
        if full:
            return layout
        legacy = [g for g in layout.heads if g not in layout.simple]
        if not legacy:
            return layout
        for g in legacy:  # the older view cannot express these: their heads move whole
            for core in pats[g].lists:
                for c in core[1:]:
                    V.pin(c, "dims inside a head (grouped-query or rotary attention)")


def _resolve(
    V: AxisVars, param_classes: set[int], descs: list[tuple[int, ...]]
) -> tuple[HeadLayout, dict[int, _Pattern]]:
    notes: list[tuple[str, str, str, list[int]]] = []
    cache: dict[int, list[int]] = {}
    while True:
        V.close()
        cache.clear()
        inner = {V.find(c) for r, (k, ch) in V.defn.items() if k == "prod" for c in ch}
        prods = {  # top-level products (nested ones are parts of these, or checked via descs)
            r: _flatten(V, r)
            for r, (k, _) in list(V.defn.items())
            if k == "prod" and V.find(r) == r and not V.pinned[r] and r not in inner
        }
        in_sum = {V.find(c) for r, (k, ch) in V.defn.items() if k == "sum" for c in ch}
        pcs = {V.find(v) for v in param_classes}
        blocked = set(V.defn) | in_sum  # a head class is an atom, no summand
        pats = _patterns(V, prods, blocked)
        changed = False
        for g, p in pats.items():
            if not p.ok or V.pinned[g] or g in V.defn:
                continue
            dims_q = {c[2] for c in p.lists if len(c) == 3}
            dims_kv = {c[1] for c in p.lists if len(c) == 2 and c[1] != p.r}
            bad: set[int] = set()
            quiet: set[int] = set()  # pinned without a warning: not attention dims
            if p.r is not None and (p.r in pcs or p.r in in_sum or p.r in V.defn):
                bad |= {p.r} | dims_q | dims_kv
            p.shared = set()
            split, in_split = split_dims(
                V, g, dims_kv if p.r is None else set(), pcs, prods, descs, cache, bad
            )
            for d in dims_q | dims_kv:
                if d in split:
                    if d in pcs or d in in_sum or not head_local(V, g, d, prods, descs, cache):
                        bad.add(d)
                    continue
                if d in V.defn or d in (g, p.r) or (d in in_sum and p.r is not None):
                    bad.add(d)
                    continue
                for flat in prods.values():
                    c = _core(V, flat, lead=True)[0]
                    if d in flat and (c[0] != g or c[-1] != d):
                        bad.add(d)
                        break
                if d in bad:
                    continue
                if p.r is None and any(
                    _carries(V, t, d, cache) and not _carries(V, t, g, cache) for t in descs
                ):  # k/v dims without a head axis: multi-query, the dims shared by every head
                    p.shared.add(d)
                    continue
                if d in pcs or (d in in_sum and d not in in_split):
                    bad.add(d)
                    if d not in in_sum:  # a weight axis holds them alone (grouped-conv inputs)
                        quiet.add(d)
                    continue
                need = [g] + ([p.r] if d in dims_q - dims_kv and p.r is not None else [])
                if any(
                    _carries(V, t, d, cache) and not all(_carries(V, t, c, cache) for c in need)
                    for t in descs
                ):
                    bad.add(d)
            for d in bad:
                if not V.pinned[V.find(d)]:
                    V.pin(d, "dims inside a head, shared with another structure")
                    if d not in quiet:
                        notes.append(_note(V, prods, d))
                    changed = True
        if not changed:
            changed = _one_free_factor(V, pats)
        if not changed:
            break
    layout = _layout(V, pats, param_classes)
    layout.notes = notes
    return layout, pats


def _note(V: AxisVars, prods: dict[int, list[int]], d: int) -> tuple[str, str, str, list[int]]:
    """A warning entry for pinned head dims: the attention module whose products carry them."""
    labels = {V.find(v): lab for v, lab in V.label.items()}
    carriers = [r for r, flat in prods.items() if d in flat]
    place = next((labels[r] for r in carriers if r in labels), "an attention block")
    why = "its dims inside a head also occur elsewhere; whole heads move"
    return ("attention", why, repr(place), carriers or [d])


def _one_free_factor(V: AxisVars, pats: dict[int, _Pattern]) -> bool:
    """Outside attention groups a product keeps one free factor (its outermost): two free factors
    of one axis would be two groups moving the same positions. Returns whether it pinned."""
    valid = {
        core
        for g, p in pats.items()
        if p.ok and not V.pinned[g] and g not in V.defn
        for core in p.lists
    }
    handled: set[int] = set()
    stack = [
        r
        for r, (k, _) in V.defn.items()
        if k == "prod" and V.find(r) == r and tuple(_core(V, _flatten(V, r), lead=True)[0]) in valid
    ]
    while stack:  # a group's products and every part of them
        r = V.find(stack.pop())
        if r not in handled:
            handled.add(r)
            d = V.defn.get(r)
            stack.extend(d[1] if d and d[0] == "prod" else ())
    changed = False
    for r, (k, _) in list(V.defn.items()):
        if k != "prod" or V.find(r) != r or V.pinned[r] or r in handled:
            continue
        free = [x for x in _flatten(V, r) if not V.pinned[x]]
        for x in free[1:]:
            V.pin(x, "inner factor of a product outside attention (dims shared by every block)")
            changed = True
    return changed


def _layout(V: AxisVars, pats: dict[int, _Pattern], param_classes: set[int]) -> HeadLayout:
    """Lay out the units of each valid head class: query-head segments, then key/value ones."""
    layout = HeadLayout()
    shared_of = {d: g for g, p in pats.items() if p.ok for d in p.shared}
    by_core: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    for r in range(len(V.parent)):
        if V.find(r) == r and not V.pinned[r]:
            core, block = _core(V, _flatten(V, r))
            if core and (core[0] in pats or core[0] in shared_of):
                by_core.setdefault(tuple(core), []).append((r, block))
    used: dict[int, list[tuple[int, ...]]] = {}
    for v in sorted(param_classes):  # the shapes parameters actually carry, first seen first
        _collect(V, v, pats, used, shared_of)
    for g, cores in used.items():
        p = pats[g]
        G = V.size[g]
        R = V.size[p.r] if p.r is not None else 1
        q = [c for c in cores if p.r is not None and len(c) >= 2 and c[1] == p.r]
        kv = [c for c in cores if c not in q]
        if p.r is None:  # multi-head: every segment is per head, but k/v dims shared by all
            q, kv = [c for c in cores if c[0] == g], [c for c in cores if c[0] != g]
        segs, kv_segs, links = [], [], []
        start = 0
        members: list[int] = []
        seg_at: dict[int, int] = {}  # multi-head: a head-dim class's segment (a part's, too)
        for c in q:
            parts = _parts(V, c[1]) if p.r is None and len(c) == 2 else None
            if parts is not None:  # head dims that are a direct sum: a segment per part
                placed = []
                for part in parts:
                    per, blk = (1, V.size[part]) if _blockish(V, part) else (V.size[part], 1)
                    if part not in seg_at:
                        seg_at[part] = start
                        segs.append((start, per))
                        start += G * per
                    placed.append((seg_at[part], per, blk))
                for r, block in by_core.get(c, []):
                    layout.split[r] = (g, G, [(st, n, blk * block) for st, n, blk in placed])
                members.append(_member(by_core.get(c, []), c))
                continue
            d = V.size[c[-1]] if len(c) == 3 or (p.r is None and len(c) == 2) else 1
            if p.r is None and len(c) == 2 and c[1] in seg_at:  # a part of a split dim
                _place(layout, by_core.get(c, []), (g, seg_at[c[1]], G * d))
                members.append(_member(by_core.get(c, []), c))
                continue
            if p.r is None and len(c) == 2:
                seg_at[c[1]] = start
            segs.append((start, d))
            _place(layout, by_core.get(c, []), (g, start, G * R * d))
            members.append(_member(by_core.get(c, []), c))
            start += G * R * d
        for c in kv:
            d = V.size[c[-1]] if len(c) == 2 or c[0] != g else 1
            n_kv = 1 if c[0] != g else G  # a multi-query segment: one key/value head
            kv_segs.append((start, d))
            _place(layout, by_core.get(c, []), (g, start, n_kv * d))
            members.append(_member(by_core.get(c, []), c))
            start += n_kv * d
        for c in q:
            d_cls = c[2] if len(c) == 3 else c[1] if p.r is None and len(c) == 2 else None
            links.append(
                next((k for k, c2 in enumerate(kv) if d_cls is not None and c2[-1] == d_cls), -1)
            )
        if p.r is None and kv_segs:
            heads = Heads(V.size[g], tuple(segs), 1, tuple(kv_segs), tuple(links))
        elif p.r is None:
            heads = Heads(G, tuple(segs))
        else:
            heads = Heads(
                G * R,
                tuple(segs),
                G,
                tuple(kv_segs),
                tuple(links) if any(x >= 0 for x in links) else (),
            )
        layout.heads[g] = heads
        layout.size[g] = start
        simple = (
            p.r is None
            and not kv
            and all(b == 1 and r not in layout.split for c in cores for r, b in by_core.get(c, []))
        )  # what the older view can express: multi-head, no blocks
        layout.segments[g] = (members, [*segs, *kv_segs])
        if simple:
            layout.simple.add(g)
        else:
            for c in cores:
                for r, _ in by_core.get(c, []):
                    layout.seg_of.pop(r, None)
    return layout


def _collect(
    V: AxisVars,
    v: int,
    pats: dict[int, _Pattern],
    used: dict[int, list[tuple[int, ...]]],
    shared_of: dict[int, int],
) -> None:
    r = V.find(v)
    if V.pinned[r]:
        return
    core, _ = _core(V, _flatten(V, r))
    if len(core) == 1 and core[0] in shared_of:  # multi-query k/v dims
        lst = used.setdefault(shared_of[core[0]], [])
        if tuple(core) not in lst:
            lst.append(tuple(core))
        return
    if core and core[0] in pats and pats[core[0]].ok and not V.pinned[core[0]]:
        lst = used.setdefault(core[0], [])
        if tuple(core) not in lst:
            lst.append(tuple(core))
        return
    d = V.defn.get(r)
    for c in d[1] if d else ():
        _collect(V, c, pats, used, shared_of)


def _member(classes: list[tuple[int, int]], core: tuple[int, ...]) -> int:
    """A class standing for one segment (for the older ``segments`` view and group labels)."""
    return next((r for r, block in classes if block == 1), classes[0][0] if classes else core[0])


def _place(layout: HeadLayout, classes: list[tuple[int, int]], key: tuple[int, int, int]) -> None:
    """Record where the classes of one segment (with their blocks) live."""
    g, start, n = key
    for r, block in classes:
        layout.where[r] = (g, start, n, block)
        if block == 1:
            layout.seg_of[r] = (g, start)
