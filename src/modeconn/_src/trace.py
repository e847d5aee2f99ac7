"""modeconn's torch.fx tracer: a graph of the forward pass with every node's example value.

``infer_spec`` and ``capture_sites`` both trace through :func:`trace_model`, so fx node names (the
``node`` of a :class:`~modeconn._src.spec.Site`) agree between them. The tracer is a
``torch.fx.Tracer`` that

- keeps a fixed set of modules whose symmetry modeconn knows (Linear, Conv, norms, activations,
  ``nn.MultiheadAttention``, ...) as leaves and traces through everything else, including other
  ``torch.nn`` modules such as ``nn.TransformerEncoderLayer``;
- runs every node on the example inputs while it traces (shapes for free, like
  ``torch.fx.passes.shape_prop.ShapeProp``), and answers Python control flow on traced values
  (``if x.dim() == 3``, ``len(x)``, ``int(n)``) with the example's value, so code written for
  eager mode (Hugging Face models included) traces; the graph is specialised to that control flow;
- turns a submodule that cannot be traced into an opaque leaf (the analysis then pins its inputs
  and outputs) instead of failing the whole model.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .errors import SpecError

# Modules whose forward modeconn's analysis understands, by the rule ``infer_spec`` applies to
# them (the one list of them: the tracer keeps all of them as leaves, never tracing into them).
# Element-wise, or equivariant to any reordering of every axis (softmax, dropout): output = input.
ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.Hardshrink,
    nn.Softshrink,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Threshold,
    nn.LogSigmoid,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    nn.Softmax,
    nn.LogSoftmax,
    nn.Softmin,
    nn.Softmax2d,
)
# Act on the trailing spatial axes only.
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
# Normalise (and scale) the trailing ``normalized_shape`` axes.
NORM_LAST_MODULES: tuple[type[nn.Module], ...] = (nn.LayerNorm,) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)
KNOWN_LEAVES: tuple[type[nn.Module], ...] = (
    (
        nn.Linear,
        nn.modules.conv._ConvNd,
        nn.modules.batchnorm._BatchNorm,
        nn.modules.instancenorm._InstanceNorm,
        nn.GroupNorm,
        nn.Embedding,
        nn.MultiheadAttention,
        nn.Flatten,
        nn.Unflatten,
        nn.PReLU,
        nn.GLU,
        nn.Upsample,
        # kept whole, then pinned as ops of unknown symmetry (mix or reorder hidden units)
        nn.Bilinear,
        nn.LocalResponseNorm,
        nn.EmbeddingBag,
        nn.PixelShuffle,
        nn.PixelUnshuffle,
        nn.ChannelShuffle,
    )
    + ELEMENTWISE_MODULES
    + POOL_MODULES
    + PAD_MODULES
    + NORM_LAST_MODULES
)


HAND_SPEC_HINT = (
    "write the spec by hand, spec = mc.PermutationSpec.from_axes({group: size}, "
    "{param: (group or None for each axis)}), and pass it as spec=... (mc.weight_matching takes "
    "it first; modeconn align --spec spec.json), or keep the failing submodule whole with "
    "infer_spec(..., leaf_modules=[...])"
)


@dataclass
class Trace:
    """A traced model: the fx graph module, each node's example value, and the opaque leaves."""

    gm: fx.GraphModule
    values: dict[fx.Node, Any]
    opaque: set[str] = field(default_factory=set)  # module paths traced as unknown leaves
    root: nn.Module | None = None  # the traced module: the model, or a wrapper around it
    prefix: str = ""  # "model." when the model was traced through a wrapper


class _ValueProxy(fx.Proxy):
    """An fx Proxy answering Python's questions (len, int, bool, iter) from its example value."""

    def _value(self) -> Any:
        return self.tracer.values[self.node]  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return len(self._value())

    def __int__(self) -> int:
        return int(self._value())

    def __float__(self) -> float:
        return float(self._value())


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
        self.failed_path: str | None = None
        self.failed_error: BaseException | None = None
        self.computing = False

    # --- which modules stay whole -------------------------------------------------------------
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_paths:
            return True
        return isinstance(m, self.leaf_types)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        if self.computing:  # a leaf module's own children, run for its example value
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


