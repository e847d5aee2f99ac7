"""modeconn's torch.fx tracer: a graph of the forward pass with every node's example value.

``infer_spec`` and ``capture_sites`` both trace through :func:`trace_model`, so fx node names (the
``node`` of a :class:`~modeconn._src.spec.Site`) agree between them. The tracer reads what eager
code reads:

- modules with a rule in the registry stay whole (leaves); everything else is traced into,
  including a subclass of a known module that overrides ``forward`` (a channels-first LayerNorm)
  and modules created inside ``forward`` (``nn.ReLU()(x)`` acts as ``F.relu``);
- every node runs on the example inputs while it traces (shapes for free), and Python's questions
  about traced values (``if x.dim() == 3``, ``len(x)``, ``int(n)``, ``range(n)``) get the example's
  answer; tensor metadata (``x.dtype``, ``x.device``, ``x.ndim``) is the example's, so
  ``torch.finfo(x.dtype)`` works; factory calls sized by traced values (``torch.ones(b, t)``) become
  graph nodes; a custom ``autograd.Function`` is one node (on every supported torch);
- a submodule that cannot be traced becomes an opaque leaf (its axes are pinned) with a warning
  naming the op, file and line; a model that cannot be traced at all raises :class:`SpecError`
  saying the same and how to fix it.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ..errors import SpecError
from .inputs import call_args, traced_root
from .patches import Patches
from .registry import module_rule

__all__ = ["Trace", "trace_model", "traced_root", "call_args", "FIX_HINT"]

FIX_HINT = (
    "fix: teach modeconn the op with mc.register_rule(op, rule), or write the spec by hand "
    "(mc.PermutationSpec.from_axes({group: size}, {param: (group or None per axis)})) and pass "
    "spec=..., or keep the submodule whole with infer_spec(..., leaf_modules=[...])"
)


def _words(text: str) -> list[str]:
    return text.split()


# tensor metadata answered from the example (never a graph node)
_META = frozenset(
    _words("""
    dtype device ndim layout is_cuda is_sparse is_quantized is_meta is_mkldnn is_nested
    requires_grad is_leaf
""")
)
_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))
_THIS = tuple(  # the tracer's own frames, skipped when looking for the model's source line
    os.path.join(os.path.dirname(os.path.abspath(__file__)), f) for f in ("tracer.py", "patches.py")
)


def user_frame(tb: Any = None) -> str:
    """``file:line `code``` of the innermost frame outside torch and modeconn (the model's
    source), or ``""`` when the failure is in modeconn or torch themselves."""
    frames = traceback.extract_tb(tb) if tb is not None else traceback.extract_stack()
    for fr in reversed(frames):
        f = os.path.abspath(fr.filename)
        if f.startswith(_HERE):  # reached modeconn itself: no model source in between
            return ""
        if not f.startswith(_TORCH) and "<" not in fr.filename[:1]:
            code = f" `{fr.line.strip()}`" if fr.line else ""
            return f"{os.path.basename(f)}:{fr.lineno}{code}"
    return ""


def _where_now() -> str:
    f: Any = sys._getframe(2)
    while f is not None:
        fn = os.path.abspath(f.f_code.co_filename)
        if fn.startswith(_HERE) and fn not in _THIS:
            return ""
        if not fn.startswith((_TORCH, *_THIS)) and not f.f_code.co_filename.startswith("<"):
            return f"{os.path.basename(fn)}:{f.f_lineno}"
        f = f.f_back
    return ""


@dataclass
class Trace:
    """A traced model: the fx graph module, each node's example value, and the opaque leaves."""

    gm: fx.GraphModule
    values: dict[fx.Node, Any]
    opaque: set[str] = field(default_factory=set)  # module paths traced as unknown leaves
    root: nn.Module | None = None  # the traced module: the model, or a wrapper around it
    prefix: str = ""  # "model." when the model was traced through a wrapper
    where: dict[fx.Node, str] = field(default_factory=dict)  # node -> "file:line"


