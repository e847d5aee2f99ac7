"""Capture the tensors at a spec's sites (for activation matching), on a cached traced graph."""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, fx, nn

from ..errors import SpecError
from ..spec import PermutationSpec
from .tracer import call_args, trace_model, traced_root

__all__ = ["capture_sites", "cached_graph"]


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
        >>> from modeconn import infer_spec
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
