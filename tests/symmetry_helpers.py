"""Helpers of the symmetry tests: noisy weights, permuted-output checks, parameter coverage."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.func import functional_call

import modeconn as mc


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy with noise on every float parameter and buffer (running_var kept positive)."""
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g)
            if name.endswith("running_var"):
                t.mul_(torch.exp(0.3 * noise))
            else:
                t.add_(0.3 * noise)
    return model


def outputs(model: nn.Module, state: dict, inputs, *, train: bool) -> list[torch.Tensor]:
    model.train(train)
    state = {k: v.clone() for k, v in state.items()}  # train-mode BN updates its buffers
    kwargs = inputs if isinstance(inputs, dict) else None
    args = () if kwargs is not None else (inputs if isinstance(inputs, tuple) else (inputs,))
    torch.manual_seed(0)
    with torch.no_grad():
        out = functional_call(model, state, args, kwargs or {}, tie_weights=False)
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, torch.Tensor):
        out = (out,)
    return [o for o in out if isinstance(o, torch.Tensor) and o.is_floating_point()]


def assert_symmetry(model: nn.Module, inputs, spec: mc.PermutationSpec, *, seeds=(0, 1)) -> None:
    """A random permutation changes the weights but not the outputs (eval and train mode)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    spec.check(state)
    assert spec.groups, "no permutation group found"
    for seed in seeds:
        perm = mc.random_permutation(spec, seed=seed)
        while all(torch.equal(p, torch.arange(len(p))) for p in perm.values()):
            seed += 1000  # tiny groups: skip the identity
            perm = mc.random_permutation(spec, seed=seed)
        mc.check_permutation(spec, perm)
        permuted = mc.apply_permutation(spec, perm, state)
        changed = [k for k in spec.params() if not torch.equal(permuted[k], state[k])]
        assert changed, "the permutation changed no weight (vacuous test)"
        for train in (False, True):
            ref = outputs(copy.deepcopy(model), dict(state), inputs, train=train)
            got = outputs(copy.deepcopy(model), permuted, inputs, train=train)
            assert ref, "the model returned no float tensor"
            for a, b in zip(ref, got, strict=True):
                diff = (a - b).abs().max().item()
                assert diff <= 1e-5 * max(1.0, a.abs().max().item()), (
                    f"outputs differ by {diff} (train={train}, seed={seed})"
                )
        back = mc.apply_permutation(spec, mc.inverse_permutation(perm), permuted)
        assert all(torch.equal(back[k], state[k]) for k in state)


def covered(spec: mc.PermutationSpec, state: dict, param: str, axis: int) -> torch.Tensor:
    """Mask of the positions on ``param``'s ``axis`` some group's slot acts on."""
    mask = torch.zeros(state[param].shape[axis], dtype=torch.bool)
    for g, s in spec.slots_of(param):
        if s.axis == axis:
            mask[s.positions(spec.groups[g]).flatten()] = True
    return mask


def assert_hidden_covered(model: nn.Module, spec: mc.PermutationSpec, skip: set[str]) -> None:
    """Every Linear/Conv output unit (except the final layers in ``skip``) is in some group."""
    state = model.state_dict()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear | nn.modules.conv._ConvNd) and name not in skip:
            mask = covered(spec, state, f"{name}.weight", 0)
            assert mask.all(), f"{name}: {int((~mask).sum())} output units in no group"


def infer(model, x, **kw) -> mc.PermutationSpec:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean model must not warn
        return mc.infer_spec(model, x, verify=False, **kw)


def coverage(model: nn.Module, spec: mc.PermutationSpec) -> float:
    """Fraction of float parameter entries some group moves: an entry is moved when its position
    on at least one axis is in a slot (entries uncovered on every axis = prod of (1 - share))."""
    state = model.state_dict()
    total, hit = 0, 0.0
    for k, t in state.items():
        if not t.is_floating_point() or t.dim() == 0:
            continue
        miss = 1.0
        for axis in range(t.dim()):
            miss *= 1.0 - float(covered(spec, state, k, axis).float().mean())
        total += t.numel()
        hit += (1.0 - miss) * t.numel()
    return hit / max(total, 1)
