"""While tracing: custom ``autograd.Function``s, torch's factories, ``torch.is_tensor`` and
functions given to ``mc.register_rule`` answer for traced values (a graph node, or the example's
answer) instead of failing on an fx Proxy."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from .registry import lookup_object as lookup_rule
from .registry import user_functions

__all__ = ["Patches"]

_FACTORIES = (  # fmt: skip
    "ones",
    "zeros",
    "empty",
    "full",
    "rand",
    "randn",
    "randint",
    "arange",
    "eye",
    "linspace",
    "logspace",
    "tensor",
    "as_tensor",
    "scalar_tensor",
    "tril_indices",
    "triu_indices",
)


def _has_proxy(a: Any) -> bool:
    found = False

    def look(x: Any) -> Any:
        nonlocal found
        found = found or isinstance(x, fx.Proxy)
        return x

    fx.node.map_aggregate(a, look)
    return found


class _FunctionApply:
    """Graph target for a custom ``torch.autograd.Function``: ``Fn.apply(*args)``, one node."""

    def __init__(self, fn: type[torch.autograd.Function]) -> None:
        self.fn = fn
        self.__name__ = f"{fn.__name__}.apply"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn.apply(*args, **kwargs)

    def __repr__(self) -> str:
        return f"{self.fn.__qualname__}.apply"


class _Ctx:
    """A stand-in ``ctx`` for tracing a custom Function's forward (backward is not traced)."""

    def __getattr__(self, k: str) -> Any:
        return lambda *a, **kw: None

    def __setattr__(self, k: str, v: Any) -> None:
        object.__setattr__(self, k, v)


def _rollback(tr: Any, mark: fx.Node | None) -> None:
    """Erase the nodes a failed partial trace left after ``mark``."""
    nodes = list(tr.graph.nodes)
    start = nodes.index(mark) + 1 if mark is not None else 0
    for n in reversed(nodes[start:]):
        if not n.users:
            tr.graph.erase_node(n)
            tr.values.pop(n, None)
            tr.where.pop(n, None)


def _trace_forward(cls: type[torch.autograd.Function], args: Any, kwargs: Any) -> Any:
    """Trace into ``cls.forward``: the symmetry of a Function is that of what it computes."""
    own_setup = "setup_context" in cls.__dict__  # torch >= 2.0 style: forward(*args)
    return cls.forward(*args, **kwargs) if own_setup else cls.forward(_Ctx(), *args, **kwargs)


class Patches:
    """While tracing: ``Function.apply`` and torch's factories record graph nodes for proxies.

    ``Function.apply`` is a classmethod on torch < 2.14 and a C ``classmethod_descriptor`` after;
    both bind with ``__get__(None, cls)``.
    """

    def __init__(self, tracer: Any) -> None:
        self.tracer = tracer
        self.saved: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> Patches:
        tr = self.tracer
        orig_apply = torch.autograd.Function.__dict__["apply"]

        def apply(cls: type[torch.autograd.Function], *args: Any, **kwargs: Any) -> Any:
            if not tr.computing and _has_proxy((args, kwargs)):
                if lookup_rule(cls) is None:  # no rule: its forward is what it computes
                    mark = list(tr.graph.nodes)[-1] if len(tr.graph.nodes) else None
                    try:
                        return _trace_forward(cls, args, kwargs)
                    except Exception:  # noqa: BLE001 - not traceable: one opaque node
                        _rollback(tr, mark)
                return tr.create_proxy("call_function", _FunctionApply(cls), args, kwargs)
            return orig_apply.__get__(None, cls)(*args, **kwargs)

        self._set(torch.autograd.Function, "apply", classmethod(apply))
        is_tensor = torch.is_tensor  # isinstance(proxy, Tensor) is False: answer from the value

        def is_tensor_(obj: Any) -> bool:
            if isinstance(obj, fx.Proxy):
                return isinstance(obj.tracer.values[obj.node], torch.Tensor)  # type: ignore[attr-defined]
            return is_tensor(obj)

        self._set(torch, "is_tensor", is_tensor_)
        for name in _FACTORIES:
            fn = getattr(torch, name, None)
            if fn is not None:
                self._set(torch, name, self._factory(fn))
        for ns, name, fn in user_functions():  # mc.register_rule(my_function, ...)
            self.saved.append((ns, name, fn))
            ns[name] = self._factory(fn)
        return self

    def _factory(self, fn: Any) -> Any:
        tr = self.tracer

        def make(*args: Any, **kwargs: Any) -> Any:
            if not tr.computing and _has_proxy((args, kwargs)):
                return tr.create_proxy("call_function", fn, args, kwargs)
            return fn(*args, **kwargs)

        make.__name__ = fn.__name__
        return make

    def _set(self, obj: Any, name: str, new: Any) -> None:
        self.saved.append((obj, name, obj.__dict__[name]))
        setattr(obj, name, new)

    def __exit__(self, *exc: Any) -> None:
        for obj, name, old in reversed(self.saved):
            if isinstance(obj, dict):
                obj[name] = old
            else:
                setattr(obj, name, old)
