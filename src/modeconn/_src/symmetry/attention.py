"""Attention: the rules of ``nn.MultiheadAttention`` and ``scaled_dot_product_attention``, and head
resolution (which products ``heads ⊗ dims`` of the union-find become :class:`~..spec.Heads`).

Interface (used by :mod:`.walk` and :mod:`.emit`):

- ``mha_rule(w, call)`` and ``sdpa_rule(w, call)``: rules in the registry's signature;
- ``resolve_heads(V, param_classes, descs) -> HeadLayout``: pins what cannot be a head structure
  and returns the surviving attention groups.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch.nn.functional as F
from torch import Tensor, nn

from .axes import AxisVars
from .registry import Call, Desc, rule

if TYPE_CHECKING:
    from .walk import Walk

__all__ = ["HeadLayout", "resolve_heads", "mha_rule", "sdpa_rule"]


def _is_t(d: Desc) -> bool:
    return isinstance(d, tuple)


# ================================================================================================
# rules
# ================================================================================================
@rule(nn.MultiheadAttention)
def mha_rule(w: Walk, call: Call) -> Desc:
    """``nn.MultiheadAttention``: heads ⊗ q/k dims and heads ⊗ v dims, fused or separate weights."""
    m = cast(nn.MultiheadAttention, call.module)
    try:
        bound = inspect.signature(m.forward).bind(*call.args, **call.kwargs)
    except TypeError:
        return w.unknown(call, "unexpected arguments")
    bound.apply_defaults()
    args = bound.arguments
    q, k, v = (w.desc(args[n]) for n in ("query", "key", "value"))
    out_val = call.out
    if not (_is_t(q) and _is_t(k) and _is_t(v)) or not isinstance(out_val, tuple):
        return w.unknown(call, "unexpected inputs")
    V = w.V
    path = call.label
    H = m.num_heads
    d = m.head_dim
    h = V.new(H, label=path)
    dqk, dv = V.new(d), V.new(d)
    Q = V.structure("prod", [h, dqk])
    Vv = V.structure("prod", [h, dv])
    V.label.setdefault(Q, path)
    V.label.setdefault(Vv, path)
    if m._qkv_same_embed_dim:
        W = w.pvars(m.in_proj_weight)
        w.tie(W[0], V.structure("sum", [Q, Q, Vv]))
        for t in (q, k, v):
            w.tie(t[-1], W[1])
    else:
        for t, wt, row in (
            (q, m.q_proj_weight, Q),
            (k, m.k_proj_weight, Q),
            (v, m.v_proj_weight, Vv),
        ):
            Wt = w.pvars(wt)
            w.tie(Wt[0], row)
            w.tie(t[-1], Wt[1])
    if m.in_proj_bias is not None:
        w.tie(w.pvars(m.in_proj_bias)[0], V.structure("sum", [Q, Q, Vv]))
    if m.bias_k is not None:
        assert m.bias_v is not None  # add_bias_kv sets both
        w.tie(w.pvars(m.bias_k)[-1], Q)
        w.tie(w.pvars(m.bias_v)[-1], Vv)
    Wo = w.pvars(m.out_proj.weight)
    w.tie(Wo[1], Vv)
    out = Wo[0]
    V.label.setdefault(out, path + ".out_proj")
    if m.out_proj.bias is not None:
        w.tie(out, w.pvars(m.out_proj.bias)[0])
    # sequence and batch axes: query's for the output, key's == value's
    for a, b in zip(k[:-1], v[:-1], strict=False):
        w.tie(a, b)
    mask = w.desc(args.get("attn_mask"))
    if _is_t(mask) and len(mask) == 3:  # per-head masks (N*H, L, S): heads stay in place
        w.pin(h, f"per-head attn_mask of {path}")
    w.candidate(args["query"], -1, q[-1])
    res_attn = tuple(q[:-1]) + (out,)
    weights = out_val[1]
    if isinstance(weights, Tensor):
        wd = w.fresh(weights.shape)
        if weights.dim() == 4:
            w.tie(wd[1], h)
        for u in wd:
            w.pin(u, "attention weights (query/key positions)")
        return [res_attn, wd]
    return [res_attn, None]


@rule(F.scaled_dot_product_attention)
def sdpa_rule(w: Walk, call: Call) -> Desc:
    """``softmax(q kᵀ + mask) v``: q/k share their last axis, k/v their sequence axis."""
    q, k, v = (w.desc(call.arg(i, n)) for i, n in enumerate(("query", "key", "value")))
    out_val = call.out
    if not (_is_t(q) and _is_t(k) and _is_t(v)) or not isinstance(out_val, Tensor):
        return w.unknown(call, "unexpected inputs")
    if (
        call.kwargs.get("enable_gqa")
        and w.value(call.arg(1, "key")).shape != w.value(call.arg(0, "query")).shape
    ):
        return w.unknown(call, "grouped-query attention")
    n = len(out_val.shape)
    batch = w.broadcast([q[:-2], k[:-2], v[:-2]], out_val.shape[:-2])
    w.tie(q[-1], k[-1])
    w.tie(k[-2], v[-2])
    mask = w.desc(call.arg(3, "attn_mask"))
    if _is_t(mask):
        scores = tuple(batch) + (q[-2], k[-2])
        w.broadcast(
            [scores, mask], tuple(out_val.shape[:-2]) + (out_val.shape[-2], w.V.size[k[-2]])
        )
    assert len(batch) == n - 2
    return tuple(batch) + (q[-2], v[-1])


# ================================================================================================
# head resolution
# ================================================================================================
@dataclass
class HeadLayout:
    """The attention groups: per head class, its member product classes and their segments."""

    # head class -> (member product classes, [(first unit, dims per head)] one per member)
    segments: dict[int, tuple[list[int], list[tuple[int, int]]]] = field(default_factory=dict)
    # product class -> (head class, first unit of its segment)
    seg_of: dict[int, tuple[int, int]] = field(default_factory=dict)


def head_local(V: AxisVars, a: int, inners: set[int], descs: Iterable[tuple[int, ...]]) -> bool:
    """Does every tensor that carries one of ``inners`` also carry the head class ``a``?"""
    for d in descs:
        roots = {V.find(v) for v in d}
        if roots & inners and a not in roots:
            return False
    return True


def resolve_heads(V: AxisVars, param_classes: set[int], descs: list[tuple[int, ...]]) -> HeadLayout:
    """Keep a product ``h ⊗ d`` of free classes as an attention group only where that is sound.

    Heads groups let the inner class ``d`` be permuted differently inside each head, so ``h``
    and ``d`` must occur nowhere else: ``h`` is the outer factor of products whose inners are
    all free (a product ``h ⊗ pinned``, e.g. rotary q/k dims next to free v dims, would give
    ``h`` a second, independent group), it is no parameter axis, summand or inner factor;
    every ``d`` is the inner factor of products with outer ``h`` only, and head-local. Where
    this fails, the inners are pinned and ``h`` stays one plain group (whole heads move).

    Args:
        V: the union-find after the walk (closed and modified here: pins).
        param_classes: classes of parameter axes (``V.find`` of each).
        descs: every tensor's axis variables (for head locality).

    Returns:
        The :class:`HeadLayout`.
    """
    while True:
        V.close()
        as_outer: dict[int, list[tuple[int, int]]] = {}  # class -> [(product, inner)]
        as_inner: dict[int, set[int]] = {}  # class -> outer classes of its products
        in_sum: set[int] = set()
        for r, (kind, ch) in list(V.defn.items()):
            if V.find(r) != r or V.pinned[r]:
                continue
            if kind == "sum":
                in_sum.update(V.find(c) for c in ch)
                continue
            a, b = V.find(ch[0]), V.find(ch[1])
            as_outer.setdefault(a, []).append((r, b))
            as_inner.setdefault(b, set()).add(a)
        pcs = {V.find(v) for v in param_classes}
        changed = False
        for a, ps in as_outer.items():
            if V.pinned[a]:
                continue
            inners = [b for _, b in ps]
            ok = (
                a not in V.defn
                and a not in pcs
                and a not in in_sum
                and a not in as_inner
                and all(
                    not V.pinned[b]
                    and b not in V.defn
                    and b not in in_sum
                    and b not in as_outer
                    and b not in pcs
                    and as_inner[b] == {a}
                    for b in inners
                )
            )
            if ok:
                ok = head_local(V, a, set(inners), descs)
            if not ok:
                for b in inners:
                    if not V.pinned[b]:
                        V.pin(b, "dims inside a head, shared with another structure")
                        changed = True
        if not changed:
            break
    # the surviving products are attention groups keyed by their head class
    layout = HeadLayout()
    order = sorted(
        r
        for r, (k, _) in V.defn.items()
        if k == "prod"
        and V.find(r) == r
        and not V.pinned[r]
        and not V.is_pinned(V.defn[r][1][0])
        and not V.is_pinned(V.defn[r][1][1])
    )
    for r in order:
        a = V.find(V.defn[r][1][0])
        b = V.find(V.defn[r][1][1])
        members, segs = layout.segments.setdefault(a, ([], []))
        start = sum(V.size[m] for m in members)
        members.append(r)
        segs.append((start, V.size[b]))
        layout.seg_of[r] = (a, start)
    return layout
