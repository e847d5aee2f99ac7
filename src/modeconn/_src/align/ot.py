"""OT fusion (Singh & Jaggi, NeurIPS 2020): optimal-transport maps between units, layer by layer.

Singh & Jaggi, "Model Fusion via Optimal Transport", NeurIPS 2020 (code: sidak/otfusion). Each
permutation group is visited once, in the spec's (forward) order. For group ``g`` the ground
metric between A's unit ``i`` and B's unit ``j`` is

- ``cost="weight"``: ``C[i, j] = sum_slots ||W^A_slot[i] - Ŵ^B_slot[j]||²`` over the slots of
  ``g`` whose other permuted axes belong to groups already visited (the incoming weights and
  bias of a layer), with ``Ŵ^B`` = B with the visited groups' transport maps applied (the
  paper's "align the incoming edges with the previous layer's map first");
- ``cost="activation"``: ``C[i, j] = -corr(a_i, b_j)`` summed over the group's sites, i.e. the
  squared distance of standardised activations over ``data`` (up to constants).

``C`` is scaled to ``max C = 1`` and the transport plan between uniform marginals solves
``T = argmin_{T 1 = 1/n, Tᵀ1 = 1/n} <T, C> - reg·H(T)`` (``reg = 0``: exact EMD, ``ot.emd``;
``reg > 0``: entropic, ``ot.sinkhorn``). The soft map ``P = n·T`` (rows and columns sum to 1;
``P[i, j]``: weight of B's unit ``j`` at A's position ``i``) aligns B: ``Ŵ^B = P W^B`` per slot
(:func:`~modeconn._src.align.sinkhorn.soft_apply`); the fused model is
``θ_F = (1 - t)·θ_A + t·P(θ_B)`` (:func:`ot_fusion`). For the :class:`Permutation` contract each
``P`` is rounded by the Hungarian method, ``p = argmax_p sum_i P[i, p(i)]`` (exact EMD between
equal-size uniform marginals already gives a permutation matrix). N models:
:func:`ot_barycenter` (Akash et al. 2023's Wasserstein barycenter, by fixed-point iteration).

Needs POT (``pip install modeconn[ot]``), imported lazily.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..assign import solve_assignment
from ..errors import ConfigError
from ..evaluation import DataLike, resolve_device, with_state
from ..progress import progress_bar
from ..spec import Permutation, PermutationSpec, Slot, unit_classes
from ..state import check_compatible, check_finite
from .base import Aligner, AlignInputs, signature_params
from .builtins import options
from .sinkhorn import soft_apply

COSTS = ("weight", "activation")
State = dict[str, Tensor]


def _pot() -> Any:
    from ..optional import require

    return require("ot", "ot", feature="OT fusion")


def _rows(t: Tensor, slot: Slot, size: int) -> Tensor:
    """The slot's units as rows: ``(n_units, everything else)`` (the axis moved first)."""
    moved = t.movedim(slot.axis, 0)
    flat = moved.reshape(moved.shape[0], -1)
    pos = slot.positions(size)
    n = pos.shape[0]
    return flat.index_select(0, pos.flatten()).reshape(n, -1)


def _incoming(spec: PermutationSpec, g: str, visited: set[str]) -> list[Slot]:
    """The slots of ``g`` whose tensor's other permuted axes all belong to visited groups."""
    axes: dict[str, list[tuple[str, int]]] = {}
    for h, slots in spec.slots.items():
        for s in slots:
            axes.setdefault(s.param, []).append((h, s.axis))
    keep = [
        s for s in spec.slots[g]
        if all(h in visited for h, ax in axes[s.param] if ax != s.axis)
    ]
    return keep or list(spec.slots[g])


def _plan(cost: Tensor, mask: Tensor | None, reg: float, n_iter: int) -> Tensor:
    """``n·T`` for the OT plan between uniform marginals under ``cost`` (forbidden pairs: mask)."""
    ot = _pot()
    n = cost.shape[0]
    c = cost.double().clone()
    c = c - c.min()
    top = float(c.max())
    if top > 0:
        c = c / top
    if mask is not None:
        c = c.masked_fill(~mask, 1e3)  # far above any feasible pair (costs are in [0, 1])
    w = torch.full((n,), 1.0 / n, dtype=torch.float64)
    if reg == 0:
        plan = ot.emd(w.numpy(), w.numpy(), c.numpy())
    else:
        plan = ot.sinkhorn(w.numpy(), w.numpy(), c.numpy(), reg, method="sinkhorn_log",
                           numItermax=n_iter, warn=False)
    return torch.as_tensor(plan, dtype=torch.float64) * n


