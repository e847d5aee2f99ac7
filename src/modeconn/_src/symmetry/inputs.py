"""How example inputs meet ``model.forward``: positional/keyword binding, and a wrapper module
for a forward with ``*args``/``**kwargs`` (which fx cannot trace directly)."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from ..errors import SpecError

__all__ = ["call_args", "traced_root"]


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


def _bind(model: nn.Module, sig: inspect.Signature, example_inputs: Any) -> inspect.BoundArguments:
    args, kwargs = call_args(example_inputs)
    try:
        return sig.bind(*args, **kwargs)
    except TypeError as e:
        raise SpecError(
            f"example inputs do not fit {type(model).__name__}.forward: {e}; pass one batch the "
            "model accepts (a tensor, a tuple of positional inputs, or a dict of keyword inputs)"
        ) from e


def traced_root(
    model: nn.Module, example_inputs: Any
) -> tuple[nn.Module, str, dict[str, Any], dict[str, Any]]:
    """The module to trace, its parameter-path prefix, the inputs by name, the concrete args."""
    sig = inspect.signature(model.forward)
    if "use_cache" in sig.parameters and isinstance(example_inputs, dict):
        # Hugging Face models: a key/value cache object is runtime state, not part of the function
        example_inputs = {"use_cache": False, **example_inputs}
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()):
        _bind(model, sig, example_inputs)
        args, kwargs = call_args(example_inputs)
        root = _make_wrapper(model, len(args), list(kwargs))
        names = [f"input_{i}" for i in range(len(args))] + list(kwargs)
        return root, "model.", dict(zip(names, [*args, *kwargs.values()], strict=True)), {}
    inputs = dict(_bind(model, sig, example_inputs).arguments)
    concrete = {
        n: p.default
        for n, p in sig.parameters.items()
        if n not in inputs and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    return model, "", inputs, concrete
