"""Attention rules: ``nn.MultiheadAttention`` and ``scaled_dot_product_attention`` (the axes they
tie: heads ⊗ q/k dims, heads ⊗ v dims; head resolution is in :mod:`.attention`)."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, cast

import torch.nn.functional as F
from torch import Tensor, nn

from .registry import Call, Desc, rule

if TYPE_CHECKING:
    from .walk import Walk

__all__ = ["mha_rule", "sdpa_rule"]


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