def ot_transport(
    spec: PermutationSpec,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    *,
    cost: str = "weight",
    reg: float = 0.0,
    n_iter: int = 1000,
    model: nn.Module | None = None,
    data: DataLike | None = None,
    max_batches: int | None = None,
    eps: float = 1e-8,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """The soft transport maps ``{group: P}`` of OT fusion (Singh & Jaggi, NeurIPS 2020).

    See the module docstring for the ground metrics and the plan; ``P = n·T`` with
    ``P[i, j]`` the weight of B's unit ``j`` at A's position ``i`` (rows and columns sum to 1).
    Attention groups (``spec.heads``) get the head-structured Hungarian rounding of their plan.

    Args:
        spec: the permutation spec.
        state_a: the reference state (not modified).
        state_b: the state to align (not modified).
        cost: ``"weight"`` (data-free) or ``"activation"`` (needs ``model`` and ``data``).
        reg: entropic regularisation on the cost scaled to ``[0, 1]``; 0: exact OT (EMD).
        n_iter: Sinkhorn iterations (``reg > 0``).
        model: a module of the states' architecture (activation cost).
        data: inputs for the activation cost.
        max_batches: batches of ``data`` used (activation cost; default all).
        eps: added to standard deviations in the correlation (activation cost).
        device: where the activations are computed.
        progress: show a progress bar.

    Returns:
        ``{group: (n, n) float64 tensor}`` on CPU.

    Example:
        >>> spec = PermutationSpec.from_axes({"h": 2}, {"w": ("h", None)})
        >>> a = {"w": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}
        >>> ot_transport(spec, a, {"w": a["w"].flip(0)})["h"].tolist()
        [[0.0, 1.0], [1.0, 0.0]]
    """
    if cost not in COSTS:
        raise ConfigError(f"cost must be one of {', '.join(COSTS)}, got {cost!r}")
    if reg < 0 or n_iter < 1:
        raise ConfigError(f"OT fusion needs reg >= 0 and n_iter >= 1, got {reg} and {n_iter}")
    check_compatible([state_a, state_b], ["model A", "model B"])
    check_finite(state_a, "model A")
    check_finite(state_b, "model B")
    corr = _activation_costs(spec, state_a, state_b, model, data, max_batches, eps, device,
                             progress) if cost == "activation" else {}
    a = {k: v.detach().cpu().double() for k, v in state_a.items() if v.is_floating_point()}
    b = {k: v.detach().cpu().double() for k, v in state_b.items() if v.is_floating_point()}
    maps: dict[str, Tensor] = {g: torch.eye(n, dtype=torch.float64) for g, n in spec.groups.items()}
    visited: set[str] = set()
    for g, n in spec.groups.items():
        if n > 1:
            labels = unit_classes(spec, g)  # slices of fused tensors (q/k vs v dims) never mix
            mask = None if labels is None else labels[:, None] == labels[None, :]
            if g in corr:
                c = -corr[g]
            else:
                b_now = soft_apply(spec, maps, b)
                c = torch.zeros(n, n, dtype=torch.float64)
                for s in _incoming(spec, g, visited):
                    ra, rb = _rows(a[s.param], s, n), _rows(b_now[s.param], s, n)
                    lo = s.unit_start
                    c[lo: lo + len(ra), lo: lo + len(rb)] += torch.cdist(ra, rb).square()
            plan = _plan(c, mask, reg, n_iter)
            if g in spec.heads:  # keep attention heads whole: the structured rounding
                p = solve_assignment(plan, spec.heads[g])
                plan = torch.zeros_like(plan)
                plan[torch.arange(n), p] = 1.0
            maps[g] = plan
        visited.add(g)
    return maps


def _activation_costs(
    spec: PermutationSpec,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    model: nn.Module | None,
    data: DataLike | None,
    max_batches: int | None,
    eps: float,
    device: str | torch.device | None,
    progress: bool,
) -> dict[str, Tensor]:
    """Summed site correlations per group with sites (activation matching's streaming pass)."""
    from .activation import _batches, _correlations, _count

    if model is None or data is None:
        raise ConfigError("OT fusion with cost='activation' needs model= and data=")
    dev = resolve_device(device) if device is not None else torch.device("cpu")
    model_a = with_state(model, state_a).to(dev).eval()
    model_b = with_state(model, state_b).to(dev).eval()
    groups = [g for g, n in spec.groups.items() if n > 1 and spec.sites.get(g)]
    if not groups:
        return {}
    with progress_bar(progress, total=_count(data, max_batches), description="OT") as advance:
        batches = _batches(model_a, model_b, data, max_batches, dev, None, "each", 0)
        stats = _correlations(model_a, model_b, spec, groups, batches, dev, eps, advance)
    return {g: st.corr for g, st in stats.items()}


def ot_matching(
    spec: PermutationSpec,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    **kwargs: Any,
) -> Permutation:
    """OT fusion's alignment, rounded to a permutation (Singh & Jaggi, NeurIPS 2020).

    ``p_g = argmax_p sum_i P_g[i, p(i)]`` (Hungarian; head-structured for attention groups) for
    the soft maps ``P_g`` of :func:`ot_transport`.

    Args:
        spec: the permutation spec.
        state_a: the reference state (not modified).
        state_b: the state to align (not modified).
        **kwargs: :func:`ot_transport`'s options (``cost``, ``reg``, ``model``, ``data``, ...).

    Returns:
        The :class:`Permutation` mapping B onto A; ``info["transport"]`` holds the soft maps,
        ``info["mass_kept"]`` the fraction of transported mass the permutation keeps (1.0 for
        an exact plan).

    Example:
        >>> spec = PermutationSpec.from_axes({"h": 3}, {"w": ("h", None)})
        >>> a = {"w": torch.eye(3)}
        >>> ot_matching(spec, a, {"w": a["w"][[2, 0, 1]]})["h"].tolist()
        [1, 2, 0]
    """
    maps = ot_transport(spec, state_a, state_b, **kwargs)
    perm = Permutation()
    kept, total = 0.0, 0
    for g, p in maps.items():
        n = spec.groups[g]
        labels = unit_classes(spec, g)
        score = p if labels is None else p.masked_fill(labels[:, None] != labels[None, :], -1.0)
        perm[g] = solve_assignment(score, spec.heads.get(g))
        kept += float(p[torch.arange(n), perm[g]].sum())
        total += n
    perm.info = {
        "method": "ot",
        "cost": kwargs.get("cost", "weight"),
        "reg": kwargs.get("reg", 0.0),
        "transport": maps,
        "mass_kept": kept / max(total, 1),
    }
    return perm


def ot_fusion(
    spec: PermutationSpec,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    *,
    t: float = 0.5,
    **kwargs: Any,
) -> State:
    """The OT-fused model ``θ_F = (1 - t)·θ_A + t·P(θ_B)`` with the soft maps ``P``.

    Singh & Jaggi (NeurIPS 2020), "averaging the aligned weights"; ``P`` from
    :func:`ot_transport` (``reg > 0`` gives soft maps that mix B's units). Non-floating tensors
    come from A; BatchNorm statistics are transported like weights (``mc.reset_bn`` recomputes
    them exactly).

    Args:
        spec: the permutation spec.
        state_a: model A's state (not modified).
        state_b: model B's state (not modified).
        t: B's share (0.5: the paper's average of two models).
        **kwargs: :func:`ot_transport`'s options.

    Returns:
        The fused state dict (A's dtypes and device).

    Example:
        >>> spec = PermutationSpec.from_axes({"h": 2}, {"w": ("h", None)})
        >>> a = {"w": torch.tensor([[1.0, 0.0], [0.0, 3.0]])}
        >>> ot_fusion(spec, a, {"w": a["w"].flip(0)})["w"].tolist()
        [[1.0, 0.0], [0.0, 3.0]]
    """
    if not 0.0 <= t <= 1.0:
        raise ConfigError(f"t must lie in [0, 1], got {t}")
    maps = ot_transport(spec, state_a, state_b, **kwargs)
    b64 = {k: v.detach().cpu().double() for k, v in state_b.items() if v.is_floating_point()}
    moved = soft_apply(spec, maps, b64)
    out: State = {}
    for k, v in state_a.items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        mixed = (1 - t) * v.detach().cpu().double() + t * moved[k]
        out[k] = mixed.to(dtype=v.dtype, device=v.device)
    return out


def ot_barycenter(
    spec: PermutationSpec,
    states: Sequence[Mapping[str, Tensor]],
    *,
    weights: Sequence[float] | None = None,
    iters: int = 5,
    tol: float = 1e-10,
    **kwargs: Any,
) -> State:
    """Fusion of N models as a Wasserstein barycenter (Akash, Li & García Trillos 2023).

    "Wasserstein Barycenter-based Model Fusion and Linear Mode Connectivity of Neural Networks":
    each layer's units are an empirical measure; their barycenter is found by fixed-point
    iteration: start from model 0, then repeatedly transport every model onto the current
    barycenter (:func:`ot_transport`, the same layer-by-layer maps ``P_i``) and average,
    ``θ ← sum_i w_i P_i(θ_i)``, until nothing changes (``tol``) or ``iters`` rounds. With two
    models and one round this is :func:`ot_fusion` at ``t = w_1``.

    Args:
        spec: the permutation spec.
        states: N >= 2 states (not modified).
        weights: per-model weights (normalised; default uniform).
        iters: fixed-point rounds.
        tol: stop when the barycenter moves less than this (max abs change).
        **kwargs: :func:`ot_transport`'s options.

    Returns:
        The fused state (model 0's dtypes and device; non-floating tensors from model 0).

    Example:
        >>> spec = PermutationSpec.from_axes({"h": 2}, {"w": ("h", None)})
        >>> a = {"w": torch.tensor([[1.0, 0.0], [0.0, 3.0]])}
        >>> ot_barycenter(spec, [a, {"w": a["w"].flip(0)}, a])["w"].tolist()
        [[1.0, 0.0], [0.0, 3.0]]
    """
    if len(states) < 2 or iters < 1:
        raise ConfigError(f"a barycenter needs >= 2 models and iters >= 1, got {len(states)}, "
                          f"{iters}")
    w = [1.0] * len(states) if weights is None else [float(x) for x in weights]
    if len(w) != len(states) or sum(w) == 0:
        raise ConfigError(f"give one weight per model with a non-zero sum, got {w}")
    w = [x / sum(w) for x in w]
    s64 = [{k: v.detach().cpu().double() for k, v in s.items() if v.is_floating_point()}
           for s in states]
    bary = dict(s64[0])
    for _ in range(iters):
        moved = [soft_apply(spec, ot_transport(spec, bary, s, **kwargs), s) for s in s64]
        new = {k: torch.stack([wi * m[k] for wi, m in zip(w, moved, strict=True)]).sum(0)
               for k in bary}
        change = max(float((new[k] - bary[k]).abs().max()) for k in bary) if bary else 0.0
        bary = new
        if change <= tol:
            break
    first = states[0]
    return {k: bary[k].to(v.dtype).to(v.device) if k in bary else v.clone()
            for k, v in first.items()}

class OtAligner(Aligner):
    """OT fusion's alignment (Singh & Jaggi 2020): per-group transport plans, rounded."""

    Params = signature_params(ot_transport, exclude=("model", "data"), name="OtParams")
    exact = True

    def requires(self, params: Any) -> frozenset[str]:
        """The activation cost runs the networks on data."""
        extra = {"models", "data"} if getattr(params, "cost", "weight") == "activation" else set()
        return self.needs | extra

    def run(self, inputs: AlignInputs, params: Any) -> Permutation:
        """:func:`ot_matching` (the soft maps are in ``info["transport"]``)."""
        return ot_matching(inputs.spec, inputs.state_a, inputs.state_b, model=inputs.model_a,
                           data=inputs.data, **options(params))
