"""The graph walk: run every node of a trace through its rule and collect the union-find over axes.

Placeholders (network inputs) and outputs are pinned; parameters and buffers get one variable per
axis, shared by every use (weight tying); each ``call_function``/``call_method``/``call_module``
node is handed to its rule from the registry. An op without a rule pins every axis it touches;
one warning per such op (naming it, with file and line) is given at the end, if it pinned an axis
with hidden units.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

from torch import Tensor, fx, nn

from .axes import AxisVars
from .registry import Call, Desc, lookup, module_rule
from .tracer import FIX_HINT, Trace

__all__ = ["Walk", "is_t"]


def is_t(d: Desc) -> TypeGuard[tuple[int, ...]]:
    """Is ``d`` the description of one tensor (a tuple of axis variables)?"""
    return isinstance(d, tuple)


@dataclass
class Candidate:
    """A tensor axis where a group's units could be measured (a site)."""

    node: str
    axis: int
    var: int
    rank: int
    kind: str  # "in": enters a mixing layer; "out": leaves a projection (used for heads groups)


class Walk:
    """The state of one analysis; rules call its helpers (``tie``, ``pin``, ``desc``, ...)."""

    def __init__(self, model: nn.Module, tr: Trace, warn: bool) -> None:
        self.model = model
        self.tr = tr
        self.root = tr.root if tr.root is not None else model
        self.warn_enabled = warn
        self.V = AxisVars()
        self.descs: dict[fx.Node, Desc] = {}
        self.param_vars: dict[int, tuple[int, ...]] = {}  # id(tensor) -> vars per axis
        self.param_keys: dict[int, list[str]] = {}
        self.trainable: set[int] = set()
        for k, t in model.state_dict(keep_vars=True).items():
            self.param_keys.setdefault(id(t), []).append(k)
            if isinstance(t, nn.Parameter):
                self.trainable.add(id(t))
        self.candidates: list[Candidate] = []
        self.all_descs: list[tuple[int, ...]] = []  # every tensor description (for head locality)
        self.pending: dict[str, list[Any]] = {}  # op -> [(why, place, touched vars)]
        self.residual: set[int] = set()
        self.selector: dict[int, tuple[list[int], list[list[int]]]] = {}
        self.dropped: list[int] = []  # parts of sliced axes a slice left out

    # --- helpers for rules ----------------------------------------------------------------------
    def desc(self, a: Any) -> Desc:
        """The axis description of an argument: a node's, a parameter tensor's, or None."""
        if isinstance(a, fx.Node):
            return self.descs.get(a)
        if isinstance(a, Tensor):
            return self.pvars(a)
        if isinstance(a, tuple | list):
            return [self.desc(x) for x in a]
        if isinstance(a, dict):
            return [self.desc(x) for x in a.values()]
        if isinstance(a, slice):
            return [self.desc(a.start), self.desc(a.stop), self.desc(a.step)]
        return None

    def value(self, a: Any) -> Any:
        """The example value of an argument (nodes replaced by their values)."""
        return fx.node.map_aggregate(
            a, lambda x: self.tr.values.get(x) if isinstance(x, fx.Node) else x
        )

    def pvars(self, t: Tensor) -> tuple[int, ...]:
        """Variables of a parameter/buffer tensor's axes (shared by every use: weight tying)."""
        key = id(t)
        if key not in self.param_vars:
            # a tensor outside the state dict cannot be permuted with it, unless it is constant
            # (timm BEiT's zero k_bias buffer): reordering a constant changes nothing
            known = key in self.param_keys or _constant(t)
            why = None if known else "a tensor that is not in the state dict"
            self.param_vars[key] = tuple(self.V.new(s, not known, why=why) for s in t.shape)
            self.all_descs.append(self.param_vars[key])
        return self.param_vars[key]

    def tie(self, a: int, b: int) -> None:
        self.V.union(a, b)

    def pin(self, v: int, why: str | None = None) -> None:
        self.V.pin(v, why)

    def pin_all(self, d: Desc, why: str | None = None) -> None:
        for v in self.vars_of(d):
            self.V.pin(v, why)

    def fresh(
        self, shape: Sequence[int], pinned: bool = False, why: str | None = None
    ) -> tuple[int, ...]:
        return tuple(self.V.new(s, pinned, why=why) for s in shape)

    def from_value(self, value: Any, pinned: bool, why: str | None = None) -> Desc:
        """Fresh variables shaped like an example value (tensor, or nested tuples of them)."""
        if isinstance(value, Tensor):
            return self.fresh(value.shape, pinned, why)
        if isinstance(value, tuple | list):
            return [self.from_value(v, pinned, why) for v in value]
        if isinstance(value, dict):
            return [self.from_value(v, pinned, why) for v in value.values()]
        return None

    def vars_of(self, d: Desc) -> list[int]:
        if is_t(d):
            return list(d)
        if isinstance(d, list):
            return [v for x in d for v in self.vars_of(x)]
        return []

    def has_tensor(self, d: Desc) -> bool:
        return bool(self.vars_of(d)) or (is_t(d) and len(d) == 0)

    def tensor_args(self, call: Call) -> list[tuple[int, ...]]:
        out = []
        for a in (*call.args, *call.kwargs.values()):
            d = self.desc(a)
            if is_t(d):
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
        if isinstance(node, fx.Node) and is_t(self.descs.get(node)):
            rank = len(self.descs[node])
            self.candidates.append(Candidate(node.name, axis % rank, var, rank, kind))

    def label_of(self, wnode: Any, call: Call) -> str:
        """A group label for a weight argument: its module path, else the node's name."""
        if isinstance(wnode, fx.Node) and wnode.op == "get_attr":
            t = str(wnode.target)
            t = t[len(self.tr.prefix) :] if t.startswith(self.tr.prefix) else t
            return t.rsplit(".", 1)[0] if t.endswith((".weight", ".bias")) else t
        return call.label or call.node.name

    def note(self, call: Call, why: str, touched: Sequence[int], what: str | None = None) -> None:
        """Pin ``touched`` because of ``call``; warn (once per op) if hidden units were pinned."""
        what = what or op_title(call)
        reason = f"{what} at {call.where}: {why}" if call.where else f"{what}: {why}"
        for v in touched:
            self.V.pin(v, reason)
        at = f"at {call.where}" if call.where else f"(node {call.node.name})"
        place = f"{call.label!r} {at}" if call.module is not None else at
        self.pending.setdefault(what, []).append((why, place, list(touched)))

    def unknown(self, call: Call, why: str = "no rule for this op") -> Desc:
        """Pin every axis ``call`` touches (inputs, outputs, a module's tensors)."""
        ins = [self.desc(a) for a in (*call.args, *call.kwargs.values())]
        out = self.from_value(call.out, pinned=True, why=f"output of {op_title(call)}")
        if call.module is not None:
            for t in list(call.module.parameters()) + list(call.module.buffers()):
                self.pin_all(self.pvars(t), f"{op_title(call)}: {why}")
        if any(self.has_tensor(d) for d in ins) or self.has_tensor(out):
            self.note(call, why, [v for d in ins for v in self.vars_of(d)])
        return out

    # --- running the graph ------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.tr.gm.graph.nodes:
            if node.op == "placeholder":
                d = self.from_value(self.tr.values.get(node), True, f"network input {node.name!r}")
            elif node.op == "get_attr":
                val = self.tr.values.get(node)
                d = (
                    self.pvars(val)
                    if isinstance(val, Tensor)
                    else self.from_value(val, True, f"constant {node.target!r}")
                )
            elif node.op == "output":
                self.pin_all(self.desc(node.args[0]), "network output")
                continue
            elif node.op == "call_module":
                d = self.call_module(node)
            else:
                d = self.call_op(node)
            self.descs[node] = d
            self._record(d)

    def _record(self, d: Desc) -> None:
        if is_t(d):
            self.all_descs.append(d)
        elif isinstance(d, list):
            for x in d:
                self._record(x)

    def call_module(self, node: fx.Node) -> Desc:
        path = str(node.target)
        m = self.root.get_submodule(path)
        label = path[len(self.tr.prefix) :] if path.startswith(self.tr.prefix) else path
        call = Call(
            node, type(m).__name__, tuple(node.args), dict(node.kwargs),
            self.tr.values.get(node), m, label, self.tr.where.get(node, ""),
        )  # fmt: skip
        if path in self.tr.opaque:
            return self.unknown(call, "cannot be traced")
        x = self.desc(node.args[0]) if node.args else None
        for pname in ("weight", "bias"):
            t = getattr(m, pname, None)  # weight_norm / spectral_norm compute it from others
            if isinstance(t, Tensor) and id(t) not in self.param_keys and is_t(x):
                why = f"its {pname} is computed (weight_norm?), not a tensor of the state dict"
                self.note(call, why, list(x))
        fn = module_rule(m)
        if fn is None:  # kept whole by leaf_modules
            return self.unknown(call, "kept whole (leaf_modules)")
        return self.apply(fn, call)

    def apply(self, fn: Any, call: Call) -> Desc:
        """Run a rule; a rule that fails on an unexpected call counts as no rule (pins)."""
        try:
            return fn(self, call)
        except (IndexError, KeyError, TypeError, ValueError, AttributeError) as e:
            return self.unknown(call, f"its rule failed ({type(e).__name__}: {e})")

    def call_op(self, node: fx.Node) -> Desc:
        if isinstance(self.tr.values.get(node), Tensor) and not _data_used(node):
            # only its shape/dtype is read (``embed_positions(x[:, :, -1])`` reads x's shape):
            # its values reach nothing, so it relates no axes
            return self.from_value(self.tr.values.get(node), pinned=False)
        name, fn = lookup(node.target)
        label = node.name
        call = Call(
            node, name, tuple(node.args), dict(node.kwargs), self.tr.values.get(node), None,
            label, self.tr.where.get(node, ""),
        )  # fmt: skip
        if fn is not None:
            return self.apply(fn, call)
        ins = [self.desc(a) for a in (*node.args, *node.kwargs.values())]
        if not any(self.has_tensor(d) for d in ins):
            if not isinstance(call.out, Tensor | tuple | list):
                return None
            # a tensor made from nothing the network computed (arange, rand, ...): positions matter
            return self.from_value(call.out, True, f"made by {name!r} from constants")
        return self.unknown(call)

    # --- warnings -------------------------------------------------------------------------------
    def flush_warnings(self) -> None:
        # classes holding a layer's units (Linear/Conv outputs, embedding columns, attention):
        # pinning a positional axis (tokens, a relative-position table's rows) warns no one
        hidden = {self.V.find(v) for v in self.V.label}
        if not self.warn_enabled:
            return
        for what, uses in self.pending.items():
            hits = [
                (why, place) for why, place, vs in uses if any(self.V.find(v) in hidden for v in vs)
            ]
            if hits:
                (why, first), more = (
                    hits[0],
                    (f" and {len(hits) - 1} more" if len(hits) > 1 else ""),
                )
                warnings.warn(
                    f"modeconn.infer_spec: {what} {first}{more} ({why}) pins axes with hidden "
                    f"units, which are not permuted; {FIX_HINT}",
                    stacklevel=4,
                )