def call_args(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` to call a model with: a dict is keywords, a tuple/list positional."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, tuple | list):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _make_wrapper(model: nn.Module, n_args: int, kw_names: list[str]) -> nn.Module:
    """A module with a plain forward(input_0, ..., name, ...) calling ``model`` (fx cannot trace
    a forward with ``*args``/``**kwargs`` directly)."""
    for k in kw_names:
        if not k.isidentifier():
            raise SpecError(f"example input name {k!r} is not a Python identifier")
    pos = [f"input_{i}" for i in range(n_args)]
    params = ", ".join(["self", *pos, *kw_names])
    call = ", ".join([*pos, *(f"{k}={k}" for k in kw_names)])
    ns: dict[str, Any] = {}
    exec(f"def forward({params}):\n    return self.model({call})\n", ns)  # noqa: S102

    class _Wrapper(nn.Module):
        forward = ns["forward"]

    w = _Wrapper()
    w.model = model
    return w


def bind_inputs(model: nn.Module, example_inputs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Map example inputs onto ``model.forward``'s parameters.

    Returns:
        ``(inputs, concrete)``: the traced arguments by name, and the defaults of the others.
    """
    args, kwargs = call_args(example_inputs)
    sig = inspect.signature(model.forward)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise SpecError(f"example inputs do not fit {type(model).__name__}.forward: {e}") from e
    inputs = dict(bound.arguments)
    concrete = {
        n: p.default
        for n, p in sig.parameters.items()
        if n not in inputs and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    return inputs, concrete


def traced_root(
    model: nn.Module, example_inputs: Any
) -> tuple[nn.Module, str, dict[str, Any], dict[str, Any]]:
    """The module to trace, its parameter-path prefix, the inputs by name, the concrete args."""
    sig = inspect.signature(model.forward)
    if "use_cache" in sig.parameters and isinstance(example_inputs, dict):
        # Hugging Face models: a key/value cache object is runtime state, not part of the function
        example_inputs = {"use_cache": False, **example_inputs}
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()):
        args, kwargs = call_args(example_inputs)
        try:
            sig.bind(*args, **kwargs)
        except TypeError as e:
            raise SpecError(f"example inputs do not fit {type(model).__name__}.forward: {e}") from e
        root = _make_wrapper(model, len(args), list(kwargs))
        names = [f"input_{i}" for i in range(len(args))] + list(kwargs)
        return root, "model.", dict(zip(names, [*args, *kwargs.values()], strict=True)), {}
    inputs, concrete = bind_inputs(model, example_inputs)
    return model, "", inputs, concrete


class _FunctionApply:
    """Graph target for a custom ``torch.autograd.Function``: ``Fn.apply(*args)``, one opaque op."""

    def __init__(self, fn: type[torch.autograd.Function]) -> None:
        self.fn = fn
        self.__name__ = f"{fn.__name__}_apply"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn.apply(*args, **kwargs)

    def __repr__(self) -> str:
        return f"{self.fn.__qualname__}.apply"


def _patch_autograd_function(tracer: _Tracer) -> Any:
    orig = torch.autograd.Function.__dict__["apply"]

    def apply(cls: type[torch.autograd.Function], *args: Any, **kwargs: Any) -> Any:
        has_proxy = any(isinstance(a, fx.Proxy) for a in (*args, *kwargs.values()))
        if has_proxy and not tracer.computing:
            return tracer.create_proxy("call_function", _FunctionApply(cls), args, kwargs)
        return orig.__func__(cls, *args, **kwargs)

    torch.autograd.Function.apply = classmethod(apply)  # type: ignore[method-assign, assignment]
    return orig


def trace_model(
    model: nn.Module, example_inputs: Any, *, leaf_modules: Iterable[Any] | None = None
) -> Trace:
    """Trace ``model`` on ``example_inputs`` with modeconn's tracer.

    The model is traced in eval mode (its train/eval flags are restored afterwards) and is not
    modified. A submodule that cannot be traced becomes an opaque leaf; if the model itself
    cannot be traced, :class:`SpecError` says where and what to do.

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
    types = list(KNOWN_LEAVES)
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
    model.eval()
    try:
        for _ in range(len(modes) + 1):
            tracer = _Tracer(inputs, tuple(types), paths)
            orig_apply = _patch_autograd_function(tracer)
            try:
                graph = tracer.trace(root, concrete_args=concrete or None)
                gm = fx.GraphModule(root, graph)
            except Exception as e:
                path = tracer.failed_path
                if not path:
                    raise SpecError(
                        f"cannot trace {type(model).__name__}: {type(e).__name__}: {e}. "
                        "Check that example_inputs fit the model; otherwise " + HAND_SPEC_HINT
                    ) from e
                if path in paths or isinstance(root.get_submodule(path), tuple(types)):
                    # a leaf ran on the example values and failed: tracing is not the problem
                    raise SpecError(
                        f"{type(model).__name__} fails on the example inputs in module "
                        f"{path[len(prefix) :]!r} ({type(root.get_submodule(path)).__name__}): "
                        f"{type(tracer.failed_error).__name__}: {tracer.failed_error}; "
                        "check that example_inputs fit the model"
                    ) from e
                import warnings

                warnings.warn(
                    f"modeconn: module {path[len(prefix) :]!r} "
                    f"({type(root.get_submodule(path)).__name__}) cannot be traced "
                    f"({type(tracer.failed_error).__name__}: {tracer.failed_error}); "
                    "its inputs and outputs are not permuted",
                    stacklevel=3,
                )
                paths.add(path)
                opaque.add(path)
                continue
            finally:
                torch.autograd.Function.apply = orig_apply  # type: ignore[method-assign]
                for name in set(root.__dict__) - attrs:  # fx parks tensor constants on the root
                    delattr(root, name)
                for name in [n for n in root._buffers if n.startswith("_tensor_constant")]:
                    del root._buffers[name]
            return Trace(gm, tracer.values, opaque, root, prefix)
        raise SpecError(f"cannot trace {type(model).__name__}; " + HAND_SPEC_HINT)
    finally:
        for m, t in modes.items():
            m.training = t


# --- a small cache of graph modules for capture_sites -------------------------------------------
_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[Any, fx.GraphModule]] = (
    weakref.WeakKeyDictionary()
)


def _signature(example_inputs: Any, batch: bool) -> Any:
    def sig(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            shape = tuple(x.shape) if batch or x.dim() == 0 else tuple(x.shape[1:])
            return ("T", shape, x.dtype)
        if isinstance(x, dict):
            return tuple((k, sig(v)) for k, v in x.items())
        if isinstance(x, tuple | list):
            return tuple(sig(v) for v in x)
        return ("V", repr(x))

    return sig(example_inputs)


def cached_graph(
    model: nn.Module,
    example_inputs: Any,
    leaf_modules: Iterable[Any] | None = None,
    *,
    exact: bool = False,
) -> fx.GraphModule:
    """The graph module of ``model`` for inputs like ``example_inputs`` (traced once, cached).

    Args:
        model: the network.
        example_inputs: as for :func:`trace_model`.
        leaf_modules: as for :func:`trace_model`.
        exact: look up by the exact input shapes; otherwise a graph traced for another batch
            size is reused (call again with ``exact=True`` if it fails to run).
    """
    leaves = tuple(map(str, leaf_modules or ()))
    key = (exact, _signature(example_inputs, batch=exact), leaves)
    per_model = _CACHE.setdefault(model, {})
    if key not in per_model:
        if len(per_model) >= 8:
            per_model.pop(next(iter(per_model)))
        per_model[key] = trace_model(model, example_inputs, leaf_modules=leaf_modules).gm
    return per_model[key]
