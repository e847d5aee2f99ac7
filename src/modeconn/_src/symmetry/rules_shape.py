"""Rules of shape ops: reshape/view/flatten, axis permutations, expand/repeat, cat/stack, split.

A row-major reshape splits and merges axes through products of variables (Conv -> Flatten ->
Linear gives each channel a block of ``H*W`` columns); ``cat`` and ``split`` make direct sums.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from torch import Tensor, fx

from .registry import Call, Desc, rule
from .walk import Walk, is_t


def _words(text: str) -> list[str]:
    return text.split()


SHAPE_ONLY = _words("""
    atleast_2d atleast_3d flatten reshape reshape_as squeeze unflatten unsqueeze view
    view_as
""")
PERMUTE = _words("""
    adjoint moveaxis movedim permute swapaxes swapdims t transpose
""")


# --- reshape -------------------------------------------------------------------------------------
@rule(*SHAPE_ONLY)
def reshape_rule(w: Walk, call: Call) -> Desc:
    """A row-major reshape of the first argument into the output's shape."""
    x, out_val = w.desc(call.arg(0, "input")), call.out
    if not is_t(x) or not isinstance(out_val, Tensor):
        return w.unknown(call, "unexpected input")
    if out_val.numel() != math.prod(w.V.size[v] for v in x):
        return w.unknown(call, "changes the number of elements")
    return reshape(w, x, out_val.shape, call.node)


