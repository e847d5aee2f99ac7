"""Infer a network's permutation symmetry (a PermutationSpec) from a torch.fx trace of its forward.

Method. Every axis of every tensor in the trace (activations, parameters, buffers) gets a
variable; the ops of the graph relate them, union-find style (Ainsworth et al., "Git Re-Basin",
ICLR 2023, write these specs by hand; Entezari et al., ICLR 2022 and Tatro et al., NeurIPS 2020
describe the symmetry):

- *tie* ``a ~ b``: the two axes must be reordered by the same permutation (element-wise ops with
  broadcasting, residual ``+``, norms and their per-unit parameters, a Linear's input axis and its
  weight's columns, a matmul's contracted axes, ...);
- *pin* ``a``: the axis must not be reordered (network inputs and outputs, indexing or slicing
  on the axis, position-dependent or unknown ops);
- *structure*: an axis is the direct sum of others (``torch.cat``, ``chunk``/``split``, fused
  q/k/v projections: ``a = b ⊕ c``) or their row-major product (``flatten``/``view``/``reshape``:
  ``a = b ⊗ c``; Conv -> Flatten -> Linear gives each channel a block of ``H*W`` columns).

Ties merge classes (with congruence: two axes with the same structure over the same classes are
one class), pins spread to every tied class and down the structure. A product ``h ⊗ d`` of two
free classes where ``d`` is *head-local* (every tensor carrying ``d`` also carries ``h``, e.g. the
q/k dims in ``softmax(q kᵀ) v``) is an attention group: heads move as wholes and the dims inside
each head are permuted freely (:class:`~modeconn._src.spec.Heads`). Each remaining free class
with parameters becomes one permutation group; its parameter axes become slots. Every op the
analysis does not know pins all axes it touches (with a warning naming it), so an unknown op can
only make the spec smaller, never wrong. As a last guard, ``infer_spec`` checks the inferred spec
on the example inputs (with perturbed weights) and drops any group that changes the outputs.
"""

from __future__ import annotations

import inspect
import math
import operator
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard, cast

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .errors import SpecError
from .symmetry.attention import resolve_heads
from .symmetry.axes import AxisVars
from .spec import Heads, PermutationSpec, Site, Slot, apply_permutation, random_permutation
from .trace import (
    ELEMENTWISE_MODULES,
    NORM_LAST_MODULES,
    PAD_MODULES,
    POOL_MODULES,
    Trace,
    cached_graph,
    call_args,
    trace_model,
    traced_root,
)

__all__ = ["infer_spec", "capture_sites"]


# ================================================================================================
# Union-find over axis variables, with sum/product structure
# ================================================================================================
_Vars = AxisVars


# An axis description of a traced value: a tuple of variables (one per axis) for a tensor, a
# list of descriptions for a tuple/list, or None for anything that carries no tensor.
Desc = Any


def _is_t(d: Desc) -> TypeGuard[tuple[int, ...]]:
    return isinstance(d, tuple)


# ================================================================================================
# The analysis
# ================================================================================================
def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


_UNARY = _words(
    """
    abs acos acosh alias alpha_dropout asin asinh atan atanh bfloat16 bitwise_not bool byte
    ceil celu char clamp clamp_max clamp_min clip clone contiguous cos cosh cpu cuda deg2rad
    detach double dropout dropout1d dropout2d dropout3d elu erf erfc erfinv exp exp2 expm1
    feature_alpha_dropout fill_ float floor frac gelu gelu_ half
    hardshrink hardsigmoid hardswish hardtanh int invert isfinite isinf isnan leaky_relu log
    log10 log1p log2 log_softmax logical_not logit logsigmoid long mish nan_to_num neg
    normalize pin_memory pos positive quick_gelu rad2deg reciprocal relu relu6 relu_
    requires_grad_ round rsqrt selu sgn short sigmoid sigmoid_ sign silu silu_ sin sinh
    softmax softmin softplus softshrink softsign sqrt square tan tanh tanh_ tanhshrink
    threshold to trunc type type_as zero_
    """
)
_BINARY = _words(
    """
    add add_ addcdiv addcmul and_ atan2 bitwise_and bitwise_or bitwise_xor clamp_ copysign
    div div_ eq eq_ float_power floor_divide floordiv fmax fmin fmod ge gt heaviside hypot
    iadd imul isub itruediv le lerp logical_and logical_or logical_xor lshift lt masked_fill
    masked_fill_ maximum minimum mod mul mul_
    ne ne_ or_ pow pow_ remainder rshift rsub sub sub_ true_divide truediv where xlogy xor
    """
)
_REDUCE = _words(
    """
    all amax amin any count_nonzero logsumexp mean nanmean nansum prod std sum var
    """
)
_SHAPE_ONLY = _words(
    """
    atleast_2d atleast_3d flatten reshape reshape_as squeeze unflatten unsqueeze view view_as
    """
)
_PERMUTE = _words(
    """
    T adjoint mT moveaxis movedim permute swapaxes swapdims t transpose
    """
)
_FACTORY_FREE = _words(
    """
    empty empty_like full full_like new_empty new_full new_ones new_zeros ones ones_like
    scalar_tensor zeros zeros_like
    """
)
_NON_TENSOR_OK = _words(
    """
    _assert _assert_is_none data_ptr dim element_size finfo get_device getattr iinfo
    is_complex is_contiguous is_floating_point is_tensor item len ndimension nelement numel
    size storage_offset stride
    """
)
def _name_of(target: Any) -> str:
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", str(target))


@dataclass
class _Candidate:
    node: str
    axis: int
    var: int
    rank: int
    kind: str  # "in": enters a mixing layer; "out": leaves a projection (used for heads groups)


