"""Rules of element-wise ops, reductions, factories and contractions (matmul, einsum).

Element-wise ops tie their operands' axes with broadcasting (a residual ``+`` ties two streams);
a reduction drops the reduced axes (a sum is invariant to their order) unless it returns
positions (``argmax``, ``max`` with indices); a contraction ties the contracted axes.
"""

from __future__ import annotations

from torch import Tensor

from .registry import Call, Desc, rule
from .walk import Walk, is_t


def _words(text: str) -> list[str]:
    return text.split()


UNARY = _words("""
    abs acos acosh alpha_dropout asin asinh atan atanh bfloat16 bitwise_not bool byte
    ceil celu char clamp clamp_max clamp_min clip clone contiguous cos cosh cpu cuda deg2rad
    detach double dropout dropout1d dropout2d dropout3d elu erf erfc erfinv exp exp2 expm1
    feature_alpha_dropout fill_ float floor frac gelu half
    hardshrink hardsigmoid hardswish hardtanh int invert isfinite isinf isnan leaky_relu log
    log10 log1p log2 log_softmax logical_not logit log_sigmoid long mish nan_to_num neg
    normalize pin_memory pos positive rad2deg reciprocal relu relu6 relu_
    requires_grad_ round rsqrt selu sgn short sigmoid sigmoid_ sign silu sin sinh
    softmax softmin softplus softshrink softsign sqrt square tan tanh tanh_ tanhshrink
    threshold to trunc type type_as zero_
""")
BINARY = _words("""
    add add_ addcdiv addcmul and_ atan2 bitwise_and bitwise_or bitwise_xor clamp_ copysign
    div div_ eq eq_ float_power floor_divide floordiv fmax fmin fmod ge gt heaviside hypot
    le lerp logical_and logical_or logical_xor lshift lt masked_fill
    masked_fill_ maximum minimum mod mul mul_
    ne ne_ or_ pow pow_ remainder rshift rsub sub sub_ true_divide truediv where xlogy xor
""")
REDUCE = _words(
    "all amax amin any count_nonzero logsumexp mean nanmean nansum prod std sum var norm"
)
POSITIONAL_REDUCE = _words("argmax argmin max min median mode topk sort argsort kthvalue")
SCAN = _words("cumsum cumprod cummax cummin logcumsumexp")
FACTORY = _words("""
    empty empty_like full full_like new_empty new_full new_ones new_zeros ones ones_like
    scalar_tensor zeros zeros_like
""")
NON_TENSOR = _words("""
    _assert data_ptr dim element_size get_device
    is_complex is_contiguous is_floating_point item ndimension nelement numel
    size storage_offset stride
""")


@rule(*UNARY)
def unary(w: Walk, call: Call) -> Desc:
    """Element-wise (or equivariant along every axis: softmax, normalize): output = input."""
    x, out_val = w.desc(call.args[0] if call.args else call.kwargs.get("input")), call.out
    if not is_t(x) or not isinstance(out_val, Tensor):
        return w.unknown(call, "unexpected input")
    if tuple(out_val.shape) != tuple(w.V.size[v] for v in x):
        return w.unknown(call, "changes the shape")
    if call.name in ("clamp", "clip"):  # tensor bounds broadcast like a binary op
        return w.broadcast(w.tensor_args(call), out_val.shape)
    return x


@rule(*BINARY)
def binary(w: Walk, call: Call) -> Desc:
    """Element-wise with broadcasting: equal-size aligned axes are tied; ``a + b`` is a stream."""
    tens = w.tensor_args(call)
    if not isinstance(call.out, Tensor):
        return w.unknown(call, "unexpected result")
    res = w.broadcast(tens, call.out.shape)
    if call.name in ("add", "iadd", "add_") and len(tens) > 1:
        w.residual.update(res)  # a residual stream (names the group "….stream")
    return res


def _reduce_dims(w: Walk, call: Call, x: tuple[int, ...]) -> list[int] | None:
    args = list(call.args) + [None] * 4
    kw = call.kwargs
    default = args[2] if call.name == "norm" else kw.get("axis", args[1])
    dim = kw.get("dim", default)
    dim = w.value(dim)
    if dim is None or isinstance(dim, bool):  # all axes; std/var(x, unbiased)
        return None
    try:
        return sorted({int(d) % len(x) for d in (dim if isinstance(dim, list | tuple) else [dim])})
    except (TypeError, ValueError):
        return []


