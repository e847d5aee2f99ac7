"""Weight matching (Git Re-Basin): align B's hidden units to A's by maximising <W_A, pi(W_B)>."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..assign import solve_assignment
from ..errors import SpecError
from ..progress import progress_bar
from ..spec import (
    Permutation,
    PermutationSpec,
    Slot,
    check_permutation,
    identity_permutation,
    random_permutation,
    unit_classes,
)
from ..state import check_compatible, check_finite

_TOL = 1e-12  # an update is kept only if it raises the objective by more than this


def block_mask(spec: PermutationSpec, group: str) -> Tensor | None:
    """Which unit pairs ``(i, j)`` a valid permutation of ``group`` may map onto each other.

    A slot carrying only units ``[unit_start, unit_start + length)`` (concatenations) forbids
    moving units across its range; units may swap only if every slot carries both or neither.
    ``None`` when nothing is forbidden (all slots carry the whole group) or for attention groups
    (their structure is handled by :func:`~modeconn.solve_assignment`).
    """
    if group in spec.heads:
        return None
    labels = unit_classes(spec, group)
    return None if labels is None else labels[:, None] == labels[None, :]


def masked(score: Tensor, mask: Tensor | None) -> Tensor:
    """``score`` with forbidden pairs set far below any feasible assignment's value."""
    if mask is None:
        return score
    low = -(score.abs().sum() + 1.0) * 2
    return score.masked_fill(~mask.to(score.device), float(low))


@dataclass
class _SlotTerm:
    """One (tensor, axis) slot of a group, with A's side flattened once."""

    param: str
    axis: int
    lo: int  # first unit carried
    n: int  # units carried
    pos: Tensor  # (n * repeats * block,) axis positions, unit-major
    a_mat: Tensor  # (n, -1) A's tensor restricted to the slot, axis first, compute dtype


