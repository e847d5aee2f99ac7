"""The built-in model zoo: a validated registry of small baselines (``mc.models.create``).

Every model takes ``input_shape`` (one example's shape, without the batch axis) and
``num_classes`` plus width/depth keywords, is ``torch.fx.symbolic_trace``-able and records how it
was built in ``model.modeconn_config`` so checkpoints can rebuild it.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._src.errors import ConfigError
from .._src.registry import Registry

ModelFactory = Callable[..., nn.Module]

_REGISTRY: Registry[ModelFactory] = Registry("model")
_BUILTINS = ("mlp", "cnn1d", "cnn", "resnet", "transformer")


def register(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Class/function decorator adding a model factory to the zoo under ``name``.

    Args:
        name: lowercase identifier (``[a-z][a-z0-9_]*``), not already registered.

    Returns:
        The decorator; it returns the factory unchanged.

    Example:
        >>> @register("tiny_linear")  # doctest: +SKIP
        ... def tiny(input_shape=(4,), num_classes=10):
        ...     return nn.Sequential(nn.Flatten(), nn.Linear(4, num_classes))
    """
    _REGISTRY.check_free(name)  # a bad or taken name fails here, before the factory is defined
    return _REGISTRY.decorator(name)


def names() -> list[str]:
    """The registered model names, built-ins first in a fixed order.

    Returns:
        ``["mlp", "cnn1d", "cnn", "resnet", "transformer", ...]``.

    Example:
        >>> names()[:2]
        ['mlp', 'cnn1d']
    """
    return [n for n in _BUILTINS if n in _REGISTRY] + sorted(
        n for n in _REGISTRY if n not in _BUILTINS
    )


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple | list):
        return [_jsonable(x) for x in v]
    return v


def _check_option_types(name: str, params: Any, kwargs: dict[str, Any]) -> None:
    """An option whose default is an int / str / shape must be given as one (a clear message
    instead of a comparison error deep inside the constructor)."""
    for key, value in kwargs.items():
        p = params.get(key)
        if p is None or p.default is inspect.Parameter.empty or p.default is None:
            continue
        d = p.default
        if isinstance(d, bool):
            ok, want = isinstance(value, bool), "true or false"
        elif isinstance(d, int):
            ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
            want = "an integer"
        elif isinstance(d, float):
            ok, want = isinstance(value, numbers.Real) and not isinstance(value, bool), "a number"
        elif isinstance(d, str):
            ok, want = isinstance(value, str), "a string"
        elif isinstance(d, tuple | list):
            ok = isinstance(value, tuple | list) and all(
                isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value
            )
            want = "a list of integers such as [1, 8, 8]"
        else:
            continue
        if not ok:
            raise ConfigError(f"model {name!r}: option {key!r} must be {want}, got {value!r}")


def create(name: str, *, seed: int | None = None, **kwargs: Any) -> nn.Module:
    """Build a zoo model by name; its constructor arguments are recorded on the model.

    Args:
        name: one of :func:`names`.
        seed: if given, initialise the weights under ``torch.manual_seed(seed)`` without touching
            the global RNG; otherwise the global RNG is used as usual.
        **kwargs: the model's keywords, e.g. ``input_shape=(40,)``, ``num_classes=10``,
            ``width=128``, ``depth=2``.

    Returns:
        The ``nn.Module``, with ``model.modeconn_config = {"name": ..., "kwargs": {...}}``.

    Example:
        >>> m = create("mlp", input_shape=(40,), num_classes=10, width=32)
        >>> m(torch.zeros(2, 40)).shape
        torch.Size([2, 10])
    """
    factory = _REGISTRY.get(name)
    params = inspect.signature(factory).parameters
    has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in kwargs if k not in params]
    if unknown and not has_var_kw:
        allowed = [k for k, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
        raise ConfigError(
            f"model {name!r} has no option {unknown[0]!r}; its options are: {', '.join(allowed)}"
        )
    _check_option_types(name, params, kwargs)
    fork = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with fork:
        if seed is not None:
            torch.manual_seed(seed)
        try:
            model = factory(**kwargs)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"cannot build model {name!r}: {e}") from None
    # Record the full configuration (defaults included) so a checkpoint can rebuild the model.
    full = {
        k: _jsonable(p.default)
        for k, p in params.items()
        if p.default is not inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    }
    full.update({k: _jsonable(v) for k, v in kwargs.items()})
    model.modeconn_config = {"name": name, "kwargs": full}  # type: ignore[assignment]  # nn.Module.__setattr__ is typed for tensors/modules
    return model


