"""Sinkhorn re-basin (Peña et al. 2022): learn soft permutations by gradient descent, then round."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..assign import solve_assignment
from ..errors import ConfigError, DataError
from ..evaluation import DataLike, as_loader, model_device, resolve_device
from ..progress import progress_bar
from ..spec import Permutation, PermutationSpec, Slot, apply_permutation, unit_classes
from ..state import check_compatible, check_finite, lerp
from .api import register_aligner, resolve_spec
from .ste import fresh_buffers, midpoint_mode

LOSSES = ("weight", "task")


def sinkhorn(log_alpha: Tensor, n_iter: int = 20, tau: float = 1.0) -> Tensor:
    """Log-domain Sinkhorn normalisation: a doubly stochastic matrix from a real one.

    ``L = log_alpha / tau``; ``n_iter`` times: ``L -= logsumexp(L, rows)``,
    ``L -= logsumexp(L, cols)``; returns ``exp(L)`` (Sinkhorn 1964; Mena et al. 2018). Entries
    equal to ``-inf`` stay exactly zero.

    Args:
        log_alpha: ``(n, n)`` real matrix, or a batch ``(..., n, n)``.
        n_iter: normalisation rounds.
        tau: temperature (smaller: closer to a permutation matrix).

    Returns:
        Matrices of the same shape with rows and columns summing to (nearly) one.

    Example:
        >>> s = sinkhorn(torch.randn(4, 4))
        >>> torch.allclose(s.sum(0), torch.ones(4), atol=1e-4)
        True
    """
    log = log_alpha / tau
    for _ in range(n_iter):
        log = log - torch.logsumexp(log, dim=-1, keepdim=True)
        log = log - torch.logsumexp(log, dim=-2, keepdim=True)
    return log.exp()


def soft_apply(
    spec: PermutationSpec, soft_perms: Mapping[str, Tensor], state: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Apply (soft) permutation matrices to ``state``, differentiably.

    The matrix form of :func:`modeconn.apply_permutation`: a group's matrix ``P`` (``P[i, j]``:
    weight of B's unit ``j`` at position ``i``; a hard permutation ``p`` is ``P[i, p[i]] = 1``)
    acts on every slot of the group as ``W'_slot = P_slot @ W_slot``, where ``W_slot`` is the
    tensor with the slot's axis moved first, restricted to the slot's positions and reshaped to
    ``(units, repeats * block * rest)``, and ``P_slot`` is the block of ``P`` for the units the slot
    carries. Axes are processed one after another, so a hidden weight becomes
    ``P_l W P_{l-1}^T``. Tensors the spec does not touch are returned as they are.

    Args:
        spec: the permutation spec.
        soft_perms: ``{group: (n, n) matrix}`` (doubly stochastic, or permutation matrices).
        state: a state dict (not modified).

    Returns:
        A new state dict (tensors depend differentiably on ``soft_perms``).

    Example:
        >>> spec = PermutationSpec.from_axes({"h": 2}, {"w": ("h", None)})
        >>> p = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
        >>> soft_apply(spec, {"h": p}, {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]])})["w"].tolist()
        [[3.0, 4.0], [1.0, 2.0]]
    """
    on_axis: dict[tuple[str, int], list[tuple[str, Slot]]] = {}
    for g, slots in spec.slots.items():
        for s in slots:
            on_axis.setdefault((s.param, s.axis), []).append((g, s))
    out = dict(state)
    for (param, axis), pairs in on_axis.items():
        if param not in out:
            raise ConfigError(f"spec names tensor {param!r}, which the state does not have")
        t = out[param]
        moved = t.movedim(axis, 0)
        flat = moved.reshape(moved.shape[0], -1)
        new = flat
        for g, s in pairs:
            size = spec.groups[g]
            pos = s.positions(size)  # (n, k)
            n, k = pos.shape
            lo = s.unit_start
            idx = pos.flatten().to(t.device)
            sub = flat.index_select(0, idx).reshape(n, -1)
            p = soft_perms[g][lo : lo + n, lo : lo + n].to(sub.dtype)
            mixed = (p @ sub).reshape(n * k, -1)
            new = new.index_copy(0, idx, mixed)
        out[param] = new.reshape(moved.shape).movedim(0, axis)
    return out


def _unit_mask(spec: PermutationSpec, g: str) -> Tensor | None:
    """Which units of group ``g`` may trade places: those carried by exactly the same slots."""
    labels = unit_classes(spec, g)
    if labels is None:
        return None
    mask = labels[:, None] == labels[None, :]
    return None if bool(mask.all()) else mask