class _Problem:
    """Precomputed pieces of the weight-matching objective for one pair of states.

    ``sum_{params} <W_A, pi(W_B)>`` is linear in each group's permutation matrix once the other
    groups are fixed; the coefficient matrix of group ``g`` is
    ``C_g = sum_{slots} A_s @ B_s^T`` where ``B_s`` has every permutation on the tensor's *other*
    axes applied. Only those axes are gathered (per-tensor ``index_select``), never a whole state.
    """

    def __init__(
        self,
        spec: PermutationSpec,
        state_a: Mapping[str, Tensor],
        state_b: Mapping[str, Tensor],
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.b = {p: state_b[p] for p in spec.params()}
        self.a = {p: state_a[p] for p in spec.params()}
        # (param, axis) -> [(group, slot)] : every permutation acting on that axis
        self.on_axis: dict[tuple[str, int], list[tuple[str, Slot]]] = {}
        for g, slots in spec.slots.items():
            for s in slots:
                self.on_axis.setdefault((s.param, s.axis), []).append((g, s))
        self.axes_of: dict[str, list[int]] = {}
        for param, axis in self.on_axis:
            self.axes_of.setdefault(param, []).append(axis)
        # group -> (param, axis) keys whose gather index depends on it
        self.keys_of: dict[str, set[tuple[str, int]]] = {g: set() for g in spec.groups}
        for key, pairs in self.on_axis.items():
            for g, _ in pairs:
                self.keys_of[g].add(key)
        self.terms: dict[str, list[_SlotTerm]] = {}
        for g, slots in spec.slots.items():
            size = spec.groups[g]
            terms = []
            for s in slots:
                pos = s.positions(size)
                n = pos.shape[0]
                flat = pos.flatten().to(device)
                a = self.a[s.param].to(device).index_select(s.axis, flat)
                a_mat = a.movedim(s.axis, 0).reshape(n, -1).to(dtype)
                terms.append(_SlotTerm(s.param, s.axis, s.unit_start, n, flat, a_mat))
            if terms:
                self.terms[g] = terms
        self.masks = {g: block_mask(spec, g) for g in self.terms}
        # groups acting on two axes of one tensor (a square weight inside a residual stream,
        # a weight shared by consecutive layers): J is quadratic in them, C_g only linearises it
        self.params_of: dict[str, list[str]] = {
            g: list(dict.fromkeys(s.param for s in slots)) for g, slots in spec.slots.items()
        }
        self.quadratic = {
            g
            for g, slots in spec.slots.items()
            if any(len({s.axis for s in slots if s.param == p}) > 1 for p in self.params_of[g])
        }
        self._index: dict[tuple[str, int], Tensor] = {}
        self._index_for: object = None  # the permutation object the cached indices belong to

    # -- gather indices --------------------------------------------------------------------
    def invalidate(self, group: str) -> None:
        for key in self.keys_of[group]:
            self._index.pop(key, None)

    def index(self, key: tuple[str, int], perm: Mapping[str, Tensor]) -> Tensor:
        if perm is not self._index_for:  # another permutation: the cache does not apply
            self._index.clear()
            self._index_for = perm
        idx = self._index.get(key)
        if idx is None:
            param, axis = key
            idx = torch.arange(self.b[param].shape[axis])
            for g, s in self.on_axis[key]:
                size = self.spec.groups[g]
                pos = s.positions(size)
                lo, n = s.unit_start, pos.shape[0]
                idx[pos.flatten()] = pos[perm[g][lo : lo + n] - lo].flatten()
            idx = idx.to(self.device)
            self._index[key] = idx
        return idx

    def permuted_b(self, param: str, perm: Mapping[str, Tensor], skip_axis: int | None) -> Tensor:
        """B's tensor with the current permutations on every axis but ``skip_axis`` applied."""
        t = self.b[param].to(self.device)
        for axis in self.axes_of[param]:
            if axis != skip_axis:
                t = t.index_select(axis, self.index((param, axis), perm))
        return t

    # -- objective -------------------------------------------------------------------------
    def cost(self, g: str, perm: Mapping[str, Tensor]) -> Tensor:
        """``C_g[i, j]``: gain of putting B's unit ``j`` at A's unit ``i`` (others fixed)."""
        size = self.spec.groups[g]
        c = torch.zeros(size, size, dtype=self.dtype, device=self.device)
        for t in self.terms[g]:
            b = self.b[t.param].to(self.device).index_select(t.axis, t.pos)
            for axis in self.axes_of[t.param]:
                if axis != t.axis:
                    b = b.index_select(axis, self.index((t.param, axis), perm))
            b_mat = b.movedim(t.axis, 0).reshape(t.n, -1).to(self.dtype)
            c[t.lo : t.lo + t.n, t.lo : t.lo + t.n] += t.a_mat @ b_mat.T
        return masked(c, self.masks[g])

    def objective(self, perm: Mapping[str, Tensor], params: Iterable[str] | None = None) -> float:
        """``sum over the spec's tensors (or ``params``) of <W_A, pi(W_B)>`` (float64)."""
        total = 0.0
        for param in self.a if params is None else params:
            a = self.a[param].to(self.device, self.dtype)
            b = self.permuted_b(param, perm, None).to(self.dtype)
            total += float((a * b).sum())
        return total


def _descend(
    prob: _Problem,
    perm: Permutation,
    *,
    max_iter: int,
    gen: torch.Generator,
    tick: Callable[[], None] | None = None,
) -> tuple[Permutation, float, int, list[float]]:
    """Coordinate descent from ``perm``; returns (perm, objective, rounds, objective per round)."""
    spec = prob.spec
    groups = list(prob.terms)
    objective = prob.objective(perm)
    history = [objective]
    rounds = 0
    for _ in range(max_iter):
        rounds += 1
        improved = False
        for i in torch.randperm(len(groups), generator=gen).tolist():
            g = groups[i]
            c = prob.cost(g, perm)
            rows = torch.arange(c.shape[0], device=c.device)
            new = solve_assignment(c, spec.heads.get(g))
            if g in prob.quadratic:  # the exact change of J, not of its linearisation
                params = prob.params_of[g]
                before = prob.objective(perm, params)
                gain = prob.objective(Permutation({**perm, g: new}), params) - before
            else:
                old_val = float(c[rows, perm[g].to(c.device)].sum())
                gain = float(c[rows, new.to(c.device)].sum()) - old_val
            if gain > _TOL:
                perm[g] = new
                prob.invalidate(g)
                objective += gain
                improved = True
        history.append(objective)
        if tick is not None:
            tick()
        if not improved:
            break
    return perm, prob.objective(perm), rounds, history


def weight_matching(
    spec: PermutationSpec,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    *,
    max_iter: int = 100,
    seed: int = 0,
    init: Mapping[str, Tensor] | None = None,
    n_restarts: int = 1,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float64,
    progress: bool = False,
) -> Permutation:
    """Weight matching (Ainsworth, Hayase & Srinivasa, "Git Re-Basin", ICLR 2023).

    Finds the permutation ``pi`` of B's hidden units maximising

        J(pi) = sum_l <W_l^A, P_l W_l^B P_{l-1}^T>

    (summed over every tensor the spec acts on, biases and norm statistics included) by
    coordinate descent: each round visits the groups in a fresh random order; group ``g`` gets
    ``C_g = sum_{(W, axis) in slots(g)} A_(axis) B_(axis)^T``, where ``X_(axis)`` is the tensor with
    that axis moved first, restricted to the slot's positions and flattened to
    ``(units, -1)``, and B has every *other* group's current permutation applied; the Hungarian
    solution of ``max_P <C_g, P>`` (heads-structured for attention groups) replaces ``pi_g`` only if
    it raises ``J`` by more than ``1e-12``. ``J`` is linear in ``P_g`` unless ``g`` acts on two axes
    of one tensor (a square weight inside a residual stream, a weight shared by consecutive
    layers); there ``C_g`` is only a linearisation, and the change of ``J`` is recomputed exactly
    on the group's tensors before the update is accepted (so ``J`` never decreases). Stops after
    a round without improvement or ``max_iter`` rounds. Restarts from random permutations (seeds
    ``seed + r``) keep the best ``J``; restart 0 starts from ``init`` (default: the identity).

    Args:
        spec: the permutation spec of the architecture (e.g. ``mc.infer_spec``).
        state_a: the reference state dict (not modified).
        state_b: the state dict to align (not modified).
        max_iter: maximum rounds per restart.
        seed: seeds the group orders (and the restarts' initial permutations).
        init: warm start for restart 0 (e.g. the previous permutation in STE).
        n_restarts: number of descents; the best objective wins.
        device: where to build the cost matrices (default: the device of ``state_a``).
        dtype: accumulation dtype of the cost matrices (float64 keeps the ``1e-12`` test exact).
        progress: show a progress bar over rounds.

    Returns:
        A :class:`Permutation` mapping B onto A; ``info`` has ``objective`` (the best ``J``),
        ``rounds`` (of the winning descent), ``restarts``, ``restart_objectives``,
        ``objective_init`` (``J`` at its start) and ``history`` (``J`` after each round).

    Example:
        >>> import torch, modeconn as mc
        >>> spec = mc.PermutationSpec.from_axes(
        ...     {"h": 4}, {"0.weight": ("h", None), "0.bias": ("h",), "1.weight": (None, "h")})
        >>> a = {"0.weight": torch.randn(4, 3), "0.bias": torch.randn(4),
        ...      "1.weight": torch.randn(2, 4)}
        >>> p = mc.random_permutation(spec, seed=1)
        >>> found = weight_matching(spec, a, mc.apply_permutation(spec, p, a))
        >>> torch.equal(found["h"], torch.argsort(p["h"]))
        True
    """
    check_compatible([state_a, state_b], ["model A", "model B"])
    spec.check(state_a)
    check_finite(state_a, "model A")
    check_finite(state_b, "model B")
    if max_iter < 1:
        raise SpecError(f"max_iter must be >= 1, got {max_iter}")
    if n_restarts < 1:
        raise SpecError(f"n_restarts must be >= 1, got {n_restarts}")
    if init is not None:
        check_permutation(spec, init)
    if device is None:
        first = next(iter(state_a.values()), None)
        dev = first.device if first is not None else torch.device("cpu")
    else:
        dev = torch.device(device)
    if dev.type == "mps" and dtype == torch.float64:
        dtype = torch.float32  # MPS has no float64
    prob = _Problem(spec, state_a, state_b, dev, dtype)

    best: Permutation | None = None
    best_info: dict[str, object] = {}
    objectives: list[float] = []
    with progress_bar(progress, total=max_iter * n_restarts, description="weight matching") as adv:
        for r in range(n_restarts):
            gen = torch.Generator().manual_seed(seed + r)
            if r == 0:
                start = identity_permutation(spec)
                if init is not None:
                    start.update({g: init[g].long().cpu().clone() for g in spec.groups})
            else:
                start = random_permutation(spec, seed=seed + r)
            perm, obj, rounds, history = _descend(
                prob, start, max_iter=max_iter, gen=gen, tick=lambda: adv(None)
            )
            objectives.append(obj)
            if best is None or obj > best_info["objective"]:  # type: ignore[operator]
                best = perm
                best_info = {
                    "objective": obj,
                    "rounds": rounds,
                    "objective_init": history[0],
                    "history": history,
                }
    assert best is not None
    return Permutation(
        best,
        info={
            "method": "weight",
            **best_info,
            "restarts": n_restarts,
            "restart_objectives": objectives,
        },
    )


def weight_objective(
    spec: PermutationSpec,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    perm: Mapping[str, Tensor] | None = None,
) -> float:
    """``J(pi) = sum <W^A, pi(W^B)>`` over the tensors the spec acts on (float64).

    Args:
        spec: the permutation spec.
        state_a: reference state.
        state_b: state to permute.
        perm: permutation of B (default: identity).

    Returns:
        The weight-matching objective.

    Example:
        >>> import torch, modeconn as mc
        >>> spec = mc.PermutationSpec.from_axes({"h": 2}, {"w": ("h", None)})
        >>> weight_objective(spec, {"w": torch.eye(2)}, {"w": torch.eye(2)})
        2.0
    """
    perm = identity_permutation(spec) if perm is None else perm
    dev = next(iter(state_a.values())).device if state_a else torch.device("cpu")
    return _Problem(spec, state_a, state_b, dev, torch.float64).objective(perm)