def resolve(spec: str, **kwargs: Any) -> nn.Module:
    """Build a model from a zoo name or a ``"package.module:function"`` import path.

    Args:
        spec: a zoo name, or ``"pkg.mod:fn"`` naming a callable that returns an ``nn.Module``.
        **kwargs: passed to the factory.

    Returns:
        The ``nn.Module``.

    Example:
        >>> resolve("mlp", input_shape=(40,)).modeconn_config["name"]
        'mlp'
    """
    if ":" not in spec:
        return create(spec, **kwargs)
    mod_name, _, fn_name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot import model factory {spec!r}: {e}") from None
    if not callable(fn):
        raise ConfigError(f"model factory {spec!r} is not callable")
    try:
        model = fn(**kwargs)
    except TypeError as e:
        raise ConfigError(f"cannot build model {spec!r}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model factory {spec!r} returned {type(model).__name__}, not nn.Module")
    if not hasattr(model, "modeconn_config"):
        model.modeconn_config = {  # type: ignore[assignment]  # nn.Module.__setattr__ is typed for tensors/modules
            "name": spec,
            "kwargs": {k: _jsonable(v) for k, v in kwargs.items()},
        }
    return model


# Import the built-in families so they register themselves (order fixes names()).
def create_for(
    name: str, splits: Any, model_args: Any = None, *, seed: int = 0
) -> nn.Module:
    """Build a zoo model or a ``package.module:function`` for a dataset, seeded.

    ``input_shape`` and ``num_classes`` come from ``splits`` (a ``mc.data.Splits``) unless
    ``model_args`` sets them (for an import path, only if the function takes them). The model's
    size is checked on the meta device first, so options asking for an absurd size are one
    :class:`ConfigError` before anything is allocated. An import path is imported: call this only
    for a name the user gave (command line or Python), never one read from a file.

    Args:
        name: a zoo name (:func:`names`) or ``"package.module:function"``.
        splits: the data the model is for (``input_shape``, ``num_classes``).
        model_args: options for the factory.
        seed: seeds the initialisation.

    Returns:
        The untrained ``nn.Module``.

    Example:
        >>> import modeconn as mc
        >>> create_for("mlp", mc.data.load("digits"), {"width": 8}, seed=0).modeconn_config["name"]
        'mlp'
    """
    from .._src.validate import check_model_size

    kwargs = dict(model_args or {})
    if ":" not in name:
        kwargs.setdefault("input_shape", list(splits.input_shape))
        kwargs.setdefault("num_classes", splits.num_classes)
        check_model_size(lambda: create(name, seed=seed, **kwargs), name=name)
        return create(name, seed=seed, **kwargs)
    mod, _, fn = name.partition(":")
    with contextlib.suppress(Exception):
        params = inspect.signature(getattr(importlib.import_module(mod), fn)).parameters
        if "input_shape" in params:
            kwargs.setdefault("input_shape", list(splits.input_shape))
        if "num_classes" in params:
            kwargs.setdefault("num_classes", splits.num_classes)
    check_model_size(lambda: resolve(name, **kwargs), name=name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return resolve(name, **kwargs)


from . import cnn, cnn1d, mlp, resnet, transformer  # noqa: E402, F401

__all__ = ["create", "create_for", "names", "register", "resolve"]
