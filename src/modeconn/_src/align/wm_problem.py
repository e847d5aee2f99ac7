"""The weight-matching objective over state-dict slots: cost matrices in bounded memory.

Nothing here copies a state: every tensor is read in chunks of at most ``CHUNK`` elements,
gathered by the other groups' permutations, converted to the compute dtype (float64 by default,
so bf16/fp16 states stay in their dtype) and reduced at once into a ``(units, units)`` matrix.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..spec import PermutationSpec, Slot, unit_classes

CHUNK = 1 << 21  # elements of one tensor gathered and converted at a time (at most)


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
class Term:
    """One (tensor, axis) slot of a group."""

    param: str
    axis: int
    lo: int  # first unit carried
    n: int  # units carried
    pos: Tensor | None  # (n * repeats * block,) axis positions, unit-major; None: the whole axis
    others: frozenset[str]  # groups acting on the tensor's other axes
    numel: int


def _dense(x: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``x`` on ``device`` in ``dtype``, contiguous in its current axis order (one copy)."""
    return x.to(device, dtype, memory_format=torch.contiguous_format)


class Problem:
    """Precomputed structure of ``J(pi) = sum_params <W_A, pi(W_B)>`` for one pair of states.

    ``J`` is linear in each group's permutation matrix once the other groups are fixed; the
    coefficient matrix of group ``g`` is ``C_g = sum_{slots} A_s @ B_s^T`` where ``B_s`` has every
    permutation on the tensor's *other* axes applied (per chunk ``index_select``).
    """

    def __init__(
        self,
        spec: PermutationSpec,
        state_a: Mapping[str, Tensor],
        state_b: Mapping[str, Tensor],
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.spec, self.device, self.dtype = spec, device, dtype
        self.a = {p: state_a[p] for p in spec.params()}  # references, never copies
        self.b = {p: state_b[p] for p in spec.params()}
        self.chunk = (
            CHUNK  # ~20 bytes of transient memory per element: B gathered, A and B converted
        )
        self.on_axis: dict[tuple[str, int], list[tuple[str, Slot]]] = {}
        for g, slots in spec.slots.items():
            for s in slots:
                self.on_axis.setdefault((s.param, s.axis), []).append((g, s))
        self.axes_of: dict[str, list[int]] = {}
        for param, axis in self.on_axis:
            self.axes_of.setdefault(param, []).append(axis)
        self.keys_of: dict[str, set[tuple[str, int]]] = {g: set() for g in spec.groups}
        for key, pairs in self.on_axis.items():
            for g, _ in pairs:
                self.keys_of[g].add(key)
        self.terms: dict[str, list[Term]] = {}
        for g, slots in spec.slots.items():
            terms = []
            for s in slots:
                t = self.a[s.param]
                pos = s.positions(spec.groups[g]).flatten()
                whole = pos.numel() == t.shape[s.axis] and torch.equal(pos, torch.arange(len(pos)))
                others = frozenset(
                    h
                    for ax in self.axes_of[s.param]
                    if ax != s.axis
                    for h, _ in self.on_axis[(s.param, ax)]
                )
                n = s.n_units(spec.groups[g])
                pos_dev = None if whole else pos.to(t.device)
                terms.append(Term(s.param, s.axis, s.unit_start, n, pos_dev, others, t.numel()))
            if terms:
                self.terms[g] = terms
        self.masks = {g: block_mask(spec, g) for g in self.terms}
        # groups acting on two axes of one tensor (a square weight inside a residual stream,
        # a weight shared by consecutive layers): J is quadratic in them, C_g only linearises it
        self.params_of = {
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
        """Forget the gather indices that depend on ``group`` (after its permutation changed)."""
        for key in self.keys_of[group]:
            self._index.pop(key, None)

    def index(self, key: tuple[str, int], perm: Mapping[str, Tensor]) -> Tensor:
        """Gather index of B's axis ``key = (param, axis)`` under ``perm`` (cached)."""
        if perm is not self._index_for:  # another permutation: the cache does not apply
            self._index.clear()
            self._index_for = perm
        idx = self._index.get(key)
        if idx is None:
            param, axis = key
            idx = torch.arange(self.b[param].shape[axis])
            for g, s in self.on_axis[key]:
                pos = s.positions(self.spec.groups[g])
                lo, n = s.unit_start, pos.shape[0]
                idx[pos.flatten()] = pos[perm[g][lo : lo + n].cpu() - lo].flatten()
            idx = idx.to(self.b[param].device)
            self._index[key] = idx
        return idx

    def blocks(
        self,
        param: str,
        axis: int,
        pos: Tensor | None,
        perm: Mapping[str, Tensor],
        *,
        own: bool = False,
        unknown: Collection[str] = (),
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Chunks ``(A, pi(B))`` of one tensor, rows = positions ``pos`` of ``axis``, flattened.

        B is gathered on every permuted axis but ``axis`` (and on ``axis`` too when ``own``).
        Axes carrying a group in ``unknown`` are flattened last and sorted in both A and B: the
        best any per-row rearrangement of them could score (the relaxation of
        :func:`matched_start`). Each chunk is ``(len(pos), -1)`` in the compute dtype.
        """
        a, b = self.a[param], self.b[param]
        axes = self.axes_of.get(param, [])
        unk = sorted(
            ax
            for ax in axes
            if ax != axis and any(g in unknown for g, _ in self.on_axis[(param, ax)])
        )
        gather = [ax for ax in axes if (own or ax != axis) and ax not in unk]
        known = [ax for ax in range(a.dim()) if ax != axis and ax not in unk]
        chunk_ax = max(known, key=lambda ax: a.shape[ax], default=None)
        step = a.shape[chunk_ax] if chunk_ax is not None else 1
        if chunk_ax is not None and a.numel() > self.chunk:
            step = max(1, self.chunk * a.shape[chunk_ax] // a.numel())
        starts = range(0, a.shape[chunk_ax], step) if chunk_ax is not None else [0]
        for i in starts:
            ac, bc = a, b
            if chunk_ax is not None and step < a.shape[chunk_ax]:
                k = min(step, a.shape[chunk_ax] - i)
                ac = a.narrow(chunk_ax, i, k)
                if chunk_ax in gather:
                    bc = b.index_select(chunk_ax, self.index((param, chunk_ax), perm)[i : i + k])
                else:
                    bc = b.narrow(chunk_ax, i, k)
            elif chunk_ax in gather:
                bc = b.index_select(chunk_ax, self.index((param, chunk_ax), perm))
            for ax in gather:
                if ax != chunk_ax:
                    bc = bc.index_select(ax, self.index((param, ax), perm))
            if pos is not None:
                ac, bc = ac.index_select(axis, pos), bc.index_select(axis, pos)
            order = list(range(ac.dim())) if own else [axis, *known, *unk]
            rows = 1 if own else ac.shape[axis]
            # one copy each: reordered, contiguous and in the compute dtype at once
            ac = _dense(ac.permute(order), self.device, self.dtype)
            bc = _dense(bc.permute(order), self.device, self.dtype)
            if unk:  # rows x known x (unknown axes flattened), each run sorted
                ac = ac.reshape(rows, -1, math.prod(ac.shape[-len(unk) :])).sort(-1).values
                bc = bc.reshape(rows, -1, math.prod(bc.shape[-len(unk) :])).sort(-1).values
            yield ac.reshape(rows, -1), bc.reshape(rows, -1)
            del ac, bc

    # -- objective -------------------------------------------------------------------------
    def cost(self, g: str, perm: Mapping[str, Tensor], unknown: Collection[str] = ()) -> Tensor:
        """``C_g[i, j]``: gain of putting B's unit ``j`` at A's unit ``i`` (others fixed).

        With ``unknown``, the axes of those groups are relaxed (see :meth:`blocks`).
        """
        size = self.spec.groups[g]
        c = torch.zeros(size, size, dtype=self.dtype, device=self.device)
        for t in self.terms[g]:
            blk = c[t.lo : t.lo + t.n, t.lo : t.lo + t.n]
            for am, bm in self.blocks(t.param, t.axis, t.pos, perm, unknown=unknown):
                blk.addmm_(am.reshape(t.n, -1), bm.reshape(t.n, -1).T)
        return masked(c, self.masks[g])

    def objective(self, perm: Mapping[str, Tensor], params: Iterable[str] | None = None) -> float:
        """``sum over the spec's tensors (or ``params``) of <W_A, pi(W_B)>``."""
        total = 0.0
        for param in self.a if params is None else params:
            axis = self.axes_of[param][0]
            for am, bm in self.blocks(param, axis, None, perm, own=True):
                total += float(torch.vdot(am[0], bm[0]))
        return total

    def known_share(self, g: str, unknown: Collection[str]) -> float:
        """Share of ``g``'s slot elements with no ``unknown`` group on another axis."""
        total = sum(t.numel for t in self.terms[g])
        known = sum(t.numel for t in self.terms[g] if not t.others & set(unknown))
        return known / max(total, 1)
