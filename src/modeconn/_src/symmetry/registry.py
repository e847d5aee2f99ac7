"""The table of rules: every op or module type maps to one rule ``rule(walk, call) -> axes``.

Modelled on JAX's batching rules (``primitive_batchers[prim] = rule``): where vmap tracks one
batch axis through each primitive, a rule here relates the unit axes of an op's inputs, outputs
and parameters (tie, pin, sum/product structure) in the :class:`~.walk.Walk`'s union-find. A
module's rule translates the module to its functional form (``nn.Linear`` -> ``F.linear`` with the
module's weight and bias), so each op is written once.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import fx, nn

if TYPE_CHECKING:
    from .walk import Walk

__all__ = [
    "Call",
    "Rule",
    "rule",
    "register",
    "lookup",
    "module_rule",
    "registered",
    "user_functions",
]

# An axis description of a traced value: a tuple of variables (one per axis) for a tensor, a
# list of descriptions for a tuple/list, or None for anything that carries no tensor.
Desc = Any


@dataclass
class Call:
    """One application of an op: its fx node, arguments, example output and (for modules) module.

    ``args``/``kwargs`` hold fx nodes (traced values), tensors (a module's parameters, described
    by their state-dict axes) and constants. ``where`` is ``file:line`` in the model's source.
    """

    node: fx.Node
    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    out: Any = None
    module: nn.Module | None = None
    label: str = ""
    where: str = ""

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        """Argument ``i`` (positional) or ``name`` (keyword), else ``default``."""
        if 0 <= i < len(self.args):
            return self.args[i]
        return self.kwargs.get(name, default)

    def with_args(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
        """The same call seen as another op (a module seen as its functional form)."""
        return Call(self.node, name, args, kwargs, self.out, self.module, self.label, self.where)


Rule = Callable[["Walk", Call], Desc]

# by the op's callable (identity), by name (torch functions and Tensor methods share names: relu,
# view, add, ...), by module type
_BY_OBJECT: dict[Any, Rule] = {}
_BY_NAME: dict[str, Rule] = {}
_BY_MODULE: dict[type, Rule] = {}


_USER_FUNCTIONS: set[Any] = set()  # plain functions the tracer must record as one op


def register(target: Any, fn: Rule | None) -> None:
    """Make ``fn`` the rule of ``target``: an op name (str), a module type, or a callable
    (``fn=None`` removes the rule)."""
    table: dict[Any, Rule]
    if isinstance(target, str):
        table = _BY_NAME
    elif isinstance(target, type) and issubclass(target, nn.Module):
        table = _BY_MODULE
    else:
        table = _BY_OBJECT
        mod = getattr(target, "__module__", None) or ""
        plain = not isinstance(target, type) and not mod.startswith(("torch", "operator"))
        if plain and fn is not None:
            _USER_FUNCTIONS.add(target)
        else:
            _USER_FUNCTIONS.discard(target)
    if fn is None:
        table.pop(target, None)
    else:
        table[target] = fn


def user_functions() -> list[tuple[dict[str, Any], str, Any]]:
    """Every (namespace, name, function) from which a registered plain function can be called."""
    out = []
    for fn in _USER_FUNCTIONS:
        name = getattr(fn, "__name__", "")
        for mod in list(sys.modules.values()):
            ns = getattr(mod, "__dict__", None)
            if name and isinstance(ns, dict) and ns.get(name) is fn:
                out.append((ns, name, fn))
    return out


def rule(*targets: Any) -> Callable[[Rule], Rule]:
    """Decorator: register the function as the rule of every target (see :func:`register`)."""

    def deco(fn: Rule) -> Rule:
        for t in targets:
            register(t, fn)
        return fn

    return deco


def _name_of(target: Any) -> str:
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", str(target))


def lookup(target: Any) -> tuple[str, Rule | None]:
    """The op name and rule of a ``call_function``/``call_method`` target."""
    name = _name_of(target)
    try:
        if target in _BY_OBJECT:
            return name, _BY_OBJECT[target]
    except TypeError:  # unhashable target
        pass
    fn = getattr(target, "fn", None)  # a custom autograd.Function's apply (see tracer)
    if fn is not None and fn in _BY_OBJECT:
        return name, _BY_OBJECT[fn]
    return name, _BY_NAME.get(name)


def lookup_object(target: Any) -> Rule | None:
    """The rule registered for this very object (a function, an autograd.Function), if any."""
    try:
        return _BY_OBJECT.get(target)
    except TypeError:
        return None


def module_rule(m: nn.Module) -> Rule | None:
    """The rule of a module, if its class (or a base class whose ``forward`` it keeps) has one.

    A subclass that overrides ``forward`` (timm's ``LayerNorm2d``, Hugging Face's
    ``ConvNextLayerNorm``: channels-first LayerNorms) computes something else: it has no rule and
    is traced into, so it is handled by what it computes.
    """
    mro = type(m).__mro__
    definer = next((c for c in mro if "forward" in c.__dict__), nn.Module)
    for cls in mro:
        if cls in _BY_MODULE:
            # the forward that runs is the registered class's, or torch's own
            ok = definer is cls or definer.__module__.startswith("torch.nn.")
            return _BY_MODULE[cls] if ok else None
    return None


def registered() -> dict[str, list[Any]]:
    """Every registered target, by kind (for the test that every rule has a test case)."""
    return {"name": sorted(_BY_NAME), "object": list(_BY_OBJECT), "module": list(_BY_MODULE)}
