"""From the union-find to a PermutationSpec: groups, slots, heads, sites, names and pin reasons.

Each free class with parameter axes becomes one group; each surviving ``heads ⊗ dims`` product
(see :mod:`.attention`) becomes an attention group. A parameter axis that is a sum or product of
classes gets one slot per part (offset/block/repeats); a pinned axis gets the reason it is pinned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import fx, nn

from ..spec import PermutationSpec, Site, Slot
from .attention import HeadLayout, resolve_heads
from .rules_index import pin_dropped
from .rules_shape import PERMUTE, SHAPE_ONLY
from .walk import Walk, is_t

__all__ = ["emit_spec"]


def emit_spec(w: Walk) -> PermutationSpec:
    """Close the union-find, resolve attention heads, and write the spec."""
    pin_dropped(w)
    param_classes = {v for d in w.param_vars.values() for v in d}
    layout = resolve_heads(w.V, param_classes, w.all_descs, full=True)
    for what, why, place, touched in layout.notes:  # attention dims pinned by head resolution
        w.pending.setdefault(what, []).append((why, place, touched))
    w.flush_warnings()
    return _Emitter(w, layout).spec()


class _Emitter:
    def __init__(self, w: Walk, layout: HeadLayout) -> None:
        self.w = w
        self.V = w.V
        self.segments = layout.segments
        self.seg_of = layout.seg_of
        self.layout = layout

    def spec(self) -> PermutationSpec:
        V = self.V
        first: dict[int, int] = {}
        for v in range(len(V.parent)):
            first.setdefault(V.find(v), len(first))
        self.slots: dict[Any, list[Slot]] = {}
        pins: dict[str, dict[int, str]] = {}
        for tid, vars_ in self.w.param_vars.items():
            keys = self.w.param_keys.get(tid)
            if not keys:
                continue
            for axis, v in enumerate(vars_):
                placed: list[tuple[Any, dict[str, int]]] = []
                self.emit(v, 0, 1, V.size[v], 1, placed)
                for key in keys:
                    for g, kw in placed:
                        self.slots.setdefault(g, []).append(Slot(key, axis, **kw))
                    if not placed and V.size[v] > 1:
                        pins.setdefault(key, {})[axis] = self.why(v) or "not permutable"
        gkeys = sorted(self.slots, key=lambda g: first[g[1]])
        labels = self.group_labels()
        names = _unique_names([self.name_group(g, labels) for g in gkeys])
        self.gname = dict(zip(gkeys, names, strict=True))
        groups = {self.gname[g]: self.group_size(g) for g in gkeys}
        slots = {self.gname[g]: tuple(self.slots[g]) for g in gkeys}
        heads = {self.gname[g]: self.layout.heads[g[1]] for g in gkeys if g[0] == "heads"}
        spec = PermutationSpec(groups=groups, slots=slots, sites=self.make_sites(), heads=heads)
        spec.pins = pins
        return spec

    def why(self, v: int) -> str | None:
        """Why (a part of) this axis is pinned."""
        V = self.V
        r = V.find(v)
        if V.pinned[r]:
            return V.why.get(r)
        d = V.defn.get(r)
        for c in d[1] if d else ():
            got = self.why(c)
            if got:
                return got
        return None

    # --- slots ----------------------------------------------------------------------------------
    def emit(self, v: int, offset: int, reps: int, stride: int, block: int, out: list[Any]) -> None:
        V = self.V
        r = V.find(v)
        n = V.size[r]
        if V.pinned[r] or n == 0:
            return
        split = self.layout.split.get(r)
        if split is not None:  # heads whose dims are a direct sum: each part's units, per head
            a, heads, parts = split
            per_head = sum(n * blk for _, n, blk in parts)
            pos = 0
            for st, n, blk in parts:  # one slot per part: runs of n units, one run per head
                run = {"chunk": n, "period": per_head * block} if heads > 1 else {}
                at = offset + pos * block
                self._place(("heads", a), at, reps, stride, block * blk, st, heads * n, out, run)
                pos += n * blk
            return
        hit = self.layout.where.get(r)
        if hit is not None:
            a, start, units, blk = hit
            self._place(("heads", a), offset, reps, stride, block * blk, start, units, out)
            return
        d = V.defn.get(r)
        if d is None:
            if n > 1:
                self._place(("plain", r), offset, reps, stride, block, 0, None, out)
            return
        kind, ch = d
        if kind == "sum":
            acc = 0
            for c in ch:
                self.emit(c, offset + acc * block, reps, stride, block, out)
                acc += V.size[c]
            return
        a, b = ch
        nb = V.size[b]
        self.emit(a, offset, reps, stride, block * nb, out)
        for k in range(reps):
            self.emit(b, offset + k * stride, V.size[a], nb * block, block, out)

    def _place(
        self,
        g: Any,
        offset: int,
        reps: int,
        stride: int,
        block: int,
        unit_start: int,
        length: int | None,
        out: list[Any],
        run: dict[str, int] | None = None,
    ) -> None:
        n = length if length is not None else self.V.size[g[1]]
        kw = {"offset": offset, "block": block, "unit_start": unit_start, "length": length}
        kw.update(run or {})
        if reps == 1 or (stride == n * block and not run):
            out.append((g, _clean({**kw, "repeats": reps})))
        else:
            for k in range(reps):
                out.append((g, _clean({**kw, "offset": offset + k * stride, "repeats": 1})))

    def group_size(self, g: Any) -> int:
        if g[0] == "heads":
            return self.layout.size[g[1]]
        return self.V.size[g[1]]

    # --- names ----------------------------------------------------------------------------------
    def group_labels(self) -> dict[Any, list[str]]:
        V = self.V
        by_root: dict[int, list[str]] = {}
        for v in sorted(V.label):
            by_root.setdefault(V.find(v), []).append(V.label[v])
        out: dict[Any, list[str]] = {}
        for g in self.slots:
            if g[0] == "heads":
                labs: list[str] = []
                for m in self.segments[g[1]][0]:
                    labs += by_root.get(m, [])
                out[g] = labs + by_root.get(g[1], [])
            else:
                out[g] = by_root.get(g[1], [])
        return out

    def name_group(self, g: Any, labels: dict[Any, list[str]]) -> str:
        params = [s.param for s in self.slots[g]]
        first = (
            params[0].rsplit(".", 1)[0] if params[0].endswith((".weight", ".bias")) else params[0]
        )
        if g[0] == "heads":  # where its projections live, e.g. "blocks.0.attn"
            mods = list(dict.fromkeys(p.rsplit(".", 1)[0] for p in params))
            return _common_prefix(mods) or first
        labs = list(dict.fromkeys(labels.get(g, [])))
        if not labs:
            return first
        if len(labs) == 1:
            return labs[0]
        prefix = _common_prefix(labs)  # where its producers live
        if any(self.V.find(v) == g[1] for v in self.w.residual):
            return f"{prefix}.stream" if prefix else "stream"
        return prefix or labs[0]

    # --- sites ----------------------------------------------------------------------------------
    def site_parts(self, v: int, offset: int) -> list[tuple[Any, int, int, int | None]] | None:
        V = self.V
        r = V.find(v)
        if V.pinned[r] or r in self.layout.split:
            return []
        hit = self.layout.where.get(r)
        if hit is not None:
            a, start, units, blk = hit
            return [(("heads", a), offset, start, units)] if blk == 1 else []
        d = V.defn.get(r)
        if d is None:
            return [(("plain", r), offset, 0, None)] if ("plain", r) in self.gname else []
        if d[0] == "sum":
            out: list[Any] = []
            acc = offset
            for c in d[1]:
                p = self.site_parts(c, acc)
                if p is None:
                    return None
                out += p
                acc += V.size[c]
            return out
        return None

    def make_sites(self) -> dict[str, tuple[Site, ...]]:
        nodes = {n.name: n for n in self.w.tr.gm.graph.nodes}
        sites: dict[str, list[Site]] = {}
        seen: set[tuple[str, Site]] = set()
        for c in self.w.candidates:
            parts = self.site_parts(c.var, 0)
            node_name, axis, rank = c.node, c.axis, c.rank
            if parts is None:  # e.g. a flattened conv map: find the tensor before the reshape
                found = self._site_before_reshape(nodes[c.node], c.var)
                if found is None:
                    continue
                node_name, axis, rank, parts = found
            for g, off, start, length in parts:
                if g not in self.gname or (g[0] == "plain" and c.kind != "in"):
                    continue
                name = self.gname[g]
                ax = -1 if axis == rank - 1 else axis
                site = Site(node_name, ax, off, start, length)
                if (name, site) not in seen:
                    seen.add((name, site))
                    sites.setdefault(name, []).append(site)
        return {g: tuple(s) for g, s in sites.items()}

    def _site_before_reshape(self, node: fx.Node, var: int) -> Any:
        V = self.V
        wanted = set()
        stack = [var]
        while stack:
            r = V.find(stack.pop())
            d = V.defn.get(r)
            if d is not None and r not in self.layout.where:
                stack.extend(d[1])
            elif not V.pinned[r]:
                wanted.add(r)
        cur = node
        for _ in range(8):
            d = self.w.descs.get(cur)
            if is_t(d):
                for i, v in enumerate(d):
                    r = V.find(v)
                    if r in wanted:
                        parts = self.site_parts(r, 0)
                        if parts:
                            return cur.name, i, len(d), parts
            name = getattr(cur.target, "__name__", cur.target)
            shape_op = (
                cur.op in ("call_method", "call_function")
                and (name in SHAPE_ONLY or name in PERMUTE or name == "contiguous")
            ) or (
                cur.op == "call_module"
                and isinstance(
                    self.w.root.get_submodule(str(cur.target)), nn.Flatten | nn.Unflatten
                )
            )
            if not shape_op or not cur.args or not isinstance(cur.args[0], fx.Node):
                return None
            cur = cur.args[0]
        return None


def _clean(kw: dict[str, Any]) -> dict[str, Any]:
    out = dict(kw)
    if out.get("length") is None:
        out.pop("length", None)
    return out


def _common_prefix(labels: Sequence[str]) -> str:
    parts = [label.split(".") for label in labels]
    out: list[str] = []
    for items in zip(*parts, strict=False):
        if all(x == items[0] for x in items):
            out.append(items[0])
        else:
            break
    return ".".join(out)


def _unique_names(names: Sequence[str]) -> list[str]:
    count: dict[str, int] = {}
    for n in names:
        count[n] = count.get(n, 0) + 1
    seen: dict[str, int] = {}
    out = []
    for n in names:
        if count[n] == 1:
            out.append(n)
        else:
            seen[n] = seen.get(n, 0) + 1
            out.append(f"{n}.{seen[n] - 1}")
    return out
