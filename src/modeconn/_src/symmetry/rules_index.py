"""Rules of indexing and position ops: ``x[...]``, gather, index_select, roll, flip, narrow, tril.

Each pins only the axes whose positions it reads; the axes it does not touch keep their units
(``h[arange(B), eos]`` selects tokens and leaves the channel axis free; ``torch.roll`` over the
spatial axes of a Swin block leaves its channels free).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .registry import Call, Desc, rule
from .rules_shape import select
from .walk import Walk, is_t


def _dims(value: Any, rank: int) -> list[int] | None:
    if value is None:
        return None
    vals = value if isinstance(value, list | tuple) else [value]
    try:
        return [int(d) % rank for d in vals]
    except (TypeError, ValueError):
        return None


@rule("getitem")
def getitem(w: Walk, call: Call) -> Desc:
    """Basic and advanced indexing; the axes that are indexed are pinned, the others kept."""
    x, out_val = w.desc(call.args[0]), call.out
    idx = call.args[1]
    if isinstance(x, list):  # an element of a tuple/list of tensors
        i = w.value(idx)
        try:
            return x[i]
        except (TypeError, IndexError):
            return w.unknown(call, "unexpected index")
    if not is_t(x):
        return (
            w.from_value(out_val, True, "indexing an untracked value")
            if isinstance(out_val, Tensor)
            else None
        )
    if not isinstance(out_val, Tensor):
        return w.unknown(call, "unexpected result")
    index = w.value(idx)
    if not isinstance(index, tuple):
        index = (index,)
    if any(isinstance(i, list) for i in index):  # x[:, [0, 2]]: an index tensor, as numpy reads it
        try:
            index = tuple(torch.tensor(i) if isinstance(i, list) else i for i in index)
        except (TypeError, ValueError, RuntimeError):
            return w.unknown(call, "indexing with a list")

    def is_bool(i: Any) -> bool:
        return isinstance(i, Tensor) and i.dtype == torch.bool

    has_adv = any(isinstance(i, Tensor) for i in index)
    consumed = sum(
        i.dim() if is_bool(i) else 1 for i in index if i is not None and i is not Ellipsis
    )
    expanded: list[Any] = []
    for i in index:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (len(x) - consumed))
        else:
            expanded.append(i)
    out: list[int] = []  # basic axes of the result, in order
    adv_items: list[int] = []  # item numbers of advanced indices (tensors; ints among tensors)
    adv_out = 0  # basic result axes before the first advanced index
    pos = 0
    chosen: tuple[int, int] | None = None
    for k, i in enumerate(expanded):
        if i is None:
            out.append(w.V.new(1))
            continue
        if isinstance(i, Tensor) or (has_adv and isinstance(i, int)):
            n = i.dim() if isinstance(i, Tensor) and is_bool(i) else 1
            w.note(call, "indexes positions with a tensor", list(x[pos : pos + n]))
            if not adv_items:
                adv_out = len(out)
            adv_items.append(k)
            pos += n
            continue
        v = x[pos]
        size = w.V.size[v]
        pos += 1
        if isinstance(i, int):
            if v in w.selector:
                chosen = (v, i % size)
            elif size != 1:
                w.note(call, "selects one position", [v])
            continue
        if isinstance(i, slice):
            start, stop, step = i.indices(size)
            if start == 0 and stop == size and step == 1:
                out.append(v)
            elif step == 1 and stop > start:  # x[..., a:b]: the axis is pre ⊕ kept ⊕ post
                out.append(_sliced(w, v, start, stop))
            else:
                w.note(call, "keeps some positions", [v])
                out.append(w.V.new(len(range(start, stop, step)), True, why="a slice"))
            continue
        return w.unknown(call, "unexpected index")
    out.extend(x[pos:])
    if adv_items:  # numpy rules: adjacent advanced indices stay in place, else go first
        n_adv = out_val.dim() - len(out)
        if n_adv < 0:
            return w.unknown(call, "unexpected result")
        adjacent = adv_items == list(range(adv_items[0], adv_items[0] + len(adv_items)))
        at = adv_out if adjacent else 0
        adv = list(w.fresh(out_val.shape[at : at + n_adv], True, "positions of an index tensor"))
        out = out[:at] + adv + out[at:]
    if [w.V.size[v] for v in out] != list(out_val.shape):
        return w.unknown(call, "unexpected result shape")
    if chosen is not None:
        return select(w, tuple(out), *chosen)
    return tuple(out)


def _sliced(w: Walk, v: int, start: int, stop: int) -> int:
    """The kept part of ``v[start:stop]``, with ``v`` made a direct sum (as ``split`` does).

    The dropped parts are recorded in ``w.dropped``: one that nothing else reads (a causal mask
    buffer sliced to the sequence length) is pinned after the walk, see :func:`pin_dropped`.
    """
    V = w.V
    pre, mid, post = V.new(start), V.new(stop - start), V.new(V.size[v] - stop)
    w.dropped.extend([pre, post])
    w.tie(v, V.structure("sum", [pre, mid, post]))
    return mid


def pin_dropped(w: Walk) -> None:
    """Pin the parts of sliced axes that only slices dropped (positions the trace never read)."""
    V = w.V
    dropped = set(w.dropped)
    read = {V.find(v) for v in range(len(V.parent)) if v not in dropped}
    for v in w.dropped:
        if V.size[v] > 0 and V.find(v) not in read:
            V.pin(v, "positions a slice drops (never read)")


@rule("gather", "take_along_dim")
def gather(w: Walk, call: Call) -> Desc:
    """``out[..., i, ...] = x[..., index[..., i, ...], ...]`` along ``dim``: x's ``dim`` is pinned;
    every other axis of the same size in x, index and out is one axis."""
    x, out_val = w.desc(call.arg(0, "input")), call.out
    if call.name == "gather":
        dim, ind = w.value(call.arg(1, "dim")), w.desc(call.arg(2, "index"))
    else:
        ind, dim = w.desc(call.arg(1, "indices")), w.value(call.arg(2, "dim"))
    if not is_t(x) or not is_t(ind) or not isinstance(out_val, Tensor) or dim is None:
        return w.unknown(call, "unexpected arguments")
    if len(x) != len(ind) or out_val.dim() != len(x):
        return w.unknown(call, "unexpected ranks")
    dim = int(dim) % len(x)
    w.note(call, "reads positions given by an index", [x[dim]])
    out: list[int] = []
    for a, (u, v) in enumerate(zip(x, ind, strict=True)):
        if a != dim and w.V.size[u] == w.V.size[v]:
            w.tie(u, v)
            out.append(u)
        else:
            if a != dim:
                w.note(call, "reads part of an axis", [u])
            out.append(v)
    return tuple(out)


@rule("index_select", "narrow", "roll", "flip", "fliplr", "flipud", "rot90")
def positions(w: Walk, call: Call) -> Desc:
    """Ops that move or pick positions along given axes; the other axes pass through."""
    x, out_val = w.desc(call.args[0]), call.out
    if not is_t(x) or not isinstance(out_val, Tensor):
        return w.unknown(call, "unexpected input")
    n = len(x)
    name = call.name
    if name in ("index_select", "narrow"):
        dims = _dims(w.value(call.arg(1, "dim")), n)
    elif name == "roll":
        dims = _dims(w.value(call.arg(2, "dims")), n)
        if dims is None:  # roll over the flattened tensor: every axis
            dims = list(range(n))
    elif name == "flip":
        dims = _dims(w.value(call.arg(1, "dims")), n)
    elif name == "rot90":
        dims = _dims(w.value(call.arg(2, "dims", (0, 1))), n)
    else:
        dims = [1] if name == "fliplr" else [0]
    if dims is None:
        return w.unknown(call, "unexpected dims")
    w.note(call, "moves positions along the axes it acts on", [x[d] for d in dims])
    out = list(x)
    for d in dims:
        if w.V.size[x[d]] != out_val.shape[d]:
            out[d] = w.V.new(out_val.shape[d], True, why=name)
    return tuple(out)


@rule("tril", "triu")
def triangle(w: Walk, call: Call) -> Desc:
    """``tril``/``triu`` keep positions by their place in the last two axes (pinned)."""
    x = w.desc(call.args[0])
    if not is_t(x) or len(x) < 2:
        return w.unknown(call, "unexpected input")
    w.note(call, "keeps positions by their place", [x[-1], x[-2]])
    return x
