"""Permutation specs: which hidden units of a network can be reordered, and applying a reordering.

A :class:`PermutationSpec` is the one source of truth every alignment, curve and merge method
works from. It names *groups* (index sets of hidden units that must be permuted together) and,
for each group, the *slots* where its units live: an axis of a tensor in the state dict, with an
offset (concatenation, fused q/k/v projections), a block (Conv -> Flatten -> Linear: each channel
owns ``H*W`` consecutive input columns) and repeats (channel-last flatten). It may also name
*sites*: tensors of the forward pass that carry the group's units, where activation matching
measures them; and *heads*: attention structure, under which a permutation must move whole heads
and may only reorder dimensions inside a head.

Conventions (git re-basin's): a permutation ``p`` of a group maps B onto A, ``p[i]`` is the unit
of B that goes to position ``i``; applying it gathers ``W'[pos(i)] = W[pos(p[i])]`` on every slot.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from .errors import SpecError
from .heads import Heads, assemble, decompose, random_moves

State = dict[str, Tensor]


@dataclass(frozen=True)
class Slot:
    """Where some of a group's units live on one axis of one state-dict tensor.

    Unit ``u`` (``unit_start <= u < unit_start + length``) owns the positions
    ``offset + k * length * block + (u - unit_start) * block + r``
    for ``k < repeats`` and ``r < block``. With ``chunk``, the units come in runs of ``chunk``
    spaced ``period`` positions apart (one part of each head of a fused per-head tensor):
    ``i = u - unit_start`` owns ``offset + (i // chunk) * period + (i % chunk) * block + r``.

    Args:
        param: state-dict key (parameter or buffer).
        axis: the tensor axis (non-negative).
        offset: first position on the axis (a slice of a concatenated or fused tensor).
        block: consecutive positions each unit owns (Conv -> Flatten -> Linear: ``H*W``).
        repeats: how many times the ``length*block`` pattern repeats (channel-last flatten).
        unit_start: first unit of the group carried here.
        length: number of units carried (``None``: the rest of the group).
        chunk: units per run (``None``: one run); needs ``repeats == 1``.
        period: positions from one run's start to the next's.
    """

    param: str
    axis: int
    offset: int = 0
    block: int = 1
    repeats: int = 1
    unit_start: int = 0
    length: int | None = None
    chunk: int | None = None
    period: int = 0

    def n_units(self, group_size: int) -> int:
        return group_size - self.unit_start if self.length is None else self.length

    def positions(self, group_size: int) -> Tensor:
        """Axis positions owned by each carried unit, shape ``(n_units, repeats * block)``."""
        n = self.n_units(group_size)
        i = torch.arange(n)
        if self.chunk:
            i = (i // self.chunk) * self.period + (i % self.chunk) * self.block
        else:
            i = i * self.block
        u = i.view(n, 1, 1)
        k = torch.arange(self.repeats).view(1, self.repeats, 1) * (n * self.block)
        r = torch.arange(self.block).view(1, 1, self.block)
        return (self.offset + u + k + r).reshape(n, self.repeats * self.block)

    def extent(self, group_size: int) -> int:
        """One past the last position this slot touches."""
        n = self.n_units(group_size)
        if self.chunk and n:
            return int(self.positions(group_size).max()) + 1
        return self.offset + n * self.block * self.repeats


@dataclass(frozen=True)
class Site:
    """A tensor of the forward pass whose axis carries (some of) a group's units.

    Activation matching measures the group's units here. ``node`` is the name of a node in
    modeconn's ``torch.fx`` trace of the model, or ``"module:<path>"`` for the output of a
    submodule (captured with a forward hook; for models that cannot be traced).

    Args:
        node: fx node name or ``"module:<dotted.path>"``.
        axis: axis of that tensor carrying the units (``1`` for NCHW maps, ``-1`` for tokens).
        offset: first position on the axis (a slice of a fused q/k/v output).
        unit_start: first group unit carried.
        length: number of units carried (``None``: the rest of the group).
    """

    node: str
    axis: int
    offset: int = 0
    unit_start: int = 0
    length: int | None = None


@dataclass
class PermutationSpec:
    """The permutation symmetry of a network.

    Args:
        groups: ``{group name: number of units}``.
        slots: ``{group name: slots where its units live}``.
        sites: ``{group name: forward-pass tensors carrying its units}`` (for activation matching).
        heads: ``{group name: Heads}`` for attention groups.

    Example:
        >>> spec = PermutationSpec(
        ...     groups={"h": 3},
        ...     slots={"h": (Slot("0.weight", 0), Slot("0.bias", 0), Slot("2.weight", 1))},
        ... )
        >>> sorted(spec.params())
        ['0.bias', '0.weight', '2.weight']
    """

    groups: dict[str, int]
    slots: dict[str, tuple[Slot, ...]]
    sites: dict[str, tuple[Site, ...]] = field(default_factory=dict)
    heads: dict[str, Heads] = field(default_factory=dict)
    # --- pin reasons (symmetry-core): {param: {axis: why no group permutes it}} -------------
    pins: dict[str, dict[int, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.slots = {g: tuple(s) for g, s in self.slots.items()}
        self.sites = {g: tuple(s) for g, s in self.sites.items()}
        for name in (*self.slots, *self.sites, *self.heads):
            if name not in self.groups:
                raise SpecError(f"spec names group {name!r} that is not in spec.groups")
        for g, size in self.groups.items():
            if size < 1:
                raise SpecError(f"group {g!r} has size {size}; sizes must be >= 1")
            for s in self.slots.get(g, ()):
                if s.unit_start < 0 or s.unit_start + s.n_units(size) > size:
                    raise SpecError(f"slot {s} of group {g!r} carries units outside 0..{size - 1}")
                if s.chunk is not None and (s.chunk < 1 or s.repeats != 1):
                    raise SpecError(f"slot {s} of group {g!r}: chunk needs chunk >= 1, repeats=1")
        for g, h in self.heads.items():
            if h.extent() > self.groups[g]:
                raise SpecError(f"heads of {g!r} cover {h.extent()} units; the group has fewer")
            ranges = sorted(h.unit_ranges())
            if any(b[0] < a[1] for a, b in zip(ranges, ranges[1:], strict=False)):
                raise SpecError(f"heads segments of {g!r} overlap")

    # --- queries ---------------------------------------------------------------------------
    def params(self) -> set[str]:
        """Names of every state-dict tensor some group acts on."""
        return {s.param for slots in self.slots.values() for s in slots}

    def slots_of(self, param: str) -> list[tuple[str, Slot]]:
        """``(group, slot)`` pairs acting on one tensor."""
        return [(g, s) for g, slots in self.slots.items() for s in slots if s.param == param]

    def check(self, state: Mapping[str, Tensor]) -> None:
        """Raise :class:`SpecError` unless every slot fits ``state`` and no two groups overlap.

        Args:
            state: a state dict of the model this spec describes.
        """
        claimed: dict[tuple[str, int], Tensor] = {}
        for g, slots in self.slots.items():
            size = self.groups[g]
            for s in slots:
                if s.param not in state:
                    raise SpecError(
                        f"spec group {g!r} names tensor {s.param!r}, which the state lacks; "
                        "was the spec made for another model?"
                    )
                t = state[s.param]
                if not 0 <= s.axis < t.dim():
                    raise SpecError(
                        f"{s.param!r} has {t.dim()} axes; spec group {g!r} uses axis {s.axis}"
                    )
                if s.extent(size) > t.shape[s.axis]:
                    raise SpecError(
                        f"spec group {g!r} (size {size}) needs {s.extent(size)} positions on axis "
                        f"{s.axis} of {s.param!r}, which has {t.shape[s.axis]}"
                    )
                key = (s.param, s.axis)
                mask = claimed.setdefault(key, torch.zeros(t.shape[s.axis], dtype=torch.bool))
                pos = s.positions(size).flatten()
                if mask[pos].any():
                    raise SpecError(
                        f"two slots overlap on axis {s.axis} of {s.param!r} (group {g!r})"
                    )
                mask[pos] = True

    # --- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (see :meth:`from_dict`)."""
        return {
            "groups": dict(self.groups),
            "slots": {g: [_compact(asdict(s)) for s in ss] for g, ss in self.slots.items()},
            "sites": {g: [_compact(asdict(s)) for s in ss] for g, ss in self.sites.items()},
            "heads": {g: h.to_dict() for g, h in self.heads.items()},
            **({"pins": {p: {str(a): w for a, w in ax.items()} for p, ax in self.pins.items()}}
               if self.pins else {}),  # fmt: skip
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PermutationSpec:
        """Inverse of :meth:`to_dict`.

        Example:
            >>> d = {"groups": {"h": 2}, "slots": {"h": [{"param": "w", "axis": 0}]}}
            >>> PermutationSpec.from_dict(d).groups
            {'h': 2}
        """
        try:
            return cls(
                groups={str(k): int(v) for k, v in d["groups"].items()},
                slots={g: tuple(Slot(**s) for s in ss) for g, ss in d.get("slots", {}).items()},
                sites={g: tuple(Site(**s) for s in ss) for g, ss in d.get("sites", {}).items()},
                heads={g: Heads.from_dict(h) for g, h in d.get("heads", {}).items()},
                pins={
                    p: {int(a): str(why) for a, why in ax.items()}
                    for p, ax in d.get("pins", {}).items()
                },
            )
        except (KeyError, TypeError, ValueError) as e:
            raise SpecError(f"malformed permutation spec: {e}") from e

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> PermutationSpec:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise SpecError(f"permutation spec is not valid JSON: {e}") from e

    @classmethod
    def from_axes(
        cls, groups: Mapping[str, int], axes: Mapping[str, Iterable[str | None]]
    ) -> PermutationSpec:
        """Build a spec the way git re-basin writes one by hand: parameter -> group per axis.

        Args:
            groups: ``{group: size}``.
            axes: ``{param: (group or None for each axis)}``.

        Example:
            >>> spec = PermutationSpec.from_axes(
            ...     {"h": 4}, {"0.weight": ("h", None), "0.bias": ("h",), "2.weight": (None, "h")}
            ... )
            >>> len(spec.slots["h"])
            3
        """
        slots: dict[str, list[Slot]] = {g: [] for g in groups}
        for param, per_axis in axes.items():
            for axis, g in enumerate(per_axis):
                if g is None:
                    continue
                if g not in groups:
                    raise SpecError(f"{param!r} axis {axis} names unknown group {g!r}")
                slots[g].append(Slot(param, axis))
        return cls(groups=dict(groups), slots={g: tuple(s) for g, s in slots.items()})

    # --- display ---------------------------------------------------------------------------
    def table(self) -> Any:
        """A ``rich.table.Table``: each group, its size and the tensors it acts on; then every
        pinned tensor axis of an inferred spec and what pinned it (``spec.pins``)."""
        from rich.table import Table

        tab = Table(
            title=f"Permutation spec: {len(self.groups)} groups, {sum(self.groups.values())} units"
        )
        tab.add_column("group")
        tab.add_column("size", justify="right")
        tab.add_column("acts on")
        for g, size in self.groups.items():
            parts = []
            for s in self.slots.get(g, ()):
                extra = "".join(
                    f" {k}={v}"
                    for k, v in (("offset", s.offset), ("block", s.block), ("repeats", s.repeats))
                    if v != (0 if k == "offset" else 1)
                )
                parts.append(f"{s.param}[{s.axis}]{extra}")
            label = g + (f" ({self.heads[g].describe()})" if g in self.heads else "")
            tab.add_row(label, str(size), ", ".join(parts))
        for param, axes in self.pins.items():  # pin reasons (symmetry-core)
            for axis, why in sorted(axes.items()):
                tab.add_row("[dim]pinned[/dim]", "", f"{param}[{axis}]: {why}")
        return tab

    def __rich__(self) -> Any:
        """Shown as :meth:`table` by ``rich.print`` and rich consoles."""
        return self.table()

    def __str__(self) -> str:
        lines = [f"PermutationSpec({len(self.groups)} groups)"]
        for g, size in self.groups.items():
            ps = ", ".join(f"{s.param}[{s.axis}]" for s in self.slots.get(g, ()))
            lines.append(f"  {g} ({size}): {ps}")
        return "\n".join(lines)


def _compact(d: dict[str, Any]) -> dict[str, Any]:
    defaults = {"offset": 0, "block": 1, "repeats": 1, "unit_start": 0, "length": None}
    defaults.update(chunk=None, period=0)
    return {k: v for k, v in d.items() if k not in defaults or defaults[k] != v}


class Permutation(dict[str, Tensor]):  # with a .info side channel
    """``{group name: LongTensor}``; ``p[g][i]`` is the unit of B placed at position ``i``.

    ``info`` carries what the method that produced it measured (objective, iterations, ...).
    """

    def __init__(self, *args: Any, info: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.info: dict[str, Any] = dict(info or {})


def identity_permutation(spec: PermutationSpec) -> Permutation:
    """The permutation that changes nothing.

    Example:
        >>> identity_permutation(PermutationSpec({"h": 3}, {}))["h"].tolist()
        [0, 1, 2]
    """
    return Permutation({g: torch.arange(n) for g, n in spec.groups.items()})


def unit_classes(spec: PermutationSpec, group: str) -> Tensor | None:
    """Which units of ``group`` a valid permutation may exchange: one label per unit.

    A slot carrying only units ``[unit_start, unit_start + length)`` (a slice of a concatenated or
    fused tensor) keeps its units in that range, so two units may swap only if every such slot
    carries both or neither. ``None`` when all slots carry the whole group.

    Example:
        >>> spec = PermutationSpec({"h": 4}, {"h": (Slot("w", 0, length=2), Slot("v", 0))})
        >>> unit_classes(spec, "h").tolist()
        [1, 1, 0, 0]
    """
    size = spec.groups[group]
    partial = [s for s in spec.slots.get(group, ()) if s.unit_start != 0 or s.n_units(size) != size]
    if not partial:
        return None
    sig = torch.zeros(size, len(partial), dtype=torch.long)
    for k, s in enumerate(partial):
        sig[s.unit_start : s.unit_start + s.n_units(size), k] = 1
    return torch.unique(sig, dim=0, return_inverse=True)[1]


def random_permutation(spec: PermutationSpec, seed: int = 0) -> Permutation:
    """A uniformly random valid permutation (heads-structured where the spec says so; units
    stay inside the ranges of slots that carry part of a group, see :func:`unit_classes`).

    Args:
        spec: the permutation spec.
        seed: seed of a private ``torch.Generator`` (global RNG untouched).

    Returns:
        A :class:`Permutation`.

    Example:
        >>> p = random_permutation(PermutationSpec({"h": 4}, {}), seed=1)
        >>> sorted(p["h"].tolist())
        [0, 1, 2, 3]
    """
    gen = torch.Generator().manual_seed(seed)
    out = Permutation()
    for g, n in spec.groups.items():
        labels = None if g in spec.heads else unit_classes(spec, g)
        if g in spec.heads:
            out[g] = assemble(spec.heads[g], random_moves(spec.heads[g], gen), n)
        elif labels is None:
            out[g] = torch.randperm(n, generator=gen)
        else:
            p = torch.arange(n)
            for c in range(int(labels.max()) + 1):
                idx = torch.nonzero(labels == c).flatten()
                p[idx] = idx[torch.randperm(len(idx), generator=gen)]
            out[g] = p
    return out


def inverse_permutation(perm: Mapping[str, Tensor]) -> Permutation:
    """The permutation that undoes ``perm``: ``apply(inverse(p), apply(p, s)) == s``.

    Example:
        >>> inverse_permutation({"h": torch.tensor([2, 0, 1])})["h"].tolist()
        [1, 2, 0]
    """
    return Permutation({g: torch.argsort(p) for g, p in perm.items()})


def compose_permutations(first: Mapping[str, Tensor], then: Mapping[str, Tensor]) -> Permutation:
    """The permutation equal to applying ``first`` and then ``then``.

    ``apply(compose(p, q), s) == apply(q, apply(p, s))``; per group ``p[q]``.

    Example:
        >>> p, q = {"h": torch.tensor([1, 2, 0])}, {"h": torch.tensor([2, 0, 1])}
        >>> compose_permutations(p, q)["h"].tolist()
        [0, 1, 2]
    """
    return Permutation({g: first[g][then[g]] for g in first})


def check_permutation(spec: PermutationSpec, perm: Mapping[str, Tensor]) -> None:
    """Raise :class:`SpecError` unless ``perm`` is a valid permutation for ``spec``."""
    for g, n in spec.groups.items():
        if g not in perm:
            raise SpecError(f"permutation has no entry for group {g!r}")
        p = perm[g]
        if p.shape != (n,) or not torch.equal(torch.sort(p.long()).values, torch.arange(n)):
            raise SpecError(f"permutation of group {g!r} is not a permutation of 0..{n - 1}")
        labels = unit_classes(spec, g)
        if labels is not None and not torch.equal(labels[p.long().cpu()], labels):
            raise SpecError(
                f"permutation of group {g!r} moves units out of the range of a slot that "
                "carries part of the group"
            )
        if g in spec.heads:
            try:
                decompose(spec.heads[g], p)
            except SpecError as e:
                raise SpecError(f"attention group {g!r}: {e}") from None


def apply_permutation(
    spec: PermutationSpec, perm: Mapping[str, Tensor], state: Mapping[str, Tensor]
) -> State:
    """Reorder the hidden units of ``state`` by ``perm`` (pure: ``state`` is not modified).

    Every slot of every group is gathered, ``W'[pos(i)] = W[pos(p[i])]``; tensors the spec does not
    touch are returned as they are (same objects). One ``index_select`` per (tensor, axis).

    Args:
        spec: the permutation spec.
        perm: ``{group: LongTensor}``, e.g. from :func:`random_permutation` or an alignment method.
        state: a state dict (parameters and buffers).

    Returns:
        A new state dict computing the same function (when ``spec`` is the model's symmetry).

    Example:
        >>> spec = PermutationSpec.from_axes({"h": 2}, {"w": ("h", None)})
        >>> apply_permutation(spec, {"h": torch.tensor([1, 0])}, {"w": torch.eye(2)})["w"].tolist()
        [[0.0, 1.0], [1.0, 0.0]]
    """
    index = _gather_indices(spec, perm, state)
    out: State = dict(state)
    for (param, axis), idx in index.items():
        t = out[param]  # chain: a tensor may be permuted on several axes
        out[param] = t.index_select(axis, idx.to(t.device))
    return out


def _gather_indices(
    spec: PermutationSpec, perm: Mapping[str, Tensor], state: Mapping[str, Tensor]
) -> dict[tuple[str, int], Tensor]:
    index: dict[tuple[str, int], Tensor] = {}
    for g, slots in spec.slots.items():
        size = spec.groups[g]
        if g not in perm:
            raise SpecError(f"permutation has no entry for group {g!r}")
        p = perm[g].long().cpu()
        if p.shape != (size,):
            raise SpecError(
                f"permutation of group {g!r} has shape {tuple(p.shape)}, expected ({size},)"
            )
        for s in slots:
            if s.param not in state:
                raise SpecError(
                    f"spec group {g!r} names tensor {s.param!r}, which the state does not have"
                )
            n_axis = state[s.param].shape[s.axis]
            idx = index.setdefault((s.param, s.axis), torch.arange(n_axis))
            pos = s.positions(size)  # (n_units, k)
            lo, n = s.unit_start, pos.shape[0]
            src_units = p[lo : lo + n] - lo
            if (src_units < 0).any() or (src_units >= n).any():
                raise SpecError(f"permutation of group {g!r} moves units across slot {s}")
            idx[pos.flatten()] = pos[src_units].flatten()
    return index