_META_METHODS = frozenset(
    [
        "size",
        "dim",
        "ndimension",
        "numel",
        "nelement",
        "element_size",
        "is_floating_point",
        "is_complex",
        "is_contiguous",
        "get_device",
        "stride",
        "storage_offset",
        "data_ptr",
    ]
)
_META_ATTRS = frozenset(["shape", "dtype", "device", "ndim", "layout", "is_cuda", "requires_grad"])


def _constant(t: Tensor) -> bool:
    flat = t.detach().flatten()
    return flat.numel() > 0 and not t.is_meta and bool((flat == flat[0]).all())


def _data_used(node: fx.Node) -> bool:
    """Does any user read the values of ``node`` (not only its shape, dtype, ...)? An in-place op
    (``x.add_(y)``, ``x[i] = y``) counts as read: its effect lives on in its input."""
    name = str(getattr(node.target, "__name__", node.target))
    if (name.endswith("_") and not name.endswith("__")) or name in ("setitem", "copy_"):
        return True
    if name.startswith("i") and getattr(node.target, "__module__", "") in ("operator", "_operator"):
        return True
    for u in node.users:
        if u.op == "call_method" and u.target in _META_METHODS and u.args[0] is node:
            continue
        name = getattr(u.target, "__name__", "")
        if u.op == "call_function" and name == "getattr" and u.args[1] in _META_ATTRS:
            continue
        if u.op == "call_function" and name in ("len", "_assert"):
            continue
        return True
    return not node.users  # no user: an in-place op's effect lives on in its input


def op_title(call: Call) -> str:
    """How warnings and pin reasons name an op: ``module Foo``, ``torch.roll``, ``x.view``."""
    if call.module is not None:
        return f"module {type(call.module).__name__}"
    if call.node.op == "call_method":
        return f"Tensor.{call.name}"
    if call.name == "getitem":
        return "indexing"
    mod = getattr(call.node.target, "__module__", None) or ""
    if mod.startswith("torch.nn.functional"):
        return f"F.{call.name}"
    if (
        mod.startswith("torch")
        or mod in ("", "builtins")
        and hasattr(__import__("torch"), call.name)
    ):
        return f"torch.{call.name}"
    return call.name