def sinkhorn_matching(
    model_a: nn.Module,
    model_b: nn.Module,
    data: DataLike | None = None,
    *,
    spec: PermutationSpec | None = None,
    loss: str = "weight",
    lam: str | float = "mid",
    tau: float = 1.0,
    n_iter: int = 20,
    steps: int = 300,
    lr: float = 0.1,
    noise: float = 0.1,
    batch_size: int = 128,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> Permutation:
    """Sinkhorn re-basin (Peña, Medeiros, Xu & Dhillon, "Re-basin via implicit Sinkhorn
    differentiation", 2022; CVPR 2023).

    Each permutation group ``g`` gets a real matrix ``M_g`` (initialised ``I + noise * N(0, 1)``,
    seeded); ``S_g = Sinkhorn(M_g / tau)`` (log domain, ``n_iter`` rounds) is a soft permutation,
    applied to B's weights by :func:`soft_apply`. Adam (``lr``) minimises, over ``steps`` steps,

    * ``loss="weight"`` (data-free): ``sum over the spec's tensors ||theta_A - S(theta_B)||^2``;
    * ``loss="task"``: ``CE(f(x; (1 - lam) theta_A + lam S(theta_B)), y)`` on minibatches, with
      ``lam = 0.5`` (``"mid"``), ``lam ~ U(0, 1)`` per step (``"random"``) or a given float.
      BatchNorm networks run with batch statistics (BN in train mode, everything else in eval);
      BN then renormalises the averaged units of a soft midpoint, so the relaxation is loose and
      the rounded permutation can be poor (measured on an MNIST-1D BN MLP: worse than weight
      matching) -- prefer ``loss="weight"``, STE or weight matching for BN networks.

    At the end each group is rounded by the Hungarian method on its learned matrix,
    ``p_g = argmax_p sum_i M_g[i, p[i]]`` (the same as on ``log S_g``, which differs from
    ``M_g / tau`` by row and column constants). Attention groups are optimised as plain groups
    (units carried by different slots, e.g. q/k versus v dims, never mix) and rounded with the
    heads-structured assignment (:func:`modeconn.solve_assignment` with the group's ``Heads``).

    Args:
        model_a: the reference model (not modified).
        model_b: the model to align (not modified).
        data: needed for ``loss="task"`` (and for inferring the spec when ``spec`` is not given).
        spec: the permutation spec (default: ``mc.infer_spec``).
        loss: ``"weight"`` or ``"task"``.
        lam: interpolation coefficient for the task loss: ``"mid"``, ``"random"`` or a float.
        tau: Sinkhorn temperature.
        n_iter: Sinkhorn rounds per step.
        steps: optimisation steps.
        lr: Adam learning rate.
        noise: standard deviation of the initial perturbation of the identity.
        batch_size: batch size when ``data`` is a Dataset or tuple.
        seed: seeds the initial matrices, the shuffling and random ``lam``.
        device: where to run (default: model A's device).
        progress: show a progress bar over steps.

    Returns:
        A :class:`Permutation` mapping B onto A; ``info`` has ``loss`` (``"weight"``: the weight
        distance after rounding; ``"task"``: the last minibatch loss), ``weight_distance``
        (after rounding), ``losses`` (per step) and ``steps``.

    Example:
        >>> import torch, modeconn as mc
        >>> a = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> spec = mc.PermutationSpec.from_axes({"h": 8}, {"0.weight": ("h", None),
        ...     "0.bias": ("h",), "2.weight": (None, "h")})
        >>> q = mc.random_permutation(spec, seed=1)
        >>> b = copy.deepcopy(a)
        >>> _ = b.load_state_dict(mc.apply_permutation(spec, q, a.state_dict()))
        >>> p = sinkhorn_matching(a, b, spec=spec, steps=100)
        >>> torch.equal(p["h"], torch.argsort(q["h"]))
        True
    """
    if loss not in LOSSES:
        raise ConfigError(f"unknown sinkhorn loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if isinstance(lam, str) and lam not in ("mid", "random"):
        raise ConfigError(f"lam must be 'mid', 'random' or a number in [0, 1], got {lam!r}")
    if not isinstance(lam, str) and not 0.0 <= float(lam) <= 1.0:
        raise ConfigError(f"lam must be in [0, 1], got {lam}")
    if loss == "task" and data is None:
        raise ConfigError("sinkhorn_matching(loss='task') needs data: pass data=")
    if steps < 0 or lr <= 0 or tau <= 0 or n_iter < 1:
        raise ConfigError(
            f"sinkhorn_matching needs steps >= 0, lr > 0, tau > 0, n_iter >= 1 "
            f"(got {steps}, {lr}, {tau}, {n_iter})"
        )
    state_a0, state_b0 = model_a.state_dict(), model_b.state_dict()
    check_compatible([state_a0, state_b0], ["model A", "model B"])
    check_finite(state_a0, "model A")
    check_finite(state_b0, "model B")
    dev = resolve_device(device) if device is not None else model_device(model_a)
    spec = resolve_spec(model_a, spec, data=data)
    spec.check(state_a0)
    state_a = {k: v.detach().to(dev) for k, v in state_a0.items()}
    state_b = {k: v.detach().to(dev) for k, v in state_b0.items()}

    # one real matrix per group; groups of one size are stacked so Sinkhorn runs batched
    gen = torch.Generator().manual_seed(seed)
    inits: dict[str, Tensor] = {
        g: torch.eye(n) + noise * torch.randn(n, n, generator=gen) for g, n in spec.groups.items()
    }
    buckets: dict[int, list[str]] = {}
    for g, n in spec.groups.items():
        buckets.setdefault(n, []).append(g)
    stacks: dict[int, Tensor] = {}
    masks: dict[int, Tensor] = {}
    for n, names in buckets.items():
        stacks[n] = torch.stack([inits[g] for g in names]).to(dev).requires_grad_(True)
        unit_masks = [_unit_mask(spec, g) for g in names]
        if any(m is not None for m in unit_masks):
            full = torch.ones(n, n, dtype=torch.bool)
            masks[n] = torch.stack([full if m is None else m for m in unit_masks]).to(dev)
    opt = torch.optim.Adam(list(stacks.values()), lr=lr)

    def soft_perms() -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for n, names in buckets.items():
            m = stacks[n]
            if n in masks:
                m = m.masked_fill(~masks[n], float("-inf"))
            soft = sinkhorn(m, n_iter, tau)
            out.update(zip(names, soft.unbind(0), strict=True))
        return out

    touched = [k for k in sorted(spec.params()) if state_a[k].is_floating_point()]

    def weight_distance(permuted_b: Mapping[str, Tensor]) -> Tensor:
        return sum(((state_a[k] - permuted_b[k]) ** 2).sum() for k in touched)

    batches = None
    net = None
    buffer_names: set[str] = set()
    if loss == "task":
        assert data is not None
        net = midpoint_mode(copy.deepcopy(model_a).to(dev))
        buffer_names = {k for k, _ in net.named_buffers()}
        loader = as_loader(data, batch_size=batch_size, shuffle=True, seed=seed)
        if len(loader) == 0:
            raise DataError("sinkhorn_matching got an empty dataset")

        def cycle() -> Any:
            while True:
                yield from loader

        batches = cycle()

    losses: list[float] = []
    with progress_bar(progress, total=steps, description="Sinkhorn re-basin") as advance:
        for _ in range(steps):
            permuted_b = soft_apply(spec, soft_perms(), state_b)
            if loss == "weight":
                value = weight_distance(permuted_b)
            else:
                assert batches is not None and net is not None
                x, y = next(batches)
                if lam == "random":
                    t = float(torch.rand((), generator=gen))
                else:
                    t = 0.5 if lam == "mid" else float(lam)
                mid = lerp(state_a, permuted_b, t)
                mid.update(fresh_buffers(mid, buffer_names))
                out = torch.func.functional_call(net, mid, (x.to(dev),))
                value = F.cross_entropy(out, y.to(dev))
            if not torch.isfinite(value):
                raise DataError("sinkhorn_matching: the loss is not finite; lower lr or raise tau")
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            losses.append(float(value.detach()))
            advance(f"loss {losses[-1]:.4g}")

    perm = Permutation()
    with torch.no_grad():
        for n, names in buckets.items():
            for i, g in enumerate(names):
                score = stacks[n][i].detach()
                if n in masks:
                    score = score.masked_fill(~masks[n][i], -1e9 * (1 + score.abs().max()))
                perm[g] = solve_assignment(score, spec.heads.get(g))
        hard = apply_permutation(spec, perm, state_b)
        final = float(weight_distance(hard))
    perm.info = {
        "method": "sinkhorn",
        "loss_kind": loss,
        "loss": final if loss == "weight" else (losses[-1] if losses else float("nan")),
        "weight_distance": final,
        "losses": losses,
        "steps": steps,
    }
    return perm


def _sinkhorn_aligner(
    model_a: nn.Module, model_b: nn.Module, data: Any, spec: PermutationSpec, **kwargs: Any
) -> Permutation:
    return sinkhorn_matching(model_a, model_b, data, spec=spec, **kwargs)


register_aligner("sinkhorn")(_sinkhorn_aligner)
