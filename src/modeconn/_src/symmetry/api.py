"""``infer_spec`` and ``register_rule``: the public face of the symmetry package."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..errors import SpecError
from ..evaluation import model_device
from ..spec import PermutationSpec
from . import attention, rules_index, rules_layers, rules_pointwise, rules_shape  # noqa: F401
from .emit import emit_spec
from .registry import Call, Desc, register
from .tracer import trace_model
from .verify import verify_spec
from .walk import Walk

__all__ = ["infer_spec", "register_rule"]

_SHORTCUTS: dict[str, Callable[[Walk, Call], Desc]] = {
    "elementwise": rules_layers.identity,
    "opaque": rules_layers.opaque,
}


def register_rule(target: Any, rule: str | Callable[[Walk, Call], Desc]) -> None:
    """Teach :func:`infer_spec` the symmetry of an op it does not know.

    The op is then kept whole by the tracer (not traced into) and handled by ``rule``, like
    timm's ``register_notrace_module``. Rules are a table (one per op, as JAX's batching rules):
    see docs/symmetry.md for writing one.

    Args:
        target: a module type (``MyNorm``), a function (``my_ops.fused_act``), a custom
            ``torch.autograd.Function`` subclass, or a ``Tensor`` method / torch op name (str).
        rule: ``"elementwise"`` (the output has the first input's axes: activations, scalings
            that do not mix units), ``"opaque"`` (every axis it touches is pinned: the safe
            choice), or a function ``rule(walk, call) -> axes`` relating axis variables with
            ``walk.tie`` / ``walk.pin`` (see the built-in rules in ``modeconn._src.symmetry``).

    Example:
        >>> import torch, modeconn as mc
        >>> class Swish(nn.Module):
        ...     def forward(self, x):
        ...         return x * torch.sigmoid(x)
        >>> mc.register_rule(Swish, "elementwise")
        >>> net = nn.Sequential(nn.Linear(4, 8), Swish(), nn.Linear(8, 2))
        >>> mc.infer_spec(net, torch.randn(3, 4)).groups
        {'0': 8}
    """
    fn = _SHORTCUTS.get(rule) if isinstance(rule, str) else rule
    if fn is None or not callable(fn):
        raise SpecError(
            f"register_rule: rule must be 'elementwise', 'opaque' or a function "
            f"rule(walk, call), got {rule!r}"
        )
    ok = isinstance(target, str) or callable(target)
    if not ok:
        raise SpecError(
            f"register_rule: target must be a module type, a function, an autograd.Function "
            f"or an op name, got {target!r}"
        )
    register(target, fn)


def infer_spec(
    model: nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Iterable[Any] | None = None,
    warn: bool = True,
    verify: bool = True,
) -> PermutationSpec:
    """Infer the permutation symmetry of ``model`` from a ``torch.fx`` trace of its forward pass.

    Hidden units of a network can be reordered without changing its function (Hecht-Nielsen
    1990; Entezari et al., ICLR 2022; Ainsworth et al., "Git Re-Basin", ICLR 2023). For a unit
    permutation ``P`` of a hidden layer, ``W_l' = P W_l``, ``b_l' = P b_l`` and
    ``W_{l+1}' = W_{l+1} Pᵀ`` give the same function; norms' weights, biases and running
    statistics follow ``P``; residual streams share one ``P``; attention allows a head
    permutation plus, inside each head, a permutation of the q/k dims and one of the v dims.
    The groups are found by union-find over tensor axes: every op's rule (a table, extensible
    with :func:`register_rule`) ties or pins the axes it touches; inputs and outputs are never
    permuted, and an op without a rule pins every axis it touches (one warning per op, naming
    it, its file and line). The model is traced in eval mode and is not modified. Dropout counts
    as the identity: in train mode its random masks are tied to positions, so a permuted network
    with dropout agrees with the original only in distribution.

    Args:
        model: the network (any ``nn.Module``).
        example_inputs: one batch of inputs: a tensor, a tuple of positional inputs, or a dict of
            keyword inputs (e.g. ``{"input_ids": ids}``).
        leaf_modules: module types or dotted paths not to trace into (their axes are pinned).
        warn: warn about ops that make the spec smaller.
        verify: check the spec on ``example_inputs`` (random permutation, perturbed weights) and
            drop any group that changes the outputs, with a warning. A safety net; the
            inference itself does not rely on it.

    Returns:
        A :class:`~modeconn.PermutationSpec` with readable group names (``"fc1"``,
        ``"layer2.stream"``, ``"blocks.0.attn"``), per group the forward-pass sites where
        activation matching measures its units, and ``spec.pins``: for every state-dict axis no
        group permutes, what pinned it (shown by ``spec.table()``).

    Raises:
        SpecError: the model fails on ``example_inputs`` (the message names the module), or it
            cannot be traced at all; the message names the op, file and line, and the fix
            (:func:`register_rule`, or a hand-written ``PermutationSpec.from_axes`` passed as
            ``spec=``).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> spec = infer_spec(net, torch.randn(2, 4))
        >>> spec.groups
        {'0': 8}
    """
    if not isinstance(model, nn.Module):
        raise SpecError(f"infer_spec expects an nn.Module, got {type(model).__name__}")
    # inputs from a CPU dataset for a model on a GPU: trace where the model lives
    example_inputs = _on_device(example_inputs, model_device(model))
    tr = trace_model(model, example_inputs, leaf_modules=leaf_modules)
    w = Walk(model, tr, warn)
    w.run()
    spec = emit_spec(w)
    spec.check(model.state_dict())
    if verify:
        spec = verify_spec(model, spec, example_inputs, warn)
    return spec


def _on_device(x: Any, device: torch.device) -> Any:
    """``x`` (a tensor, or tuples/lists/dicts of them) with every tensor moved to ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, tuple | list):
        return type(x)(_on_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _on_device(v, device) for k, v in x.items()}
    return x