class _Analysis:
    def __init__(self, model: nn.Module, tr: Trace, warn: bool) -> None:
        self.model = model
        self.tr = tr
        self.root = tr.root if tr.root is not None else model
        self.warn_enabled = warn
        self.V = _Vars()
        self.desc: dict[fx.Node, Desc] = {}
        self.param_vars: dict[int, tuple[int, ...]] = {}  # id(tensor) -> vars per axis
        self.param_keys: dict[int, list[str]] = {}
        self.param_label: dict[int, str] = {}
        self.trainable: set[int] = set()
        for k, t in model.state_dict(keep_vars=True).items():
            self.param_keys.setdefault(id(t), []).append(k)
            if isinstance(t, nn.Parameter):
                self.trainable.add(id(t))
            self.param_label.setdefault(id(t), k)
        self.candidates: list[_Candidate] = []
        self.warned: set[str] = set()
        self.all_descs: list[tuple[int, ...]] = []  # every tensor description (for head locality)
        self.pending: list[tuple[str, str, list[int]]] = []
        self.residual: set[int] = set()
        self.selector: dict[int, tuple[list[int], list[list[int]]]] = {}

    # --- helpers --------------------------------------------------------------------------------
    def warn(self, what: str, why: str) -> None:
        if what in self.warned:
            return
        self.warned.add(what)
        if self.warn_enabled:
            warnings.warn(
                f"modeconn.infer_spec: {what}: {why}; the axes it touches are not permuted "
                "(pass a hand-written spec, PermutationSpec.from_axes(...), for more)",
                stacklevel=4,
            )

    def fresh(self, shape: Sequence[int], pinned: bool = False) -> tuple[int, ...]:
        return tuple(self.V.new(s, pinned) for s in shape)

    def pin_all(self, d: Desc) -> None:
        if _is_t(d):
            for v in d:
                self.V.pin(v)
        elif isinstance(d, list):
            for x in d:
                self.pin_all(x)

    def tie(self, a: int, b: int) -> None:
        self.V.union(a, b)

    def pvars(self, t: Tensor) -> tuple[int, ...]:
        """Variables of a parameter/buffer tensor's axes (shared by every use: weight tying)."""
        key = id(t)
        if key not in self.param_vars:
            known = key in self.param_keys
            self.param_vars[key] = tuple(self.V.new(s, pinned=not known) for s in t.shape)
            self.all_descs.append(self.param_vars[key])
        return self.param_vars[key]

    def out_desc_from_value(self, value: Any, pinned: bool) -> Desc:
        if isinstance(value, Tensor):
            return self.fresh(value.shape, pinned)
        if isinstance(value, tuple | list):
            return [self.out_desc_from_value(v, pinned) for v in value]
        if isinstance(value, dict):
            return [self.out_desc_from_value(v, pinned) for v in value.values()]
        return None

    def arg_desc(self, a: Any) -> Desc:
        if isinstance(a, fx.Node):
            return self.desc.get(a)
        if isinstance(a, tuple | list):
            return [self.arg_desc(x) for x in a]
        if isinstance(a, dict):
            return [self.arg_desc(x) for x in a.values()]
        if isinstance(a, slice):
            return [self.arg_desc(a.start), self.arg_desc(a.stop), self.arg_desc(a.step)]
        return None

    def value(self, a: Any) -> Any:
        return fx.node.map_aggregate(
            a, lambda x: self.tr.values.get(x) if isinstance(x, fx.Node) else x
        )

    def unknown(self, node: fx.Node, what: str, why: str = "unknown op") -> Desc:
        ins = [self.arg_desc(a) for a in node.args] + [
            self.arg_desc(a) for a in node.kwargs.values()
        ]
        has_tensor = any(self._has_tensor(d) for d in ins)
        out = self.out_desc_from_value(self.tr.values.get(node), pinned=True)
        if has_tensor or self._has_tensor(out):
            touched: list[int] = []
            for d in ins:
                self.pin_all(d)
                touched += self._vars_of(d)
            if has_tensor:  # warned at the end, if it touched an axis with hidden units
                self.pending.append((what, why, touched))
        return out

    def _vars_of(self, d: Desc) -> list[int]:
        if _is_t(d):
            return list(d)
        if isinstance(d, list):
            return [v for x in d for v in self._vars_of(x)]
        return []

    def flush_warnings(self) -> None:
        hidden = {
            self.V.find(v)
            for tid, vs in self.param_vars.items()
            if tid in self.trainable  # not buffers such as a causal mask
            for v in vs
        }
        for what, why, touched in self.pending:
            if any(self.V.find(v) in hidden for v in touched):
                self.warn(what, why)

    def _has_tensor(self, d: Desc) -> bool:
        if _is_t(d):
            return len(d) > 0
        if isinstance(d, list):
            return any(self._has_tensor(x) for x in d)
        return False

    def _tensor_args(self, node: fx.Node) -> list[tuple[int, ...]]:
        out = []
        for a in (*node.args, *node.kwargs.values()):
            d = self.arg_desc(a)
            if _is_t(d):
                out.append(d)
        return out

    def broadcast(self, descs: Sequence[tuple[int, ...]], shape: Sequence[int]) -> tuple[int, ...]:
        """Tie operands of an element-wise op with broadcasting; return the output's variables."""
        n = len(shape)
        out: list[int] = []
        for i in range(n):
            size = shape[i]
            vs = []
            for d in descs:
                j = len(d) - n + i
                if j >= 0 and self.V.size[d[j]] == size and size != 1:
                    vs.append(d[j])
            if vs:
                for v in vs[1:]:
                    self.tie(vs[0], v)
                out.append(vs[0])
            else:
                out.append(self.V.new(size))
        return tuple(out)

    def candidate(self, node: Any, axis: int, var: int, kind: str = "in") -> None:
        if isinstance(node, fx.Node) and _is_t(self.desc.get(node)):
            rank = len(self.desc[node])
            self.candidates.append(_Candidate(node.name, axis % rank, var, rank, kind))

    # --- running the graph ------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.tr.gm.graph.nodes:
            if node.op == "placeholder":
                d = self.out_desc_from_value(self.tr.values.get(node), pinned=True)
            elif node.op == "get_attr":
                val = self.tr.values.get(node)
                d = (
                    self.pvars(val)
                    if isinstance(val, Tensor)
                    else self.out_desc_from_value(val, True)
                )
            elif node.op == "output":
                self.pin_all(self.arg_desc(node.args[0]))
                continue
            elif node.op == "call_module":
                d = self.call_module(node)
            else:
                d = self.call_op(node)
            self.desc[node] = d
            self._record(d)

    def _record(self, d: Desc) -> None:
        if _is_t(d):
            self.all_descs.append(d)
        elif isinstance(d, list):
            for x in d:
                self._record(x)

    # --- modules ------------------------------------------------------------------------------
    def call_module(self, node: fx.Node) -> Desc:
        path = str(node.target)
        m = self.root.get_submodule(path)
        label = path[len(self.tr.prefix) :] if path.startswith(self.tr.prefix) else path
        out_val = self.tr.values.get(node)
        if path in self.tr.opaque:
            return self._opaque_module(node, m, label, "cannot be traced")
        x: Desc = self.arg_desc(node.args[0]) if node.args else None
        for pname in ("weight", "bias"):
            t = getattr(m, pname, None)  # weight_norm / spectral_norm compute it from others
            if isinstance(t, Tensor) and id(t) not in self.param_keys and _is_t(x):
                why = f"its {pname} is computed (weight_norm?), not a tensor of the state dict"
                self.pending.append((f"module {label!r} ({type(m).__name__})", why, list(x)))
        if isinstance(m, nn.MultiheadAttention):
            return self.mha(node, m, label)
        if not _is_t(x) or not isinstance(out_val, Tensor):
            return self._opaque_module(node, m, label, "unexpected inputs/outputs")
        if isinstance(m, ELEMENTWISE_MODULES):
            return x
        if isinstance(m, nn.PReLU):
            if m.weight.numel() > 1:
                self.tie(x[1 if len(x) > 1 else 0], self.pvars(m.weight)[0])
            else:
                self.pvars(m.weight)
            return x
        if isinstance(m, nn.Linear):
            return self.linear(node, node.args[0], x, m.weight, m.bias, label)
        if isinstance(m, nn.modules.conv._ConvNd):
            return self.conv(
                node, node.args[0], x, m.weight, m.bias, m.groups, m.transposed, label, out_val
            )
        if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.modules.instancenorm._InstanceNorm):
            c = x[1] if len(x) > 1 else x[0]
            if (
                isinstance(m, nn.modules.instancenorm._InstanceNorm)
                and len(x) == m._get_no_batch_dim()
            ):
                c = x[0]
            for t in (m.weight, m.bias, m.running_mean, m.running_var):
                if t is not None:
                    self.tie(c, self.pvars(t)[0])
            return x
        if isinstance(m, NORM_LAST_MODULES):
            norm = cast(nn.LayerNorm, m)  # or RMSNorm (no bias): the same attributes
            k = len(norm.normalized_shape)
            for t in (norm.weight, getattr(m, "bias", None)):
                if t is not None:
                    for i, v in enumerate(self.pvars(t)):
                        self.tie(x[len(x) - k + i], v)
            return x
        if isinstance(m, nn.GroupNorm):
            self.group_norm(x, m.num_groups, m.weight, m.bias)
            return x
        if isinstance(m, nn.Embedding):
            return self.embedding(x, m.weight, label)
        if isinstance(m, nn.GLU):
            return self.glu(x, m.dim, out_val)
        if isinstance(m, POOL_MODULES):
            k = int("".join(ch for ch in type(m).__name__ if ch.isdigit()) or 1)
            if getattr(m, "return_indices", False):
                return self._opaque_module(node, m, label, "returns indices")
            return self.spatial(x, k, out_val.shape)
        if isinstance(m, nn.Upsample):
            k = len(x) - 2
            return self.spatial(x, k, out_val.shape)
        if isinstance(m, PAD_MODULES):
            padding = cast(Sequence[int], m.padding)  # every PAD_MODULES class has one
            return self.spatial(x, len(padding) // 2, out_val.shape)
        if isinstance(m, nn.Flatten | nn.Unflatten):
            return self.reshape(x, out_val.shape, node)
        return self._opaque_module(node, m, label, "no known symmetry")

    def _opaque_module(self, node: fx.Node, m: nn.Module, path: str, why: str) -> Desc:
        for t in list(m.parameters()) + list(m.buffers()):
            for v in self.pvars(t):
                self.V.pin(v)
        return self.unknown(node, f"module {path!r} ({type(m).__name__})", why)

    # --- rules shared by modules and functions ---------------------------------------------------
    def linear(
        self, node: fx.Node, xnode: Any, x: tuple[int, ...], w: Any, b: Any, label: str
    ) -> Desc:
        W = self.pvars(w) if isinstance(w, Tensor) else w
        if not _is_t(W) or len(W) != 2:
            return self.unknown(node, f"linear {node.name!r}", "weight is not a 2-D tensor")
        self.tie(x[-1], W[1])
        out = W[0]
        self.V.label.setdefault(out, label)
        if b is not None:
            B = self.pvars(b) if isinstance(b, Tensor) else b
            if _is_t(B):
                self.tie(out, B[-1])
        self.candidate(xnode, -1, x[-1])
        d = tuple(x[:-1]) + (out,)
        self.desc[node] = d
        self.candidate(node, -1, out, "out")
        return d

    def conv(
        self,
        node: fx.Node,
        xnode: Any,
        x: tuple[int, ...],
        w: Any,
        b: Any,
        groups: int,
        transposed: bool,
        label: str,
        out_val: Tensor,
    ) -> Desc:
        W = self.pvars(w) if isinstance(w, Tensor) else w
        if not _is_t(W):
            return self.unknown(node, f"conv {node.name!r}", "weight is not a tensor")
        k = len(W) - 2
        for v in W[2:]:  # kernel positions
            self.V.pin(v)
        ch = len(x) - k - 1
        if ch not in (0, 1) or (transposed and groups != 1):
            # the weight (a module's, not an argument of the node) is pinned with the op
            self.pin_all(W)
            if isinstance(b, Tensor):
                self.pin_all(self.pvars(b))
            why = "unexpected input rank" if ch not in (0, 1) else "grouped transposed convolution"
            return self.unknown(node, f"conv {node.name!r}", why)
        cin = x[ch]
        if transposed:
            self.tie(cin, W[0])
            out = W[1]
        elif groups == 1:
            self.tie(cin, W[1])
            out = W[0]
        else:
            # channels = groups ⊗ per-group channels, on both sides; the group index is shared
            g = self.V.new(groups)
            self.tie(cin, self.V.structure("prod", [g, W[1]]))
            co = self.V.new(self.V.size[W[0]] // groups)
            self.tie(W[0], self.V.structure("prod", [g, co]))
            out = W[0]
        self.V.label.setdefault(out, label)
        if b is not None:
            B = self.pvars(b) if isinstance(b, Tensor) else b
            if _is_t(B):
                self.tie(out, B[0])
        self.candidate(xnode, ch, cin)
        spatial = self.fresh(out_val.shape[ch + 1 :], pinned=True)
        d = tuple(x[:ch]) + (out,) + spatial
        self.desc[node] = d
        self.candidate(node, ch, out, "out")
        return d

    def group_norm(self, x: tuple[int, ...], G: int, w: Any, b: Any) -> None:
        c = x[1] if len(x) > 1 else x[0]
        n = self.V.size[c]
        if G > 1:
            # statistics per group of consecutive channels: groups move whole, channels stay inside
            self.tie(c, self.V.structure("prod", [self.V.new(G), self.V.new(n // G)]))
        for t in (w, b):
            if isinstance(t, Tensor):
                self.tie(c, self.pvars(t)[0])
            elif _is_t(t):
                self.tie(c, t[0])

    def embedding(self, x: tuple[int, ...], w: Any, label: str) -> Desc:
        W = self.pvars(w) if isinstance(w, Tensor) else w
        self.V.pin(W[0])  # rows are addressed by the (never permuted) input indices
        self.V.label.setdefault(W[1], label)
        return tuple(x) + (W[1],)

    def glu(self, x: tuple[int, ...], dim: int, out_val: Tensor) -> Desc:
        dim = dim % len(x)
        half = self.V.new(self.V.size[x[dim]] // 2)
        self.tie(x[dim], self.V.structure("sum", [half, half]))
        return tuple(x[:dim]) + (half,) + tuple(x[dim + 1 :])

    def spatial(self, x: tuple[int, ...], k: int, out_shape: Sequence[int]) -> Desc:
        k = min(k, len(x))
        return tuple(x[: len(x) - k]) + self.fresh(out_shape[len(x) - k :], pinned=True)

    def reshape(
        self, x: tuple[int, ...], out_shape: Sequence[int], node: fx.Node | None = None
    ) -> Desc:
        """Row-major reshape: split and merge axes through products of variables.

        An output axis that is only ever indexed by constants (``qkv.view(B, T, 3, H, d)`` then
        ``qkv[0]``/``unbind``) splits its atom into a direct sum of independent slices instead.
        """
        V = self.V
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
            sel = self._selector_split(node, queue, out_shape, j) if node is not None else None
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
            for v in atoms:
                V.pin(v)
            return self.fresh(out_shape, pinned=True)
        return tuple(out)

    def _selector_split(
        self, node: fx.Node, queue: list[int], out_shape: Sequence[int], j: int
    ) -> list[int] | None:
        V = self.V
        c = out_shape[j]
        if not queue or V.defn_of(queue[0]) is not None or not 1 < c <= 64:
            return None
        n = V.size[queue[0]]
        if n % c or n == c:
            return None
        rest, k, prod = n // c, j + 1, 1
        while k < len(out_shape) and prod < rest:
            prod *= out_shape[k]
            k += 1
        if prod != rest or not self._select_only(node, j, len(out_shape)):
            return None
        v = queue.pop(0)
        t = V.new(c, pinned=True)
        sizes = list(out_shape[j + 1 : k])
        shared = [V.new(sz) for sz in sizes]
        slices = [[V.new(sz) for sz in sizes] for _ in range(c)]
        V.union(v, V.structure("sum", [V.structure("prod", ys) for ys in slices]))
        self.selector[t] = (shared, slices)
        return [t, *shared]

    def select(self, d: tuple[int, ...], t: int, i: int) -> tuple[int, ...]:
        """Slice ``i`` of a selector axis: its shared variables become that slice's own."""
        shared, slices = self.selector[t]
        sub = dict(zip(shared, slices[i], strict=True))
        return tuple(sub.get(v, v) for v in d)

    # --- attention ------------------------------------------------------------------------------
    def mha(self, node: fx.Node, m: nn.MultiheadAttention, path: str) -> Desc:
        try:
            bound = inspect.signature(m.forward).bind(*node.args, **node.kwargs)
        except TypeError:
            return self._opaque_module(node, m, path, "unexpected arguments")
        bound.apply_defaults()
        args = bound.arguments
        q, k, v = (self.arg_desc(args[n]) for n in ("query", "key", "value"))
        out_val = self.tr.values.get(node)
        if not (_is_t(q) and _is_t(k) and _is_t(v)) or not isinstance(out_val, tuple):
            return self._opaque_module(node, m, path, "unexpected inputs")
        V = self.V
        H = m.num_heads
        d = m.head_dim
        h = V.new(H, label=path)
        dqk, dv = V.new(d), V.new(d)
        Q = V.structure("prod", [h, dqk])
        Vv = V.structure("prod", [h, dv])
        V.label.setdefault(Q, path)
        V.label.setdefault(Vv, path)
        if m._qkv_same_embed_dim:
            W = self.pvars(m.in_proj_weight)
            self.tie(W[0], V.structure("sum", [Q, Q, Vv]))
            for t in (q, k, v):
                self.tie(t[-1], W[1])
        else:
            for t, w, row in (
                (q, m.q_proj_weight, Q),
                (k, m.k_proj_weight, Q),
                (v, m.v_proj_weight, Vv),
            ):
                Wt = self.pvars(w)
                self.tie(Wt[0], row)
                self.tie(t[-1], Wt[1])
        if m.in_proj_bias is not None:
            self.tie(self.pvars(m.in_proj_bias)[0], V.structure("sum", [Q, Q, Vv]))
        if m.bias_k is not None:
            assert m.bias_v is not None  # add_bias_kv sets both
            self.tie(self.pvars(m.bias_k)[-1], Q)
            self.tie(self.pvars(m.bias_v)[-1], Vv)
        Wo = self.pvars(m.out_proj.weight)
        self.tie(Wo[1], Vv)
        out = Wo[0]
        V.label.setdefault(out, path + ".out_proj")
        if m.out_proj.bias is not None:
            self.tie(out, self.pvars(m.out_proj.bias)[0])
        # sequence and batch axes: query's for the output, key's == value's
        for a, b in zip(k[:-1], v[:-1], strict=False):
            self.tie(a, b)
        mask = self.arg_desc(args.get("attn_mask"))
        if _is_t(mask) and len(mask) == 3:  # per-head masks (N*H, L, S): heads stay in place
            V.pin(h)
        self.candidate(args["query"], -1, q[-1])
        res_attn = tuple(q[:-1]) + (out,)
        weights = out_val[1]
        if isinstance(weights, Tensor):
            wd = self.fresh(weights.shape)
            if weights.dim() == 4:
                self.tie(wd[1], h)
            for u in wd:
                V.pin(u)  # rows/cols follow query/key positions, never hidden units
            return [res_attn, wd]
        return [res_attn, None]

    def sdpa(self, node: fx.Node) -> Desc:
        names = ["query", "key", "value", "attn_mask"]
        vals = list(node.args) + [None] * 4
        args = {n: node.kwargs.get(n, vals[i]) for i, n in enumerate(names)}
        q, k, v = (self.arg_desc(args[n]) for n in ("query", "key", "value"))
        out_val = self.tr.values.get(node)
        if not (_is_t(q) and _is_t(k) and _is_t(v)) or not isinstance(out_val, Tensor):
            return self.unknown(node, "scaled_dot_product_attention", "unexpected inputs")
        if (
            node.kwargs.get("enable_gqa")
            # q and k have descriptions, so both are nodes
            and self.tr.values[cast(fx.Node, args["key"])].shape
            != self.tr.values[cast(fx.Node, args["query"])].shape
        ):
            return self.unknown(node, "scaled_dot_product_attention", "grouped-query attention")
        n = len(out_val.shape)
        batch = self.broadcast([q[:-2], k[:-2], v[:-2]], out_val.shape[:-2])
        self.tie(q[-1], k[-1])
        self.tie(k[-2], v[-2])
        mask = self.arg_desc(args["attn_mask"])
        if _is_t(mask):
            scores = tuple(batch) + (q[-2], k[-2])
            self.broadcast(
                [scores, mask], tuple(out_val.shape[:-2]) + (out_val.shape[-2], self.V.size[k[-2]])
            )
        assert len(batch) == n - 2
        return tuple(batch) + (q[-2], v[-1])

    def matmul(self, node: fx.Node, anode: Any, bnode: Any) -> Desc:
        a, b = self.arg_desc(anode), self.arg_desc(bnode)
        out_val = self.tr.values.get(node)
        if (
            not (_is_t(a) and _is_t(b))
            or not isinstance(out_val, Tensor)
            or len(a) == 0
            or len(b) == 0
        ):
            return self.unknown(node, _name_of(node.target), "unexpected operands")
        # the contracted axes: a's last, b's second-to-last (its only one for a vector)
        self.tie(a[-1], b[-2] if len(b) > 1 else b[0])
        a_param = isinstance(anode, fx.Node) and anode.op == "get_attr"
        b_param = isinstance(bnode, fx.Node) and bnode.op == "get_attr"
        if b_param and not a_param:
            self.candidate(anode, -1, a[-1])
            self.V.label.setdefault(b[-1], self._label_of(bnode, node))
        if a_param and not b_param and len(b) > 1:
            self.candidate(bnode, len(b) - 2, b[-2])
        if len(a) > 1 and len(b) > 1:
            batch = self.broadcast([tuple(a[:-2]), tuple(b[:-2])], out_val.shape[:-2])
            return tuple(batch) + (a[-2], b[-1])
        if len(a) == 1 and len(b) == 1:
            return ()
        if len(a) == 1:  # (k) @ (..., k, m) -> (..., m)
            return tuple(b[:-2]) + (b[-1],)
        return tuple(a[:-1])  # (..., n, k) @ (k) -> (..., n)

    def einsum(self, node: fx.Node) -> Desc:
        eq = self.value(node.args[0])
        ops = node.args[1:]
        if len(ops) == 1 and isinstance(ops[0], list | tuple):
            ops = tuple(ops[0])
        descs = [self.arg_desc(o) for o in ops]
        out_val = self.tr.values.get(node)
        if (
            not isinstance(eq, str)
            or "..." in eq
            or not all(_is_t(d) for d in descs)
            or not isinstance(out_val, Tensor)
        ):
            return self.unknown(node, "einsum", "unsupported equation")
        eq = eq.replace(" ", "")
        lhs, _, rhs = eq.partition("->")
        terms = lhs.split(",")
        if not rhs and "->" not in eq:
            rhs = "".join(
                sorted(c for c in set(lhs.replace(",", "")) if lhs.replace(",", "").count(c) == 1)
            )
        letter: dict[str, int] = {}
        for term, d in zip(terms, descs, strict=False):
            for c, v in zip(term, d, strict=False):
                if self.V.size[v] == 1:
                    continue
                if c in letter:
                    self.tie(letter[c], v)
                else:
                    letter[c] = v
        return tuple(letter.get(c, self.V.new(s)) for c, s in zip(rhs, out_val.shape, strict=False))

    # --- functions and methods --------------------------------------------------------------------
    def call_op(self, node: fx.Node) -> Desc:
        target = node.target
        name = _name_of(target)
        out_val: Any = self.tr.values.get(node)
        args = node.args
        x: Desc = self.arg_desc(args[0]) if args else None

        if target is operator.getitem:
            return self.getitem(node, x)
        if name == "getattr" and node.op == "call_function":
            attr = args[1]
            if attr in ("T", "mT") and _is_t(x):
                return self.permute_like(node, x, out_val)
            if attr == "data" and _is_t(x):
                return x
            return (
                None
                if not isinstance(out_val, Tensor)
                else self.unknown(node, f"attribute .{attr}")
            )
        if target is F.scaled_dot_product_attention:
            return self.sdpa(node)
        if name == "einsum":
            return self.einsum(node)
        if name in ("matmul", "mm", "bmm") or target is operator.matmul:
            return self.matmul(node, args[0], args[1])
        if name in ("addmm", "baddbmm"):
            d = self.matmul(node, args[1], args[2])
            bias = self.arg_desc(args[0])
            if _is_t(d) and _is_t(bias):
                return self.broadcast([d, bias], out_val.shape)
            return d
        if target is F.linear:
            w = self.arg_desc(args[1] if len(args) > 1 else node.kwargs.get("weight"))
            b = self.arg_desc(args[2] if len(args) > 2 else node.kwargs.get("bias"))
            if not _is_t(x):
                return self.unknown(node, "linear")
            return self.linear(
                node, args[0], x, w, b, self._label_of(args[1] if len(args) > 1 else None, node)
            )
        if target in (F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d):
            vals = list(args) + [None] * 7
            w = self.arg_desc(vals[1] if vals[1] is not None else node.kwargs.get("weight"))
            b = self.arg_desc(vals[2] if vals[2] is not None else node.kwargs.get("bias"))
            groups = self.value(vals[6] if vals[6] is not None else node.kwargs.get("groups", 1))
            if not _is_t(x):
                return self.unknown(node, name)
            return self.conv(
                node,
                args[0],
                x,
                w,
                b,
                int(groups or 1),
                False,
                self._label_of(vals[1], node),
                out_val,
            )
        if target in (F.embedding, torch.embedding):
            w = self.arg_desc(args[1])
            return (
                self.embedding(x, w, self._label_of(args[1], node))
                if _is_t(w)
                else self.unknown(node, name)
            )
        if target is F.layer_norm or (target is F.rms_norm if hasattr(F, "rms_norm") else False):
            shape = self.value(args[1] if len(args) > 1 else node.kwargs.get("normalized_shape"))
            kk = len(shape) if isinstance(shape, list | tuple | torch.Size) else 1
            for t in list(args[2:4]) + [node.kwargs.get("weight"), node.kwargs.get("bias")]:
                dt = self.arg_desc(t)
                if _is_t(dt):
                    for i, v in enumerate(dt):
                        self.tie(x[len(x) - kk + i], v)
            return x
        if target is F.group_norm:
            G = self.value(args[1] if len(args) > 1 else node.kwargs.get("num_groups"))
            w = self.arg_desc(args[2] if len(args) > 2 else node.kwargs.get("weight"))
            b = self.arg_desc(args[3] if len(args) > 3 else node.kwargs.get("bias"))
            self.group_norm(x, int(G), w, b)
            return x
        if target in (F.batch_norm, F.instance_norm):
            c = x[1] if len(x) > 1 else x[0]
            for t in list(args[1:5]) + [
                node.kwargs.get(k) for k in ("running_mean", "running_var", "weight", "bias")
            ]:
                dt = self.arg_desc(t)
                if _is_t(dt) and len(dt) == 1:
                    self.tie(c, dt[0])
            return x
        if target in (F.prelu, torch.prelu) and _is_t(x):
            w = self.arg_desc(args[1] if len(args) > 1 else node.kwargs.get("weight"))
            if not _is_t(w) or len(w) != 1:
                return self.unknown(node, name)
            if self.V.size[w[0]] > 1:  # one slope per channel (axis 1, or 0 when unbatched)
                self.tie(x[1 if len(x) > 1 else 0], w[0])
            return x
        if target is F.glu:
            dim = self.value(args[1] if len(args) > 1 else node.kwargs.get("dim", -1))
            return self.glu(x, dim, out_val)
        if target is F.pad:
            pad = self.value(args[1] if len(args) > 1 else node.kwargs.get("pad"))
            return self.spatial(x, len(pad) // 2, out_val.shape)
        if name in ("interpolate", "upsample", "upsample_nearest", "upsample_bilinear") or (
            name.startswith(
                ("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool", "lp_pool")
            )
            and not name.endswith("with_indices")
        ):
            if not _is_t(x) or not isinstance(out_val, Tensor):
                return self.unknown(node, name)
            digits = "".join(ch for ch in name if ch.isdigit())
            k = int(digits) if digits else len(x) - 2
            if (
                name.startswith("adaptive_max_pool")
                and isinstance(self.value(node.kwargs.get("return_indices")), bool)
                and self.value(node.kwargs.get("return_indices"))
            ):
                return self.unknown(node, name, "returns indices")
            return self.spatial(x, k, out_val.shape)
        if name in ("cat", "concat", "concatenate"):
            return self.cat(node)
        if name == "stack":
            tensors = self.arg_desc(args[0])
            dim = self.value(args[1] if len(args) > 1 else node.kwargs.get("dim", 0))
            if not isinstance(tensors, list) or not all(_is_t(t) for t in tensors):
                return self.unknown(node, name)
            nd = len(out_val.shape)
            dim = dim % nd
            shape = list(out_val.shape)
            del shape[dim]
            b = self.broadcast(tensors, shape)
            return tuple(b[:dim]) + (self.V.new(out_val.shape[dim], pinned=True),) + tuple(b[dim:])
        if name in ("chunk", "split", "tensor_split", "split_with_sizes", "unbind"):
            return self.split(node, x, name, out_val)
        if name in _FACTORY_FREE:
            return self.out_desc_from_value(out_val, pinned=False)
        if name in ("tril", "triu"):
            if _is_t(x) and len(x) >= 2:
                self.V.pin(x[-1])
                self.V.pin(x[-2])
            return x
        if name in _PERMUTE and _is_t(x):
            return self.permute_like(node, x, out_val)
        if name in _SHAPE_ONLY and _is_t(x):
            if not isinstance(out_val, Tensor) or out_val.numel() != math.prod(
                self.V.size[v] for v in x
            ):
                return self.unknown(node, name)
            return self.reshape(x, out_val.shape, node)
        if name in ("expand", "expand_as", "broadcast_to"):
            if not _is_t(x):
                return self.unknown(node, name)
            n = len(out_val.shape)
            out = []
            for i, s in enumerate(out_val.shape):
                j = len(x) - n + i
                out.append(x[j] if j >= 0 and self.V.size[x[j]] == s else self.V.new(s))
            return tuple(out)
        if name == "repeat" and _is_t(x):
            n = len(out_val.shape)
            out = []
            for i, s in enumerate(out_val.shape):
                j = len(x) - n + i
                if j < 0:
                    out.append(self.V.new(s))
                elif self.V.size[x[j]] == s:
                    out.append(x[j])
                else:  # tiled copies: (pinned) copy index ⊗ the original axis
                    tile = self.V.new(s // self.V.size[x[j]], pinned=True)
                    out.append(self.V.structure("prod", [tile, x[j]]))
            return tuple(out)
        if name in _UNARY and _is_t(x) and isinstance(out_val, Tensor):
            if out_val.shape != tuple(self.V.size[v] for v in x):
                return self.unknown(node, name, "changes the shape")
            if name in ("type_as", "to"):
                return x
            return (
                self.broadcast(self._tensor_args(node), out_val.shape)
                if name in ("clamp", "clip")
                else x
            )
        if name in _BINARY or (name in ("max", "min") and len(self._tensor_args(node)) == 2):
            tens = self._tensor_args(node)
            if isinstance(out_val, Tensor):
                res = self.broadcast(tens, out_val.shape)
                if name in ("add", "iadd", "add_") and len(tens) > 1:
                    self.residual.update(res)  # a residual stream (names the group "….stream")
                return res
            return self.unknown(node, name)
        if name in _REDUCE or name in ("max", "min", "norm"):
            return self.reduce(node, x, name, out_val)
        if name in _NON_TENSOR_OK:
            if isinstance(out_val, Tensor):
                return self.unknown(node, name)
            return None
        if not self._tensor_args(node) and not isinstance(out_val, Tensor | tuple | list):
            return None
        if not any(self._has_tensor(self.arg_desc(a)) for a in (*args, *node.kwargs.values())):
            # a tensor made from nothing the network computed (arange, rand, ...): positions matter
            return self.out_desc_from_value(out_val, pinned=True)
        return self.unknown(node, f"{node.op} {name!r}")

    def _label_of(self, wnode: Any, node: fx.Node) -> str:
        if isinstance(wnode, fx.Node) and wnode.op == "get_attr":
            t = str(wnode.target)
            t = t[len(self.tr.prefix) :] if t.startswith(self.tr.prefix) else t
            return t.rsplit(".", 1)[0] if t.endswith((".weight", ".bias")) else t
        return node.name

    def permute_like(self, node: fx.Node, x: tuple[int, ...], out_val: Any) -> Desc:
        """Axis permutations (permute, transpose, movedim, .T, ...)."""
        amap = self._axis_map(node, len(x))
        if amap is None:
            return self.unknown(node, _name_of(node.target))
        return tuple(x[i] for i in amap)

    def _axis_map(self, node: fx.Node, n: int) -> list[int] | None:
        """For an axis permutation op, the input axis of each output axis (run on a probe)."""
        probe_shape = [2 + i for i in range(n)]
        probe = torch.empty(probe_shape, device="meta")
        try:
            if node.op == "call_function" and _name_of(node.target) == "getattr":
                res = getattr(probe, str(node.args[1]))
            else:
                rest = self.value(node.args[1:])
                kw = self.value(dict(node.kwargs))
                if node.op == "call_method":
                    res = getattr(probe, str(node.target))(*rest, **kw)
                elif callable(node.target):
                    res = node.target(probe, *rest, **kw)
                else:
                    return None
            return [probe_shape.index(s) for s in res.shape]
        except Exception:  # noqa: BLE001 - any failure: unknown op
            return None

    def _select_only(self, node: fx.Node, axis: int, rank: int, depth: int = 0) -> bool:
        """Is ``axis`` of ``node`` only ever indexed by constants (``qkv[0]``, ``unbind``),
        through axis permutations? Then its slices are independent unit sets (timm-style qkv)."""
        if not node.users or depth > 6:
            return False
        for u in node.users:
            if not u.args or u.args[0] is not node:
                return False
            name = _name_of(u.target)
            if u.op in ("call_method", "call_function") and name == "contiguous":
                ok = self._select_only(u, axis, rank, depth + 1)
            elif u.op in ("call_method", "call_function") and name in _PERMUTE:
                amap = self._axis_map(u, rank)
                ok = amap is not None and self._select_only(u, amap.index(axis), rank, depth + 1)
            elif u.target is operator.getitem:
                idx = self.value(u.args[1])
                idx = idx if isinstance(idx, tuple) else (idx,)
                ok = (
                    len(idx) > axis
                    and isinstance(idx[axis], int)
                    and all(i == slice(None) for i in idx[:axis])
                    and all(i == slice(None) for i in idx[axis + 1 :])
                )
            elif name == "unbind":
                dim = self.value(u.args[1] if len(u.args) > 1 else u.kwargs.get("dim", 0))
                ok = isinstance(dim, int) and dim % rank == axis
            else:
                ok = False
            if not ok:
                return False
        return True

    def cat(self, node: fx.Node) -> Desc:
        args = node.args
        tensors_node = args[0] if args else node.kwargs.get("tensors")
        tensors = self.arg_desc(tensors_node)
        dim = self.value(
            args[1] if len(args) > 1 else node.kwargs.get("dim", node.kwargs.get("axis", 0))
        )
        out_val = self.tr.values.get(node)
        if not isinstance(tensors, list) or not isinstance(out_val, Tensor):
            return self.unknown(node, "cat")
        if not all(_is_t(t) and len(t) == out_val.dim() for t in tensors):
            return self.unknown(node, "cat", "operands of another rank or untracked")
        nd = out_val.dim()
        dim = dim % nd
        others = [tuple(t[:dim]) + tuple(t[dim + 1 :]) for t in tensors]
        shape = list(out_val.shape)
        del shape[dim]
        b = self.broadcast(others, shape)
        parts = [t[dim] for t in tensors if self.V.size[t[dim]] > 0]
        s = self.V.structure("sum", parts) if parts else self.V.new(0)
        return tuple(b[:dim]) + (s,) + tuple(b[dim:])

    def split(self, node: fx.Node, x: Desc, name: str, out_val: Any) -> Desc:
        if (
            not _is_t(x)
            or not isinstance(out_val, tuple | list)
            or not all(isinstance(o, Tensor) for o in out_val)
        ):
            return self.unknown(node, name)
        if name == "unbind":
            dim = self.value(
                node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            ) % len(x)
            rest = tuple(x[:dim]) + tuple(x[dim + 1 :])
            if x[dim] in self.selector:
                return [self.select(rest, x[dim], i) for i in range(len(out_val))]
            self.V.pin(x[dim])
            return [rest for _ in out_val]
        dim = self.value(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0))
        dim = dim % len(x)
        parts = [self.V.new(o.shape[dim]) for o in out_val]
        self.tie(x[dim], self.V.structure("sum", [p for p in parts if self.V.size[p] > 0]))
        return [tuple(x[:dim]) + (p,) + tuple(x[dim + 1 :]) for p in parts]

    def reduce(self, node: fx.Node, x: Desc, name: str, out_val: Any) -> Desc:
        if not _is_t(x):
            return self.unknown(node, name)
        args = list(node.args) + [None] * 4
        kw = node.kwargs
        if name == "norm":
            dim, keep = kw.get("dim", args[2]), kw.get("keepdim", args[3])
        else:
            dim, keep = kw.get("dim", kw.get("axis", args[1])), kw.get("keepdim", args[2])
        dim, keep = self.value(dim), bool(self.value(keep))
        if isinstance(dim, bool):  # std/var(x, unbiased)
            dim = None
        if dim is None:
            if isinstance(out_val, Tensor) and out_val.dim() == 0:
                return ()
            return self.unknown(node, name)
        try:
            dims = {d % len(x) for d in (dim if isinstance(dim, list | tuple) else [dim])}
        except TypeError:  # named dimensions or another unexpected argument
            return self.unknown(node, name, "unexpected dim argument")
        # keepdim from the result's rank: positional arguments differ between reductions
        # (std(x, dim, unbiased, keepdim), norm(x, p, dim, keepdim), ...)
        first = out_val[0] if isinstance(out_val, tuple) and out_val else out_val
        sizes = [self.V.size[v] for v in x]
        drop = [n for i, n in enumerate(sizes) if i not in dims]
        ones = [1 if i in dims else n for i, n in enumerate(sizes)]
        if not isinstance(first, Tensor) or not dims:
            return self.unknown(node, name)
        if list(first.shape) == ones:
            keep = True
        elif list(first.shape) == drop:
            keep = False
        else:
            return self.unknown(node, name, "unexpected result shape")
        if name in ("max", "min"):  # (values, indices): indices give positions away
            for d in dims:
                self.V.pin(x[d])
        kept = tuple(v for i, v in enumerate(x) if i not in dims)
        if keep:
            kept = tuple(self.V.new(1) if i in dims else v for i, v in enumerate(x))
        if isinstance(out_val, tuple):
            return [kept for _ in out_val]
        return kept

    def getitem(self, node: fx.Node, x: Desc) -> Desc:
        idx = node.args[1]
        out_val = self.tr.values.get(node)
        if isinstance(x, list):
            i = self.value(idx)
            try:
                return x[i]
            except (TypeError, IndexError):
                return self.unknown(node, "getitem")
        if not _is_t(x):
            if isinstance(out_val, Tensor):
                return self.out_desc_from_value(out_val, pinned=True)
            return None
        index = self.value(idx)
        if not isinstance(index, tuple):
            index = (index,)
        if any(isinstance(i, Tensor | list) for i in index):
            return self.unknown(node, "tensor indexing", "advanced (tensor) indexing")
        n_consume = sum(1 for i in index if i is not None and i is not Ellipsis)
        expanded: list[Any] = []
        for i in index:
            if i is Ellipsis:
                expanded.extend([slice(None)] * (len(x) - n_consume))
            else:
                expanded.append(i)
        out: list[int] = []
        pos = 0
        chosen: tuple[int, int] | None = None
        for i in expanded:
            if i is None:
                out.append(self.V.new(1))
                continue
            v = x[pos]
            size = self.V.size[v]
            pos += 1
            if isinstance(i, int):
                if v in self.selector:
                    chosen = (v, i % size)
                elif size != 1:
                    self.V.pin(v)
                    self.pending.append((f"indexing {node.name!r}", "selects one position", [v]))
                continue
            if isinstance(i, slice):
                start, stop, step = i.indices(size)
                if start == 0 and stop == size and step == 1:
                    out.append(v)
                else:
                    self.V.pin(v)
                    self.pending.append((f"slicing {node.name!r}", "keeps some positions", [v]))
                    out.append(self.V.new(len(range(start, stop, step)), pinned=True))
                continue
            return self.unknown(node, "getitem")
        out.extend(x[pos:])
        if chosen is not None:
            return self.select(tuple(out), *chosen)
        return tuple(out)

    # ============================================================================================
    # From classes to a spec
    # ============================================================================================
    def finish(self) -> PermutationSpec:
        V = self.V
        self.resolve_heads()
        self.flush_warnings()
        roots_in_order: list[int] = []
        seen: set[int] = set()
        for v in range(len(V.parent)):
            r = V.find(v)
            if r not in seen:
                seen.add(r)
                roots_in_order.append(r)
        self.first = {r: i for i, r in enumerate(roots_in_order)}
        # emit slots for every parameter axis
        self.slots: dict[Any, list[Slot]] = {}
        for tid, vars_ in self.param_vars.items():
            keys = self.param_keys.get(tid)
            if not keys:
                continue
            for axis, v in enumerate(vars_):
                placed: list[tuple[Any, dict[str, int]]] = []
                self.emit(v, 0, 1, V.size[v], 1, placed)
                for key in keys:
                    for g, kw in placed:
                        self.slots.setdefault(g, []).append(Slot(key, axis, **kw))
        # groups: ordered by first appearance
        gkeys = sorted(self.slots, key=lambda g: self.first[g[1]])
        labels = self.group_labels()
        names = _unique_names([self.name_group(g, labels) for g in gkeys])
        self.gname = dict(zip(gkeys, names, strict=True))
        groups = {self.gname[g]: self.group_size(g) for g in gkeys}
        slots = {self.gname[g]: tuple(self.slots[g]) for g in gkeys}
        heads = {
            self.gname[g]: Heads(V.size[V.find(g[1])], tuple(self.segments[g[1]][1]))
            for g in gkeys
            if g[0] == "heads"
        }
        sites = self.make_sites()
        return PermutationSpec(groups=groups, slots=slots, sites=sites, heads=heads)

    # --- attention groups --------------------------------------------------------------------
    def resolve_heads(self) -> None:
        lay = resolve_heads(
            self.V, {v for d in self.param_vars.values() for v in d}, self.all_descs
        )
        self.segments, self.seg_of = lay.segments, lay.seg_of

    # --- slots ----------------------------------------------------------------------------------
    def emit(self, v: int, offset: int, reps: int, stride: int, block: int, out: list[Any]) -> None:
        V = self.V
        r = V.find(v)
        n = V.size[r]
        if V.pinned[r] or n == 0:
            return
        if r in self.seg_of:
            a, start = self.seg_of[r]
            self._place(("heads", a), offset, reps, stride, block, start, n, out)
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
    ) -> None:
        n = self.group_size_units(g, length)
        kw = {"offset": offset, "block": block, "unit_start": unit_start, "length": length}
        if reps == 1 or stride == n * block:
            out.append((g, _clean({**kw, "repeats": reps})))
        else:
            for k in range(reps):
                out.append((g, _clean({**kw, "offset": offset + k * stride, "repeats": 1})))

    def group_size_units(self, g: Any, length: int | None) -> int:
        return length if length is not None else self.V.size[g[1]]

    def group_size(self, g: Any) -> int:
        if g[0] == "heads":
            members, _ = self.segments[g[1]]
            return sum(self.V.size[m] for m in members)
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
                labs += by_root.get(g[1], [])
                out[g] = labs
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
        if any(self.V.find(v) == g[1] for v in self.residual):
            return f"{prefix}.stream" if prefix else "stream"
        return prefix or labs[0]

    # --- sites ----------------------------------------------------------------------------------
    def site_parts(self, v: int, offset: int) -> list[tuple[Any, int, int, int | None]] | None:
        V = self.V
        r = V.find(v)
        if V.pinned[r]:
            return []
        if r in self.seg_of:
            a, start = self.seg_of[r]
            return [(("heads", a), offset, start, V.size[r])]
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
        nodes = {n.name: n for n in self.tr.gm.graph.nodes}
        sites: dict[str, list[Site]] = {}
        seen: set[tuple[str, Site]] = set()
        for c in self.candidates:
            parts = self.site_parts(c.var, 0)
            node_name, axis, rank = c.node, c.axis, c.rank
            if parts is None:  # e.g. a flattened conv map: find the tensor before the reshape
                found = self._site_before_reshape(nodes[c.node], c.var)
                if found is None:
                    continue
                node_name, axis, rank, parts = found
            for g, off, start, length in parts:
                if g not in self.gname:
                    continue
                if g[0] == "plain" and c.kind != "in":
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
            if d is not None and r not in self.seg_of:
                stack.extend(d[1])
            elif not V.pinned[r]:
                wanted.add(r)
        cur = node
        for _ in range(8):
            d = self.desc.get(cur)
            if _is_t(d):
                for i, v in enumerate(d):
                    r = V.find(v)
                    if r in wanted:
                        parts = self.site_parts(r, 0)
                        if parts:
                            return cur.name, i, len(d), parts
            name = _name_of(cur.target)
            shape_op = (
                cur.op in ("call_method", "call_function")
                and (name in _SHAPE_ONLY or name in _PERMUTE or name == "contiguous")
            ) or (
                cur.op == "call_module"
                and isinstance(self.root.get_submodule(str(cur.target)), nn.Flatten | nn.Unflatten)
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


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def _common_prefix(labels: Sequence[str]) -> str:
    if not labels:
        return ""
    parts = [label.split(".") for label in labels]
    out: list[str] = []
    for items in zip(*parts, strict=False):
        if all(x == items[0] for x in items):
            out.append(items[0])
        else:
            break
    if all(len(p) == len(out) for p in parts) and out:  # identical labels: keep them whole
        return ".".join(out)
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


# ================================================================================================
# Verification: a last guard against a wrong spec
# ================================================================================================
def _flat_outputs(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out] if out.is_floating_point() or out.is_complex() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, tuple | list):
        return [t for o in out for t in _flat_outputs(o)]
    if hasattr(out, "to_tuple"):
        return _flat_outputs(out.to_tuple())
    return []


def _perturbed_state(model: nn.Module, seed: int) -> dict[str, Tensor]:
    """The model's state with random noise on float tensors, so symmetric initial values
    (LayerNorm weight 1, zero biases) cannot hide a wrong slot."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, t in model.state_dict().items():
        if t.is_floating_point() and t.numel() > 0:
            noise = torch.randn(t.shape, generator=gen).to(t)
            if k.endswith("running_var"):
                t = t * torch.exp(0.2 * noise)
            else:
                scale = float(t.float().std()) if t.numel() > 1 else 0.0
                t = t + noise * (0.1 * scale + 0.02)
        out[k] = t
    return out


def _run(model: nn.Module, state: dict[str, Tensor], inputs: Any) -> list[Tensor]:
    args, kwargs = call_args(inputs)
    with torch.no_grad():
        out = torch.func.functional_call(model, dict(state), args, kwargs, tie_weights=False)
    return [o.detach().float() for o in _flat_outputs(out)]


def _verify(model: nn.Module, spec: PermutationSpec, inputs: Any, warn: bool) -> PermutationSpec:
    if not spec.groups:
        return spec
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        state = _perturbed_state(model, 0)
        ref = _run(model, state, inputs)

        def same(sub: PermutationSpec) -> bool:
            perm = random_permutation(sub, seed=1)
            got = _run(model, apply_permutation(sub, perm, state), inputs)
            for a, b in zip(ref, got, strict=True):
                scale = float(a.abs().max()) if a.numel() else 0.0
                if a.shape != b.shape or not torch.allclose(
                    a, b, rtol=1e-3, atol=1e-4 * (1 + scale), equal_nan=True
                ):
                    return False
            return True

        if same(spec):
            return spec
        bad = [g for g in spec.groups if not same(_subspec(spec, [g]))]
        if warn:
            warnings.warn(
                f"modeconn.infer_spec: the inferred permutations of {bad} change the model's "
                "outputs "
                "on the example inputs; they are left out of the spec (please report this model)",
                stacklevel=3,
            )
        keep = [g for g in spec.groups if g not in bad]
        return _subspec(spec, keep)
    finally:
        for m, t in modes.items():
            m.training = t


def _subspec(spec: PermutationSpec, keep: Iterable[str]) -> PermutationSpec:
    keep = list(keep)
    return PermutationSpec(
        groups={g: spec.groups[g] for g in keep},
        slots={g: spec.slots[g] for g in keep if g in spec.slots},
        sites={g: spec.sites[g] for g in keep if g in spec.sites},
        heads={g: spec.heads[g] for g in keep if g in spec.heads},
    )


# ================================================================================================
# Public functions
# ================================================================================================
def infer_spec(
    model: nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Iterable[Any] | None = None,
    warn: bool = True,
    verify: bool = True,
) -> PermutationSpec:
    """Infer the permutation symmetry of ``model`` from a ``torch.fx`` trace of its forward pass.

    Hidden units of a network can be reordered without changing its function (Hecht-Nielsen
    1990; Entezari et al., ICLR 2022; Ainsworth et al., "Git Re-Basin", ICLR 2023). For a unit
    permutation ``P`` of a hidden layer, ``W_l' = P W_l``, ``b_l' = P b_l`` and
    ``W_{l+1}' = W_{l+1} Pᵀ`` give the same function; norms' weights, biases and running
    statistics follow ``P``; residual streams share one ``P``; attention allows a head
    permutation plus, inside each head, a permutation of the q/k dims and one of the v dims.
    The groups are found by union-find over tensor axes (see the module docstring); inputs and
    outputs are never permuted, and an op whose symmetry is unknown pins the axes it touches
    (with a warning naming it). The model is traced in eval mode and is not modified.
    Dropout counts as the identity: in train mode its random masks are tied to positions, so a
    permuted network with dropout agrees with the original only in distribution.

    Args:
        model: the network (any ``nn.Module``).
        example_inputs: one batch of inputs: a tensor, a tuple of positional inputs, or a dict of
            keyword inputs (e.g. ``{"input_ids": ids}``).
        leaf_modules: module types or dotted paths not to trace into (their axes are pinned).
        warn: warn about ops that make the spec smaller.
        verify: check the spec on ``example_inputs`` (random permutation, perturbed weights) and
            drop any group that changes the outputs, with a warning. A safety net; the
            inference itself does not rely on it.

    Returns:
        A :class:`~modeconn.PermutationSpec` with readable group names (``"fc1"``,
        ``"layer2.stream"``, ``"blocks.0.attn"``) and, per group, the forward-pass sites where
        activation matching measures its units.

    Raises:
        SpecError: the model fails on ``example_inputs`` (the message names the module), or it
            cannot be traced at all; the message says where, and how to write the spec by hand
            (``PermutationSpec.from_axes``) and pass it on (``spec=``).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> spec = infer_spec(net, torch.randn(2, 4))
        >>> spec.groups
        {'0': 8}
    """
    if not isinstance(model, nn.Module):
        raise SpecError(f"infer_spec expects an nn.Module, got {type(model).__name__}")
    tr = trace_model(model, example_inputs, leaf_modules=leaf_modules)
    an = _Analysis(model, tr, warn)
    an.run()
    spec = an.finish()
    spec.check(model.state_dict())
    if verify:
        spec = _verify(model, spec, example_inputs, warn)
    return spec


def capture_sites(
    model: nn.Module,
    spec: PermutationSpec,
    inputs: Any,
    *,
    nodes: Iterable[str] | None = None,
    state: dict[str, Tensor] | None = None,
    leaf_modules: Iterable[Any] | None = None,
) -> dict[str, Tensor]:
    """Run ``model`` once on ``inputs`` and return the tensors at the spec's sites.

    Node names are those of modeconn's trace (the same tracer as :func:`infer_spec`; the traced
    graph is cached per model and input shape). ``"module:<path>"`` sites are the outputs of
    submodules, captured with forward hooks. Runs under ``torch.no_grad()`` in the model's
    current train/eval mode.

    Args:
        model: the network.
        spec: a spec of this architecture (its ``sites`` name the tensors).
        inputs: one batch, as for :func:`infer_spec`.
        nodes: which sites to capture (default: every site of every group).
        state: optional state dict to run with instead of the model's own (functional call).
        leaf_modules: as given to :func:`infer_spec`, if any.

    Returns:
        ``{site node name: tensor}``.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> spec = infer_spec(net, torch.randn(2, 4))
        >>> acts = capture_sites(net, spec, torch.randn(5, 4))
        >>> {k: tuple(v.shape) for k, v in acts.items()}
        {'_1': (5, 8)}
    """
    wanted = list(
        dict.fromkeys(
            nodes if nodes is not None else (s.node for ss in spec.sites.values() for s in ss)
        )
    )
    if not wanted:
        return {}
    fx_names = [n for n in wanted if not n.startswith("module:")]
    mod_names = [n for n in wanted if n.startswith("module:")]
    out: dict[str, Tensor] = {}
    if fx_names:
        _, prefix, bound, _ = traced_root(model, inputs)
        for exact in (False, True):
            sub = _capture_module(
                cached_graph(model, inputs, leaf_modules, exact=exact), tuple(fx_names)
            )
            try:
                with torch.no_grad():
                    if state is None:
                        res = sub(**bound)
                    else:
                        res = torch.func.functional_call(
                            sub,
                            {prefix + k: v for k, v in state.items()},
                            (),
                            bound,
                            strict=False,
                            tie_weights=False,
                        )
                break
            except Exception:
                if exact:  # the graph traced for exactly these inputs fails: a real error
                    raise
        out.update(zip(fx_names, res, strict=True))
    if mod_names:
        got: dict[str, Tensor] = {}
        handles = []
        for n in mod_names:
            path = n[len("module:") :]
            try:
                m = model.get_submodule(path)
            except AttributeError as e:
                raise SpecError(f"site {n!r} names no submodule of {type(model).__name__}") from e
            handles.append(m.register_forward_hook(lambda _m, _i, o, n=n: got.__setitem__(n, o)))
        args, kwargs = call_args(inputs)
        try:
            with torch.no_grad():
                if state is None:
                    model(*args, **kwargs)
                else:
                    torch.func.functional_call(model, dict(state), args, kwargs, tie_weights=False)
        finally:
            for h in handles:
                h.remove()
        out.update(got)
    return {n: out[n] for n in wanted}


def _capture_module(gm: fx.GraphModule, names: tuple[str, ...]) -> fx.GraphModule:
    cache = gm.__dict__.setdefault("_modeconn_capture", {})
    if names in cache:
        return cache[names]
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    by_name = {}
    for n in gm.graph.nodes:
        if n.op == "output":
            continue
        env[n] = graph.node_copy(n, lambda a: env[a])
        by_name[n.name] = env[n]
    missing = [n for n in names if n not in by_name]
    if missing:
        raise SpecError(
            f"sites {missing} are not nodes of this model's trace; was the spec inferred for "
            "another "
            "architecture, or with other leaf_modules?"
        )
    graph.output(tuple(by_name[n] for n in names))
    sub = fx.GraphModule(gm, graph)
    sub.graph.eliminate_dead_code()
    sub.recompile()
    cache[names] = sub
    return sub