class _ValueProxy(fx.Proxy):
    """An fx Proxy answering Python's questions (len, int, bool, iter, metadata) from its value."""

    def _value(self) -> Any:
        return self.tracer.values[self.node]  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return len(self._value())

    def __int__(self) -> int:
        return int(self._value())

    def __index__(self) -> int:
        return int(self._value())

    def __float__(self) -> float:
        return float(self._value())

    def __getattr__(self, k: str) -> Any:
        if k in _META:
            return getattr(self._value(), k)
        return super().__getattr__(k)


def _to_value(tracer: _Tracer, a: Any) -> Any:
    return fx.node.map_aggregate(a, lambda x: tracer.values[x] if isinstance(x, fx.Node) else x)


class _Tracer(fx.Tracer):
    def __init__(self, inputs: dict[str, Any], leaf_types: tuple[type, ...], leaf_paths: set[str]):
        super().__init__(autowrap_modules=(__import__("math"),), param_shapes_constant=False)
        self.proxy_buffer_attributes = True  # buffers become graph nodes like parameters
        self.inputs = inputs
        self.leaf_types = leaf_types
        self.leaf_paths = leaf_paths
        self.values: dict[fx.Node, Any] = {}
        self.where: dict[fx.Node, str] = {}
        self.failed_path: str | None = None
        self.failed_error: BaseException | None = None
        self.computing = False

    # --- which modules stay whole -------------------------------------------------------------
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_paths or isinstance(m, self.leaf_types):
            return True
        return module_rule(m) is not None

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        if self.computing:  # a leaf module's own children, run for its example value
            return forward(*args, **kwargs)
        try:
            self.path_of_module(m)
        except NameError:  # created inside forward: act as its functional form (trace into it)
            return forward(*args, **kwargs)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as e:
            if self.failed_path is None:  # the innermost module that failed
                self.failed_path = self.path_of_module(m)
                self.failed_error = e
            raise

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self.computing:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    # --- proxies that carry example values -----------------------------------------------------
    def create_node(
        self,
        kind: str,
        target: fx.node.Target,
        args: tuple[fx.node.Argument, ...],
        kwargs: dict[str, fx.node.Argument],
        name: str | None = None,
        type_expr: Any | None = None,
    ) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind == "get_attr" and node not in self.values:  # parameters, buffers, constants
            was, self.computing = self.computing, True  # plain attribute access, no proxies
            try:
                v: Any = self.root
                for part in str(target).split("."):
                    v = getattr(v, part)
            finally:
                self.computing = was
            self.values[node] = v
        return node

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ValueProxy(node, self)

    def create_proxy(
        self,
        kind: str,
        target: fx.node.Target,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        name: str | None = None,
        type_expr: Any | None = None,
        proxy_factory_fn: Callable[[fx.Node], fx.Proxy] | None = None,
    ) -> fx.Proxy:
        p = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        node = p.node
        if kind == "output":
            return p
        if kind == "placeholder":
            # concrete (defaulted) arguments become placeholders named like "mask_1"
            self.values[node] = self.inputs.get(str(target), node.args[0] if node.args else None)
            return p
        self.where[node] = _where_now()
        a, kw = _to_value(self, node.args), _to_value(self, node.kwargs)
        self.computing = True
        try:
            v = self._compute(kind, target, a, kw)
        finally:
            self.computing = False
        self.values[node] = v
        return p

    def _compute(self, kind: str, target: Any, a: Any, kw: Any) -> Any:
        with torch.no_grad():
            if kind == "get_attr":
                v: Any = self.root
                for part in str(target).split("."):
                    v = getattr(v, part)
            elif kind == "call_function":
                v = target(*a, **kw)
            elif kind == "call_method":
                v = getattr(a[0], target)(*a[1:], **kw)
            else:  # call_module, unpatched (fx patches nn.Module.__call__ while tracing)
                mod = self.root.get_submodule(target)
                v = fx._symbolic_trace._orig_module_call(mod, *a, **kw)
        return v

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self.values[obj.node])

    def iter(self, obj: fx.Proxy) -> Iterator[Any]:
        n = len(self.values[obj.node])
        return iter([obj[i] for i in range(n)])  # type: ignore[index]  # fx adds Proxy's operators at runtime

    def keys(self, obj: fx.Proxy) -> Any:
        return self.values[obj.node].keys()


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def trace_model(
    model: nn.Module, example_inputs: Any, *, leaf_modules: Iterable[Any] | None = None
) -> Trace:
    """Trace ``model`` on ``example_inputs`` with modeconn's tracer.

    The model is traced in eval mode (its train/eval flags are restored afterwards) and is not
    modified. A submodule that cannot be traced becomes an opaque leaf (with a warning); if the
    model itself cannot be traced, :class:`SpecError` names the op, its file and line, and the fix.

    Args:
        model: the network.
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
        leaf_modules: extra module types or dotted paths to keep whole (treated as unknown ops).

    Returns:
        A :class:`Trace`.

    Example:
        >>> t = trace_model(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), torch.zeros(2, 3))
        >>> [n.op for n in t.gm.graph.nodes]
        ['placeholder', 'call_module', 'call_module', 'output']
    """
    root, prefix, inputs, concrete = traced_root(model, example_inputs)
    types: list[type] = []
    paths: set[str] = set()
    for lm in leaf_modules or ():
        if isinstance(lm, str):
            paths.add(prefix + lm)
        elif isinstance(lm, type):
            types.append(lm)
        else:
            raise SpecError(
                f"leaf_modules entries must be module types or dotted paths, got {lm!r}"
            )
    opaque: set[str] = set(paths)
    modes = {m: m.training for m in model.modules()}
    attrs = set(root.__dict__)
    name = type(model).__name__
    model.eval()
    try:
        for _ in range(len(modes) + 1):
            tracer = _Tracer(inputs, tuple(types), paths)
            try:
                with Patches(tracer):
                    graph = tracer.trace(root, concrete_args=concrete or None)
                gm = fx.GraphModule(root, graph)
            except Exception as e:
                where = user_frame(e.__traceback__)
                at = f" at {where}" if where else ""
                path = tracer.failed_path
                if not path:
                    raise SpecError(
                        f"cannot trace {name}{at} ({_one_line(e)}); check that example_inputs "
                        f"fit the model; {FIX_HINT}"
                    ) from e
                sub = root.get_submodule(path)
                err = tracer.failed_error or e
                if path in paths or isinstance(sub, tuple(types)) or module_rule(sub) is not None:
                    # a leaf ran on the example values and failed: tracing is not the problem
                    raise SpecError(
                        f"{name} fails on the example inputs in module {path[len(prefix) :]!r} "
                        f"({type(sub).__name__}){at}: {_one_line(err)}; check that example_inputs "
                        "fit the model"
                    ) from e
                warnings.warn(
                    f"modeconn: module {path[len(prefix) :]!r} ({type(sub).__name__}) cannot be "
                    f"traced{at} ({_one_line(err)}); its inputs and outputs are not permuted; "
                    f"{FIX_HINT}",
                    stacklevel=3,
                )
                paths.add(path)
                opaque.add(path)
                continue
            finally:
                for n in set(root.__dict__) - attrs:  # fx parks tensor constants on the root
                    delattr(root, n)
                for n in [n for n in root._buffers if n.startswith("_tensor_constant")]:
                    del root._buffers[n]
            return Trace(gm, tracer.values, opaque, root, prefix, tracer.where)
        raise SpecError(f"cannot trace {name}; {FIX_HINT}")
    finally:
        for m, t in modes.items():
            m.training = t
