"""Verification, a last guard: a random permutation of the inferred spec must keep the outputs.

The model runs on the example inputs with perturbed weights (so LayerNorm's ones and zero biases
cannot hide a wrong slot), once as is and once permuted; any group that changes the outputs is
dropped with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..spec import PermutationSpec, apply_permutation, random_permutation
from .tracer import call_args

__all__ = ["verify_spec", "subspec"]


def _flat_outputs(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out] if out.is_floating_point() or out.is_complex() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, tuple | list):
        return [t for o in out for t in _flat_outputs(o)]
    if hasattr(out, "to_tuple"):
        return _flat_outputs(out.to_tuple())
    return []


def _perturbed_state(model: nn.Module, seed: int) -> dict[str, Tensor]:
    """The model's state with random noise on float tensors, so symmetric initial values
    (LayerNorm weight 1, zero biases) cannot hide a wrong slot."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, t in model.state_dict().items():
        if t.is_floating_point() and t.numel() > 0:
            noise = torch.randn(t.shape, generator=gen).to(t)
            if k.endswith("running_var"):
                t = t * torch.exp(0.2 * noise)
            else:
                scale = float(t.float().std()) if t.numel() > 1 else 0.0
                t = t + noise * (0.1 * scale + 0.02)
        out[k] = t
    return out


def _run(model: nn.Module, state: dict[str, Tensor], inputs: Any) -> list[Tensor]:
    args, kwargs = call_args(inputs)
    with torch.no_grad():
        out = torch.func.functional_call(model, dict(state), args, kwargs, tie_weights=False)
    return [o.detach().float() for o in _flat_outputs(out)]


def verify_spec(
    model: nn.Module, spec: PermutationSpec, inputs: Any, warn: bool
) -> PermutationSpec:
    """Drop every group whose random permutation changes ``model``'s outputs on ``inputs``."""
    if not spec.groups:
        return spec
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        state = _perturbed_state(model, 0)
        ref = _run(model, state, inputs)

        def same(sub: PermutationSpec) -> bool:
            perm = random_permutation(sub, seed=1)
            got = _run(model, apply_permutation(sub, perm, state), inputs)
            for a, b in zip(ref, got, strict=True):
                scale = float(a.abs().max()) if a.numel() else 0.0
                if a.shape != b.shape or not torch.allclose(
                    a, b, rtol=1e-3, atol=1e-4 * (1 + scale), equal_nan=True
                ):
                    return False
            return True

        if same(spec):
            return spec
        bad = [g for g in spec.groups if not same(subspec(spec, [g]))]
        if warn:
            warnings.warn(
                f"modeconn.infer_spec: the inferred permutations of {bad} change the model's "
                "outputs on the example inputs; they are left out of the spec (please report this "
                "model; spec.table() shows what is pinned)",
                stacklevel=3,
            )
        out = subspec(spec, [g for g in spec.groups if g not in bad])
        for g in bad:
            for s in spec.slots.get(g, ()):
                why = f"verification: permuting group {g!r} changed the outputs"
                out.pins.setdefault(s.param, {}).setdefault(s.axis, why)
        return out
    finally:
        for m, t in modes.items():
            m.training = t


def subspec(spec: PermutationSpec, keep: Iterable[str]) -> PermutationSpec:
    """The spec restricted to the groups ``keep``."""
    keep = list(keep)
    return PermutationSpec(
        groups={g: spec.groups[g] for g in keep},
        slots={g: spec.slots[g] for g in keep if g in spec.slots},
        sites={g: spec.sites[g] for g in keep if g in spec.sites},
        heads={g: spec.heads[g] for g in keep if g in spec.heads},
        pins={p: dict(ax) for p, ax in spec.pins.items()},
    )