def reshape(
    w: Walk, x: tuple[int, ...], out_shape: Sequence[int], node: fx.Node | None = None
) -> Desc:
    """Row-major reshape: split and merge axes through products of variables.

    An output axis that is only ever indexed by constants (``qkv.view(B, T, 3, H, d)`` then
    ``qkv[0]``/``unbind``) splits its atom into a direct sum of independent slices instead.
    """
    V = w.V
    atoms: list[int] = []

    def expand(v: int) -> None:
        d = V.defn_of(v)
        if d is not None and d[0] == "prod":
            for c in d[1]:
                expand(c)
        elif V.size[v] != 1:
            atoms.append(v)

    for v in x:
        expand(v)
    queue = list(atoms)
    out: list[int] = []
    ok = True
    j = 0
    while j < len(out_shape):
        s = out_shape[j]
        if s == 1:
            out.append(V.new(1))
            j += 1
            continue
        sel = _selector_split(w, node, queue, out_shape, j) if node is not None else None
        if sel is not None:
            out.extend(sel)
            j += len(sel)
            continue
        got: list[int] = []
        prod = 1
        while prod < s and queue:
            v = queue.pop(0)
            n = V.size[v]
            if s % (prod * n) == 0:
                got.append(v)
                prod *= n
                continue
            need = s // prod if s % prod == 0 else 0
            if need > 1 and n % need == 0:  # split this atom: v = a ⊗ rest
                a, rest = V.new(need), V.new(n // need)
                V.union(v, V.structure("prod", [a, rest]))
                got.append(a)
                queue.insert(0, rest)
                prod *= need
            else:
                ok = False
                break
        if not ok or prod != s:
            ok = False
            break
        out.append(got[0] if len(got) == 1 else V.structure("prod", got))
        j += 1
    if not ok or queue:
        why = "reshaped across axes in a way no permutation follows"
        for v in atoms:
            V.pin(v, why)
        return w.fresh(out_shape, True, why)
    return tuple(out)


def _selector_split(
    w: Walk, node: fx.Node, queue: list[int], out_shape: Sequence[int], j: int
) -> list[int] | None:
    V = w.V
    c = out_shape[j]
    if not queue or not 1 < c <= 64:
        return None
    n = V.size[queue[0]]
    d = V.defn_of(queue[0])  # none, or already c equal parts (q, k, v biases concatenated)
    if d is not None and not (
        d[0] == "sum" and len(d[1]) == c and all(V.size[p] * c == n for p in d[1])
    ):
        return None
    if n % c or n == c:
        return None
    rest, k, prod = n // c, j + 1, 1
    while k < len(out_shape) and prod < rest:
        prod *= out_shape[k]
        k += 1
    if prod != rest or not select_only(w, node, j, len(out_shape)):
        return None
    v = queue.pop(0)
    t = V.new(c, pinned=True, why="an index of slices (qkv[0], unbind)")
    sizes = list(out_shape[j + 1 : k])
    shared = [V.new(sz) for sz in sizes]
    slices = [[V.new(sz) for sz in sizes] for _ in range(c)]
    V.union(v, V.structure("sum", [V.structure("prod", ys) for ys in slices]))
    w.selector[t] = (shared, slices)
    return [t, *shared]


def select(w: Walk, d: tuple[int, ...], t: int, i: int) -> tuple[int, ...]:
    """Slice ``i`` of a selector axis: its shared variables become that slice's own."""
    shared, slices = w.selector[t]
    sub = dict(zip(shared, slices[i], strict=True))
    return tuple(sub.get(v, v) for v in d)


def select_only(w: Walk, node: fx.Node, axis: int, rank: int, depth: int = 0) -> bool:
    """Is ``axis`` of ``node`` only ever indexed by constants (``qkv[0]``, ``unbind``),
    through axis permutations? Then its slices are independent unit sets (timm-style qkv)."""
    if not node.users or depth > 6:
        return False
    for u in node.users:
        if not u.args or u.args[0] is not node:
            return False
        name = getattr(u.target, "__name__", u.target)
        if u.op in ("call_method", "call_function") and name == "contiguous":
            ok = select_only(w, u, axis, rank, depth + 1)
        elif u.op in ("call_method", "call_function") and name in PERMUTE:
            amap = axis_map(w, u, rank)
            ok = amap is not None and select_only(w, u, amap.index(axis), rank, depth + 1)
        elif u.target is operator.getitem:
            idx = w.value(u.args[1])
            idx = idx if isinstance(idx, tuple) else (idx,)
            ok = (
                len(idx) > axis
                and isinstance(idx[axis], int)
                and all(i == slice(None) for i in idx[:axis])
                and all(i == slice(None) for i in idx[axis + 1 :])
            )
        elif name == "unbind":
            dim = w.value(u.args[1] if len(u.args) > 1 else u.kwargs.get("dim", 0))
            ok = isinstance(dim, int) and dim % rank == axis
        else:
            ok = False
        if not ok:
            return False
    return True


# --- axis permutations -----------------------------------------------------------------------
def axis_map(w: Walk, node: fx.Node, n: int) -> list[int] | None:
    """For an axis permutation op, the input axis of each output axis (run on a probe)."""
    probe_shape = [2 + i for i in range(n)]
    probe = torch.empty(probe_shape, device="meta")
    try:
        if node.op == "call_function" and getattr(node.target, "__name__", "") == "getattr":
            res = getattr(probe, str(node.args[1]))
        else:
            rest = w.value(node.args[1:])
            kw = w.value(dict(node.kwargs))
            if node.op == "call_method":
                res = getattr(probe, str(node.target))(*rest, **kw)
            elif callable(node.target):
                res = node.target(probe, *rest, **kw)
            else:
                return None
        return [probe_shape.index(s) for s in res.shape]
    except Exception:  # noqa: BLE001 - any failure: unknown op
        return None


@rule(*PERMUTE)
def permute(w: Walk, call: Call) -> Desc:
    """``permute``, ``transpose``, ``movedim``, ``.T``, ...: the input's axes, reordered."""
    x = w.desc(call.args[0])
    amap = axis_map(w, call.node, len(x)) if is_t(x) else None
    if amap is None or not is_t(x):
        return w.unknown(call, "unexpected arguments")
    return tuple(x[i] for i in amap)


@rule("getattr")
def attribute(w: Walk, call: Call) -> Desc:
    """``x.T``/``x.mT`` permute axes, ``x.data`` is ``x``; metadata carries no axes."""
    x, attr = w.desc(call.args[0]), call.args[1]
    if attr in ("T", "mT") and is_t(x):
        return permute(w, call)
    if attr == "data" and is_t(x):
        return x
    return None if not isinstance(call.out, Tensor) else w.unknown(call, f"attribute .{attr}")


# --- expand, repeat ------------------------------------------------------------------------------
@rule("expand", "expand_as", "broadcast_to")
def expand(w: Walk, call: Call) -> Desc:
    """Broadcasting to a larger shape: the existing axes pass through."""
    x, out_val = w.desc(call.args[0]), call.out
    if not is_t(x) or not isinstance(out_val, Tensor):
        return w.unknown(call, "unexpected input")
    n = len(out_val.shape)
    out = []
    for i, s in enumerate(out_val.shape):
        j = len(x) - n + i
        out.append(x[j] if j >= 0 and w.V.size[x[j]] == s else w.V.new(s))
    return tuple(out)


@rule("repeat")
def repeat(w: Walk, call: Call) -> Desc:
    """Tiled copies: a repeated axis is (pinned copy index) ⊗ (the original axis)."""
    x, out_val = w.desc(call.args[0]), call.out
    if not is_t(x) or not isinstance(out_val, Tensor):
        return w.unknown(call, "unexpected input")
    n = len(out_val.shape)
    out = []
    for i, s in enumerate(out_val.shape):
        j = len(x) - n + i
        if j < 0:
            out.append(w.V.new(s))
        elif w.V.size[x[j]] == s:
            out.append(x[j])
        else:
            tile = w.V.new(s // w.V.size[x[j]], pinned=True, why="the copy index of repeat")
            out.append(w.V.structure("prod", [tile, x[j]]))
    return tuple(out)


# --- cat, stack, split -------------------------------------------------------------------------
@rule("cat", "concat", "concatenate")
def cat(w: Walk, call: Call) -> Desc:
    """Concatenation: the joined axis is the direct sum of the parts; the others are tied."""
    tensors = w.desc(call.arg(0, "tensors"))
    dim = w.value(call.arg(1, "dim", call.kwargs.get("axis", 0)))
    out_val = call.out
    if not isinstance(tensors, list) or not isinstance(out_val, Tensor):
        return w.unknown(call, "unexpected operands")
    if not all(is_t(t) and len(t) == out_val.dim() for t in tensors):
        return w.unknown(call, "operands of another rank or untracked")
    nd = out_val.dim()
    dim = dim % nd
    others = [tuple(t[:dim]) + tuple(t[dim + 1 :]) for t in tensors]
    shape = list(out_val.shape)
    del shape[dim]
    b = w.broadcast(others, shape)
    parts = [t[dim] for t in tensors if w.V.size[t[dim]] > 0]
    s = w.V.structure("sum", parts) if parts else w.V.new(0)
    return tuple(b[:dim]) + (s,) + tuple(b[dim:])


@rule("stack")
def stack(w: Walk, call: Call) -> Desc:
    """Stacking: the operands are tied; the new axis indexes them (pinned)."""
    tensors = w.desc(call.arg(0, "tensors"))
    dim = w.value(call.arg(1, "dim", 0))
    out_val = call.out
    if not isinstance(tensors, list) or not all(is_t(t) for t in tensors):
        return w.unknown(call, "unexpected operands")
    dim = dim % out_val.dim()
    shape = list(out_val.shape)
    del shape[dim]
    b = w.broadcast(tensors, shape)
    new = w.V.new(out_val.shape[dim], pinned=True, why="the index of stacked tensors")
    return tuple(b[:dim]) + (new,) + tuple(b[dim:])


@rule("chunk", "split", "tensor_split", "split_with_sizes", "unbind")
def split(w: Walk, call: Call) -> Desc:
    """Splitting an axis into parts makes it their direct sum; ``unbind`` pins it (or selects)."""
    x, out_val = w.desc(call.args[0]), call.out
    if (
        not is_t(x)
        or not isinstance(out_val, tuple | list)
        or not all(isinstance(o, Tensor) for o in out_val)
    ):
        return w.unknown(call, "unexpected operands")
    if call.name == "unbind":
        dim = w.value(call.arg(1, "dim", 0)) % len(x)
        rest = tuple(x[:dim]) + tuple(x[dim + 1 :])
        if x[dim] in w.selector:
            return [select(w, rest, x[dim], i) for i in range(len(out_val))]
        w.pin(x[dim], "unbind (each slice is its own tensor)")
        return [rest for _ in out_val]
    dim = w.value(call.arg(2, "dim", 0)) % len(x)
    parts = [w.V.new(o.shape[dim]) for o in out_val]
    w.tie(x[dim], w.V.structure("sum", [p for p in parts if w.V.size[p] > 0]))
    return [tuple(x[:dim]) + (p,) + tuple(x[dim + 1 :]) for p in parts]