@rule(*REDUCE, *POSITIONAL_REDUCE, *SCAN)
def reduce(w: Walk, call: Call) -> Desc:
    """Reductions drop (or keep as size 1) the reduced axes; those returning positions (argmax,
    topk, sort, max with indices) or scanning along an axis (cumsum) pin it."""
    x, out_val = w.desc(call.args[0] if call.args else call.kwargs.get("input")), call.out
    if not is_t(x):
        return w.unknown(call, "unexpected input")
    if call.name in ("max", "min") and len(w.tensor_args(call)) == 2:
        return binary(w, call)
    dims = _reduce_dims(w, call, x)
    if call.name in ("sort", "argsort", "topk", "kthvalue") and dims is None:
        dims = [len(x) - 1]
    if call.name in SCAN and dims is not None:
        w.note(call, "scans along an axis", [x[d] for d in dims])
        return x if isinstance(out_val, Tensor) else [x for _ in out_val]
    if dims is None:
        if isinstance(out_val, Tensor) and out_val.dim() == 0:
            if call.name in POSITIONAL_REDUCE:
                w.note(call, "returns a position", list(x))
            return ()
        return w.unknown(call, "unexpected result")
    first = out_val[0] if isinstance(out_val, tuple | list) and out_val else out_val
    if not isinstance(first, Tensor) or not dims:
        return w.unknown(call, "unexpected dim argument")
    sizes = [w.V.size[v] for v in x]
    if call.name in POSITIONAL_REDUCE:
        positional = call.name.startswith("arg") or isinstance(out_val, tuple | list)
        if positional or call.name in ("median", "mode"):
            w.note(call, "returns positions along an axis", [x[d] for d in dims])
    if list(first.shape) == sizes and call.name in ("sort", "argsort"):
        return x if isinstance(out_val, Tensor) else [x for _ in out_val]
    keep_shape = [1 if i in dims else n for i, n in enumerate(sizes)]
    drop_shape = [n for i, n in enumerate(sizes) if i not in dims]
    if list(first.shape) == keep_shape:
        kept = tuple(w.V.new(1) if i in dims else v for i, v in enumerate(x))
    elif list(first.shape) == drop_shape:
        kept = tuple(v for i, v in enumerate(x) if i not in dims)
    elif call.name in ("topk", "kthvalue"):
        kept = tuple(
            w.V.new(first.shape[i], True, why="top-k positions") if i in dims else v
            for i, v in enumerate(x)
        )
    else:
        return w.unknown(call, "unexpected result shape")
    return [kept for _ in out_val] if isinstance(out_val, tuple | list) else kept


@rule(*FACTORY)
def factory(w: Walk, call: Call) -> Desc:
    """A constant-filled tensor: its axes carry no units (free; element-wise ops tie them)."""
    return w.from_value(call.out, pinned=False)


@rule(*NON_TENSOR)
def metadata(w: Walk, call: Call) -> Desc:
    """Questions about a tensor (``size``, ``dim``, ``finfo``): no axes, unless a tensor results."""
    return w.unknown(call, "returns a tensor") if isinstance(call.out, Tensor) else None


# --- contractions ----------------------------------------------------------------------------
@rule("matmul", "mm", "bmm")
def matmul(w: Walk, call: Call) -> Desc:
    """``a @ b``: a's last axis ~ b's second-to-last; batch axes broadcast."""
    return _matmul(w, call, call.arg(0, "input"), call.arg(1, "other"))


@rule("addmm", "baddbmm")
def addmm(w: Walk, call: Call) -> Desc:
    """``bias + a @ b``."""
    names = ("mat1", "mat2") if call.name == "addmm" else ("batch1", "batch2")
    d = _matmul(w, call, call.arg(1, names[0]), call.arg(2, names[1]))
    bias = w.desc(call.arg(0, "input"))
    if is_t(d) and is_t(bias) and isinstance(call.out, Tensor):
        return w.broadcast([d, bias], call.out.shape)
    return d


def _matmul(w: Walk, call: Call, anode: object, bnode: object) -> Desc:
    a, b = w.desc(anode), w.desc(bnode)
    out_val = call.out
    if not (is_t(a) and is_t(b)) or not isinstance(out_val, Tensor) or not a or not b:
        return w.unknown(call, "unexpected operands")
    w.tie(a[-1], b[-2] if len(b) > 1 else b[0])
    a_param = getattr(anode, "op", None) == "get_attr"
    b_param = getattr(bnode, "op", None) == "get_attr"
    if b_param and not a_param:
        w.candidate(anode, -1, a[-1])
        w.V.label.setdefault(b[-1], w.label_of(bnode, call))
    if a_param and not b_param and len(b) > 1:
        w.candidate(bnode, len(b) - 2, b[-2])
    if len(a) > 1 and len(b) > 1:
        batch = w.broadcast([tuple(a[:-2]), tuple(b[:-2])], out_val.shape[:-2])
        return tuple(batch) + (a[-2], b[-1])
    if len(a) == 1 and len(b) == 1:
        return ()
    if len(a) == 1:  # (k) @ (..., k, m) -> (..., m)
        return tuple(b[:-2]) + (b[-1],)
    return tuple(a[:-1])  # (..., n, k) @ (k) -> (..., n)


@rule("einsum")
def einsum(w: Walk, call: Call) -> Desc:
    """Axes with the same letter are tied; the output's letters name its axes."""
    eq = w.value(call.args[0])
    ops = call.args[1:]
    if len(ops) == 1 and isinstance(ops[0], list | tuple):
        ops = tuple(ops[0])
    descs = [w.desc(o) for o in ops]
    out_val = call.out
    if (
        not isinstance(eq, str)
        or "..." in eq
        or not all(is_t(d) for d in descs)
        or not isinstance(out_val, Tensor)
    ):
        return w.unknown(call, "unsupported equation")
    eq = eq.replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    letters = lhs.replace(",", "")
    if "->" not in eq:
        rhs = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    letter: dict[str, int] = {}
    for term, d in zip(lhs.split(","), descs, strict=False):
        for c, v in zip(term, d, strict=False):
            if w.V.size[v] == 1:
                continue
            if c in letter:
                w.tie(letter[c], v)
            else:
                letter[c] = v
    return tuple(letter.get(c, w.V.new(s)) for c, s in zip(rhs, out_val.shape, strict=False))
