"""Rules of layers: linear, convolution, norms, embedding, PReLU, GLU, pooling, padding, resizing.

Each op is written once, as its functional form; a module's rule calls it with the module's
tensors (``nn.Linear`` -> ``F.linear(x, m.weight, m.bias)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import Call, Desc, register, rule
from .rules_shape import reshape
from .walk import Walk, is_t

# Element-wise, or equivariant to any reordering of every axis (softmax, dropout): output = input.
ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Hardshrink,
    nn.Softshrink, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Threshold, nn.LogSigmoid,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout, nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d,
)  # fmt: skip
POOL_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd,
)
PAD_MODULES: tuple[type[nn.Module], ...] = (  # ZeroPad*d are _ConstantPadNd
    nn.modules.padding._ConstantPadNd,
    nn.modules.padding._ReflectionPadNd,
    nn.modules.padding._ReplicationPadNd,
    nn.modules.padding._CircularPadNd,
)
# kept whole, then pinned: they mix or reorder hidden units in ways no rule describes
OPAQUE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Bilinear, nn.LocalResponseNorm, nn.EmbeddingBag, nn.PixelShuffle, nn.PixelUnshuffle,
    nn.ChannelShuffle,
)  # fmt: skip


def _x(call: Call) -> Any:
    return call.arg(0, "input")


# --- linear and convolution --------------------------------------------------------------------
@rule(F.linear, nn.Linear)
def linear(w: Walk, call: Call) -> Desc:
    """``y = x Wᵀ + b``: x's last axis ~ W's columns; y's last axis is W's rows (new units)."""
    if call.module is not None:
        m = cast(nn.Linear, call.module)
        call = call.with_args("linear", (call.args[0], m.weight, m.bias), {})
    xn, wn, bn = call.arg(0, "input"), call.arg(1, "weight"), call.arg(2, "bias")
    x, W = w.desc(xn), w.desc(wn)
    if not is_t(x) or not is_t(W) or len(W) != 2:
        return w.unknown(call, "weight is not a 2-D tensor")
    w.tie(x[-1], W[1])
    out = W[0]
    w.V.label.setdefault(out, call.label if call.module is not None else w.label_of(wn, call))
    B = w.desc(bn)
    if is_t(B):
        w.tie(out, B[-1])
    w.candidate(xn, -1, x[-1])
    d = tuple(x[:-1]) + (out,)
    w.descs[call.node] = d
    w.candidate(call.node, -1, out, "out")
    return d


_CONV = (F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d)
_CONV_T = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)


@rule(*_CONV, *_CONV_T, nn.modules.conv._ConvNd)
def conv(w: Walk, call: Call) -> Desc:
    """Convolution: channels as for a linear layer, kernel and spatial positions pinned; groups
    split both channel axes as ``groups ⊗ channels per group``, the group index shared."""
    if call.module is not None:
        m = cast(nn.modules.conv._ConvNd, call.module)
        transposed, groups = m.transposed, m.groups
        xn, wn, bn = call.args[0], m.weight, m.bias
    else:
        transposed = call.node.target in _CONV_T
        xn, wn, bn = call.arg(0, "input"), call.arg(1, "weight"), call.arg(2, "bias")
        groups = w.value(call.arg(6 if transposed else 6, "groups", 1))
        if transposed:
            groups = w.value(call.arg(6, "groups", 1))
    x, W, B = w.desc(xn), w.desc(wn), w.desc(bn)
    out_val = call.out
    if not is_t(x) or not is_t(W) or not isinstance(out_val, Tensor):
        return w.unknown(call, "weight is not a tensor")
    groups = int(groups or 1)
    V = w.V
    k = len(W) - 2
    for v in W[2:]:
        w.pin(v, "convolution kernel positions")
    ch = len(x) - k - 1
    if ch not in (0, 1) or (transposed and groups != 1):
        why = "unexpected input rank" if ch not in (0, 1) else "grouped transposed convolution"
        w.pin_all(W, f"{call.label}: {why}")
        w.pin_all(B, f"{call.label}: {why}")
        return w.unknown(call, why)
    cin = x[ch]
    if transposed:
        w.tie(cin, W[0])
        out = W[1]
    elif groups == 1:
        w.tie(cin, W[1])
        out = W[0]
    else:
        g = V.new(groups)
        w.tie(cin, V.structure("prod", [g, W[1]]))
        co = V.new(V.size[W[0]] // groups)
        w.tie(W[0], V.structure("prod", [g, co]))
        out = W[0]
    V.label.setdefault(out, call.label if call.module is not None else w.label_of(wn, call))
    if is_t(B):
        w.tie(out, B[0])
    w.candidate(xn, ch, cin)
    for v in x[ch + 1 :]:
        w.pin(v, "spatial positions")
    spatial = w.fresh(out_val.shape[ch + 1 :], pinned=True, why="spatial positions")
    d = tuple(x[:ch]) + (out,) + spatial
    w.descs[call.node] = d
    w.candidate(call.node, ch, out, "out")
    return d


# --- norms -----------------------------------------------------------------------------------
@rule(F.batch_norm, F.instance_norm, nn.modules.batchnorm._BatchNorm)
@rule(nn.modules.instancenorm._InstanceNorm)
def channel_norm(w: Walk, call: Call) -> Desc:
    """Batch/instance norm: statistics and affine parameters per channel (axis 1; 0 unbatched)."""
    x = w.desc(_x(call))
    if not is_t(x):
        return w.unknown(call, "unexpected input")
    c = x[1] if len(x) > 1 else x[0]
    if call.module is not None:
        m = call.module
        tensors: list[Any] = [m.weight, m.bias, m.running_mean, m.running_var]
        if isinstance(m, nn.modules.instancenorm._InstanceNorm) and len(x) == m._get_no_batch_dim():
            c = x[0]
    else:
        names = ("running_mean", "running_var", "weight", "bias")
        tensors = [call.arg(i + 1, n) for i, n in enumerate(names)]
    for t in tensors:
        d = w.desc(t)
        if is_t(d) and len(d) == 1:
            w.tie(c, d[0])
    return x


_NORM_LAST: tuple[Any, ...] = (F.layer_norm, nn.LayerNorm)
if hasattr(F, "rms_norm"):
    _NORM_LAST += (F.rms_norm,)
if hasattr(nn, "RMSNorm"):
    _NORM_LAST += (nn.RMSNorm,)


@rule(*_NORM_LAST)
def layer_norm(w: Walk, call: Call) -> Desc:
    """Layer/RMS norm over the trailing ``normalized_shape`` axes; weight and bias tie to them."""
    if call.module is not None:
        m = call.module
        shape: Any = m.normalized_shape
        tensors = [getattr(m, "weight", None), getattr(m, "bias", None)]
    else:
        shape = w.value(call.arg(1, "normalized_shape"))
        tensors = [call.arg(2, "weight"), call.arg(3, "bias")]
        if call.name == "rms_norm":
            tensors = [call.arg(2, "weight")]
    x = w.desc(_x(call))
    if not is_t(x):
        return w.unknown(call, "unexpected input")
    kk = len(shape) if isinstance(shape, list | tuple | torch.Size) else 1
    for t in tensors:
        d = w.desc(t)
        if is_t(d):
            for i, v in enumerate(d):
                w.tie(x[len(x) - kk + i], v)
    return x


@rule(F.group_norm, nn.GroupNorm)
def group_norm(w: Walk, call: Call) -> Desc:
    """Statistics per group of consecutive channels: groups move whole, channels stay inside."""
    if call.module is not None:
        m = cast(nn.GroupNorm, call.module)
        G, wt, bt = m.num_groups, m.weight, m.bias
    else:
        G = w.value(call.arg(1, "num_groups"))
        wt, bt = call.arg(2, "weight"), call.arg(3, "bias")
    x = w.desc(_x(call))
    if not is_t(x):
        return w.unknown(call, "unexpected input")
    c = x[1] if len(x) > 1 else x[0]
    n = w.V.size[c]
    if int(G) > 1:
        w.tie(c, w.V.structure("prod", [w.V.new(int(G)), w.V.new(n // int(G))]))
    for t in (wt, bt):
        d = w.desc(t)
        if is_t(d):
            w.tie(c, d[0])
    return x


# --- embedding, PReLU, GLU ---------------------------------------------------------------------
@rule(F.embedding, torch.embedding, nn.Embedding)
def embedding(w: Walk, call: Call) -> Desc:
    """Rows are addressed by the (never permuted) token ids; the columns are a new unit axis."""
    if call.module is not None:
        xn, wn = call.args[0], cast(nn.Embedding, call.module).weight
    else:
        xn, wn = call.arg(0, "input"), call.arg(1, "weight")
        if call.node.target is torch.embedding:
            xn, wn = wn, xn  # torch.embedding(weight, indices)
    x, W = w.desc(xn), w.desc(wn)
    if not is_t(x) or not is_t(W):
        return w.unknown(call, "unexpected operands")
    w.pin(W[0], "embedding rows (token ids)")
    w.V.label.setdefault(W[1], call.label if call.module is not None else w.label_of(wn, call))
    return tuple(x) + (W[1],)


@rule(F.prelu, torch.prelu, nn.PReLU)
def prelu(w: Walk, call: Call) -> Desc:
    """One slope per channel (axis 1, or 0 unbatched), or one for all."""
    wt = call.module.weight if call.module is not None else call.arg(1, "weight")
    x, W = w.desc(_x(call)), w.desc(wt)
    if not is_t(x) or not is_t(W) or len(W) != 1:
        return w.unknown(call, "unexpected operands")
    if w.V.size[W[0]] > 1:
        w.tie(x[1 if len(x) > 1 else 0], W[0])
    return x


@rule(F.glu, nn.GLU)
def glu(w: Walk, call: Call) -> Desc:
    """``a * sigmoid(b)`` for the two halves of ``dim``: the halves share one permutation."""
    dim: Any = call.module.dim if call.module is not None else w.value(call.arg(1, "dim", -1))
    x = w.desc(_x(call))
    if not is_t(x):
        return w.unknown(call, "unexpected input")
    dim = int(dim) % len(x)
    half = w.V.new(w.V.size[x[dim]] // 2)
    w.tie(x[dim], w.V.structure("sum", [half, half]))
    return tuple(x[:dim]) + (half,) + tuple(x[dim + 1 :])


# --- pooling, padding, resizing: the trailing spatial axes ----------------------------------------
def spatial(
    w: Walk,
    x: tuple[int, ...],
    k: int,
    out_shape: Sequence[int],
    untouched: Sequence[bool] = (),
    why: str = "spatial positions",
) -> Desc:
    """The trailing ``k`` axes are positions: pinned on both sides (an output axis unrelated to
    its input axis would let the two be permuted apart), except those marked ``untouched``
    (padded by zero on both sides); the others pass through."""
    k = min(k, len(x))
    n = len(x) - k
    out = list(x[:n])
    for j in range(k):
        if j < len(untouched) and untouched[j] and w.V.size[x[n + j]] == out_shape[n + j]:
            out.append(x[n + j])
        else:
            w.pin(x[n + j], why)
            out.append(w.V.new(out_shape[n + j], True, why=why))
    return tuple(out)


_POOL_NAMES = [
    f"{p}_pool{d}d" for p in ("max", "avg", "adaptive_avg", "adaptive_max", "lp") for d in (1, 2, 3)
] + ["interpolate"]


@rule(*_POOL_NAMES, *POOL_MODULES, nn.Upsample)
def pool(w: Walk, call: Call) -> Desc:
    """Pooling and resizing act on the trailing spatial axes; returning indices is unknown."""
    x, out_val = w.desc(_x(call)), call.out
    if not is_t(x) or not isinstance(out_val, Tensor):
        return w.unknown(call, "returns indices" if isinstance(out_val, tuple) else "unexpected")
    digits = "".join(ch for ch in call.name if ch.isdigit())
    k = int(digits) if digits else len(x) - 2
    return spatial(w, x, k, out_val.shape)


@rule(F.pad, *PAD_MODULES)
def pad(w: Walk, call: Call) -> Desc:
    """Padding adds positions to the last ``len(pad) // 2`` axes."""
    p = call.module.padding if call.module is not None else w.value(call.arg(1, "pad"))
    x = w.desc(_x(call))
    if not is_t(x) or not isinstance(call.out, Tensor):
        return w.unknown(call, "unexpected input")
    p = list(cast(Sequence[int], p))
    if len(p) % 2 or not all(isinstance(a, int) for a in p):
        return w.unknown(call, "unexpected padding")
    k = len(p) // 2  # p pads the last axis first: (left, right, top, bottom, ...)
    untouched = [p[2 * (k - 1 - j)] == 0 and p[2 * (k - 1 - j) + 1] == 0 for j in range(k)]
    mode = call.module.__class__.__name__ if call.module is not None else call.kwargs.get("mode")
    if mode not in (None, "constant") and "Constant" not in str(mode) and "Zero" not in str(mode):
        untouched = [u and False for u in untouched]  # reflect/replicate/circular: be safe
    return spatial(w, x, k, call.out.shape, untouched, "padded positions")


@rule(nn.Flatten, nn.Unflatten)
def flatten_module(w: Walk, call: Call) -> Desc:
    """``nn.Flatten``/``nn.Unflatten``: a row-major reshape."""
    x = w.desc(_x(call))
    if not is_t(x) or not isinstance(call.out, Tensor):
        return w.unknown(call, "unexpected input")
    return reshape(w, x, call.out.shape, call.node)


def identity(w: Walk, call: Call) -> Desc:
    """Element-wise modules: the output has the input's axes."""
    x = w.desc(_x(call))
    if not is_t(x) or not isinstance(call.out, Tensor) or len(x) != call.out.dim():
        return w.unknown(call, "unexpected input")
    return x


def opaque(w: Walk, call: Call) -> Desc:
    """Modules kept whole whose symmetry is unknown: every axis they touch is pinned."""
    return w.unknown(call, "no known symmetry")


for _m in ELEMENTWISE_MODULES:
    register(_m, identity)
for _m in OPAQUE_MODULES:
    register(_m, opaque)
