"""``align()``: one entry point over every alignment method, chosen by name from a registry."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, overload

import torch
from torch import Tensor, nn

from ..errors import ConfigError, SpecError
from ..evaluation import DataLike, as_loader, model_device, with_state
from ..spec import (
    Permutation,
    PermutationSpec,
    apply_permutation,
    check_permutation,
    identity_permutation,
)
from ..state import check_compatible
from .base import ALIGNERS, Aligner, AlignInputs, FunctionAligner

# a user aligner function: fn(model_a, model_b, data, spec, **kwargs) -> Permutation (B onto A)
AlignerFn = Callable[..., Permutation]


def register_aligner(aligner: Aligner | str) -> Any:
    """Register an alignment method for :func:`align` (``method=name``, ``--method name``).

    Either an :class:`Aligner` instance (registered under ``aligner.name``; returns it), or a
    name, used as a decorator on a function ``fn(model_a, model_b, data, spec, **options)``
    returning a :class:`Permutation` that maps B onto A (``data`` may be ``None``; returns
    ``fn`` unchanged). A name is taken once.

    Args:
        aligner: the instance, or the name for a function.

    Returns:
        The instance, or the decorator.

    Example:
        >>> import modeconn as mc
        >>> @register_aligner("identity_demo")
        ... def _identity(model_a, model_b, data, spec, **options):
        ...     return mc.identity_permutation(spec)
        >>> "identity_demo" in aligner_names()
        True
    """
    if isinstance(aligner, Aligner):
        return ALIGNERS.register(aligner.name, aligner)
    name = aligner
    ALIGNERS.check_free(name)

    def deco(fn: AlignerFn) -> AlignerFn:
        ALIGNERS.register(name, FunctionAligner(name, fn))
        return fn

    return deco


def aligner_names() -> list[str]:
    """Names of the registered alignment methods, in registration order.

    Example:
        >>> aligner_names()[:2]
        ['weight', 'activation']
    """
    return ALIGNERS.names()


def get_aligner(name: str) -> Aligner:
    """The :class:`Aligner` registered as ``name`` (unknown: ConfigError listing the names).

    Example:
        >>> a = get_aligner("weight")
        >>> a.needs_data, a.reference.year
        (False, 2023)
    """
    return ALIGNERS.get(name)


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
    permutation comes from the registered method ``method`` (:func:`aligner_names`; each
    :class:`Aligner` names its paper): ``"weight"`` (Git Re-Basin weight matching, Ainsworth et
    al. 2023), ``"activation"`` (neuron alignment, Li et al. 2016 / Tatro et al. 2020),
    ``"ste"``, ``"sinkhorn"`` (Peña et al. 2023), ``"pam"`` (Tatro et al. 2020), ``"ot"`` (OT
    fusion, Singh & Jaggi 2020) and ``"annealing"`` (Entezari et al. 2022). Inputs are checked
    once here (compatible models, the spec, data where the method needs it).

    Args:
        model_a: the reference model (not modified).
        model_b: the model to align (not modified).
        method: alignment method name.
        data: data for data-driven methods (DataLoader, Dataset or ``(inputs, targets)``);
            its first batch also serves to trace the spec.
        spec: the permutation spec (default: ``mc.infer_spec(model_a, example_inputs)``).
        example_inputs: inputs for tracing when neither ``spec`` nor ``data`` is given.
        return_permutation: also return the permutation.
        **kwargs: the method's options, validated against its ``Params`` (e.g.
            ``n_restarts=`` for weight matching; ``get_aligner(m).parameter_names()``).

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
    aligner = get_aligner(method)
    params = aligner.parameters(**kwargs)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    check_compatible([state_a, state_b], ["model A", "model B"])
    spec = resolve_spec(model_a, spec, data=data, example_inputs=example_inputs)
    inputs = AlignInputs(spec, state_a, state_b, model_a, model_b, data)
    perm = run_aligner(aligner, params, inputs)
    aligned = with_state(model_b, apply_permutation(spec, perm, state_b))
    return (aligned, perm) if return_permutation else aligned


def run_aligner(aligner: Aligner, params: Any, inputs: AlignInputs) -> Permutation:
    """Check ``inputs`` against what ``aligner`` needs, run it, check its permutation.

    The one place inputs are validated (``align``, ``align_states`` and ``merge`` call it): the
    spec fits state A, data and modules are there when the method needs them, and the result
    is a valid permutation of every group.
    """
    inputs.spec.check(inputs.state_a)  # a spec made for another model: a clear error first
    needs = aligner.requires(params)
    if "data" in needs and inputs.data is None:
        raise ConfigError(
            f"alignment method {aligner.name!r} needs data (data=(inputs, targets) / --data SOURCE)"
        )
    if "models" in needs and (inputs.model_a is None or inputs.model_b is None):
        raise ConfigError(
            f"alignment method {aligner.name!r} runs the networks: give model= (a module of the "
            "states' architecture) or use mc.align(model_a, model_b, ...)"
        )
    perm = aligner.run(inputs, params)
    if not isinstance(perm, Permutation):  # a user function may return a plain dict
        perm = Permutation(perm)
    check_permutation(inputs.spec, perm)
    perm.info.setdefault("method", aligner.name)
    return perm


def align_states(
    spec: PermutationSpec,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    *,
    method: str = "weight",
    model: nn.Module | None = None,
    data: DataLike | None = None,
    **kwargs: Any,
) -> tuple[dict[str, Tensor], Permutation]:
    """Align ``state_b`` to ``state_a``; return ``(permuted state_b, permutation)``.

    Args:
        spec: the permutation spec of the states' architecture.
        state_a: the reference state (not modified).
        state_b: the state to permute (not modified).
        method: a registered alignment method (default: weight matching, data-free).
        model: a module of the states' architecture, for methods that run the networks.
        data: data for data-driven methods.
        **kwargs: the method's options.

    Returns:
        ``(apply_permutation(spec, perm, state_b), perm)``.

    Example:
        >>> import torch, modeconn as mc
        >>> spec = mc.PermutationSpec.from_axes({"h": 2}, {"w": ("h", None)})
        >>> s, p = align_states(spec, {"w": torch.eye(2)}, {"w": torch.eye(2).flip(0)})
        >>> s["w"].tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """
    aligner = get_aligner(method)
    params = aligner.parameters(**kwargs)
    check_compatible([state_a, state_b], ["state A", "state B"])
    if model is not None:
        check_compatible([state_a, model.state_dict()], ["state A", "model="])
    model_a = with_state(model, state_a) if model is not None else None
    model_b = with_state(model, state_b) if model is not None else None
    perm = run_aligner(aligner, params, AlignInputs(spec, state_a, state_b, model_a, model_b, data))
    return apply_permutation(spec, perm, state_b), perm


def start_permutation(
    model_a: nn.Module,
    model_b: nn.Module,
    spec: PermutationSpec,
    init: str | Mapping[str, Any] | None,
    data: DataLike | None,
) -> Permutation:
    """Where a local-search aligner (PAM, annealing) starts: ``None`` the identity, a method name
    that aligner's result (``mc.align(..., method=init)``), a mapping that permutation (checked).

    Example:
        >>> import modeconn as mc
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
        >>> spec = mc.infer_spec(net, torch.randn(4, 2), warn=False)
        >>> start_permutation(net, net, spec, None, None)["0"].tolist()
        [0, 1, 2]
    """
    if init is None:
        start = identity_permutation(spec)
    elif isinstance(init, str):
        _, start = align(
            model_a, model_b, method=init, data=data, spec=spec, return_permutation=True
        )
    else:
        start = Permutation({g: torch.as_tensor(p).long().cpu() for g, p in init.items()})
    check_permutation(spec, start)
    return start
