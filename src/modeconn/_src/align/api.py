"""``align()``: one entry point over every alignment method, chosen by name from a registry."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, Literal, overload

import torch
from torch import Tensor, nn

from ..errors import ConfigError, SpecError
from ..evaluation import DataLike, as_loader, model_device, with_state
from ..spec import Permutation, PermutationSpec, apply_permutation
from ..state import check_compatible

# fn(model_a, model_b, data, spec, **kwargs) -> Permutation mapping B onto A
Aligner = Callable[..., Permutation]

_ALIGNERS: dict[str, Aligner] = {}
# modules that register built-in aligners when imported (a missing one is skipped)
_BUILTIN_MODULES = ("weight", "activation", "ste", "sinkhorn")


def register_aligner(name: str) -> Callable[[Aligner], Aligner]:
    """Decorator registering an alignment method under ``name`` for :func:`align`.

    The function is called as ``fn(model_a, model_b, data, spec, **kwargs)`` (``data`` and ``spec``
    may be ``None``) and returns a :class:`Permutation` mapping B onto A.

    Args:
        name: method name (``align(..., method=name)``, ``modeconn align --method name``).

    Returns:
        The decorator (it returns ``fn`` unchanged).

    Example (in a method's module, e.g. ``align/ste.py``)::

        @register_aligner("ste")
        def _ste(model_a, model_b, data, spec, **kwargs):
            return ste_matching(model_a, model_b, data, spec=spec, **kwargs)
    """

    def deco(fn: Aligner) -> Aligner:
        if name in _ALIGNERS and _ALIGNERS[name] is not fn:
            raise ConfigError(f"alignment method {name!r} is registered twice")
        _ALIGNERS[name] = fn
        return fn

    return deco


def _load_builtins() -> None:
    for mod in _BUILTIN_MODULES:
        full = f"{__package__}.{mod}"
        try:
            importlib.import_module(full)
        except ModuleNotFoundError as e:
            if e.name != full:  # a real import error inside the module: surface it
                raise


def aligner_names() -> list[str]:
    """Names of the registered alignment methods.

    Example:
        >>> {"weight", "activation"} <= set(aligner_names())
        True
    """
    _load_builtins()
    return sorted(_ALIGNERS)


def get_aligner(name: str) -> Aligner:
    """The function registered as ``name`` (unknown name: :class:`ConfigError` listing names)."""
    if name not in _ALIGNERS:
        _load_builtins()
    if name not in _ALIGNERS:
        raise ConfigError(
            f"unknown alignment method {name!r}; choose one of: {', '.join(sorted(_ALIGNERS))}"
        )
    return _ALIGNERS[name]


def first_inputs(data: DataLike) -> Tensor:
    """The inputs of the first batch of ``data`` (for tracing a spec)."""
    for batch in as_loader(data, batch_size=8):
        return batch[0] if isinstance(batch, list | tuple) else batch
    raise SpecError("cannot infer a permutation spec from an empty dataset")


def resolve_spec(
    model: nn.Module,
    spec: PermutationSpec | None,
    *,
    data: DataLike | None = None,
    example_inputs: Any = None,
) -> PermutationSpec:
    """``spec`` if given, else ``mc.infer_spec(model, example_inputs or data's first batch)``."""
    if spec is not None:
        return spec
    from ..symmetry import infer_spec

    if example_inputs is None and data is not None:
        example_inputs = first_inputs(data)
    if example_inputs is None:
        example_inputs = _example_from_model(model)
    return infer_spec(model, example_inputs)


def _example_from_model(model: nn.Module) -> Tensor:
    """Zero inputs of the shape a zoo model records (``modeconn_config``), for tracing."""
    config = getattr(model, "modeconn_config", None)
    kwargs = config.get("kwargs", {}) if isinstance(config, dict) else {}
    shape = kwargs.get("input_shape", getattr(model, "input_shape", None))
    if shape is None:
        raise SpecError(
            "cannot infer the permutation spec without example inputs: pass data=, "
            "example_inputs= or spec="
        )
    return torch.zeros(2, *tuple(shape), device=model_device(model))


@overload
def align(
    model_a: nn.Module,
    model_b: nn.Module,
    *,
    method: str = ...,
    data: DataLike | None = ...,
    spec: PermutationSpec | None = ...,
    example_inputs: Any = ...,
    return_permutation: Literal[False] = ...,
    **kwargs: Any,
) -> nn.Module: ...


@overload
def align(
    model_a: nn.Module,
    model_b: nn.Module,
    *,
    method: str = ...,
    data: DataLike | None = ...,
    spec: PermutationSpec | None = ...,
    example_inputs: Any = ...,
    return_permutation: Literal[True],
    **kwargs: Any,
) -> tuple[nn.Module, Permutation]: ...


@overload
def align(
    model_a: nn.Module,
    model_b: nn.Module,
    *,
    method: str = ...,
    data: DataLike | None = ...,
    spec: PermutationSpec | None = ...,
    example_inputs: Any = ...,
    return_permutation: bool,
    **kwargs: Any,
) -> nn.Module | tuple[nn.Module, Permutation]: ...


def align(
    model_a: nn.Module,
    model_b: nn.Module,
    *,
    method: str = "weight",
    data: DataLike | None = None,
    spec: PermutationSpec | None = None,
    example_inputs: Any = None,
    return_permutation: bool = False,
    **kwargs: Any,
) -> nn.Module | tuple[nn.Module, Permutation]:
    """A copy of ``model_b`` with its hidden units permuted onto ``model_a``'s.

    The function ``model_b`` computes is unchanged; only the order of its hidden units is. The
    permutation comes from the registered method ``method``: ``"weight"`` (Git Re-Basin weight
    matching, Ainsworth et al. 2023), ``"activation"`` (neuron alignment, Li et al. 2016 /
    Tatro et al. 2020), ``"ste"`` and ``"sinkhorn"`` (see :func:`aligner_names`).

    Args:
        model_a: the reference model (not modified).
        model_b: the model to align (not modified).
        method: alignment method name.
        data: data for data-driven methods (DataLoader, Dataset or ``(inputs, targets)``);
            its first batch also serves to trace the spec.
        spec: the permutation spec (default: ``mc.infer_spec(model_a, example_inputs)``).
        example_inputs: inputs for tracing when neither ``spec`` nor ``data`` is given.
        return_permutation: also return the permutation.
        **kwargs: passed to the method (e.g. ``n_restarts=`` for weight matching).

    Returns:
        The aligned copy of ``model_b`` (and the :class:`Permutation` if asked).

    Example:
        >>> import torch, modeconn as mc
        >>> a = mc.models.create("mlp", input_shape=(40,))
        >>> b = mc.models.create("mlp", input_shape=(40,))
        >>> b2 = align(a, b, method="weight", example_inputs=torch.randn(2, 40))
        >>> x = torch.randn(5, 40)
        >>> torch.allclose(b(x), b2(x), atol=1e-5)
        True
    """
    fn = get_aligner(method)
    check_compatible([model_a.state_dict(), model_b.state_dict()], ["model A", "model B"])
    spec = resolve_spec(model_a, spec, data=data, example_inputs=example_inputs)
    spec.check(model_a.state_dict())  # a spec made for another model: a clear error first
    perm = fn(model_a, model_b, data, spec, **kwargs)
    aligned = with_state(model_b, apply_permutation(spec, perm, model_b.state_dict()))
    return (aligned, perm) if return_permutation else aligned


def align_states(
    spec: PermutationSpec,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    **kwargs: Any,
) -> tuple[dict[str, Tensor], Permutation]:
    """Weight-match ``state_b`` to ``state_a`` and return ``(permuted state_b, permutation)``.

    Example:
        >>> import torch, modeconn as mc
        >>> spec = mc.PermutationSpec.from_axes({"h": 2}, {"w": ("h", None)})
        >>> s, p = align_states(spec, {"w": torch.eye(2)}, {"w": torch.eye(2).flip(0)})
        >>> s["w"].tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """
    from .weight import weight_matching

    perm = weight_matching(spec, state_a, state_b, **kwargs)
    return apply_permutation(spec, perm, state_b), perm
