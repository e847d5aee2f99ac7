"""Per-tensor merge methods: one plan drives both the in-memory merge and the streaming one.

A data-free method whose output tensor ``k`` depends only on the inputs' tensor ``k`` (after
optional model-wide pre-passes, which also read tensor by tensor) subclasses
:class:`TensorwiseMerge` and returns a :class:`TensorPlan` from :meth:`TensorwiseMerge.plan`.
:func:`iter_merged` runs the plan over state dicts or lazily read files, yielding the output tensor
by tensor (row block by row block for elementwise plans), so ``mc.merge`` and
``mc.merge_files`` execute the same arithmetic and agree bitwise.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..lazy import read_rows, row_blocks, tensor_meta
from .base import MergeInputs, MergeMethod, State, is_statistic, weighted_mean

Rows = tuple[int, int] | None


@dataclass
class TensorPlan:
    """How a per-tensor method merges.

    Attributes:
        fn: ``fn(key, tensors, rows) -> Tensor``: the merged floating tensor ``key`` from the N
            inputs' tensor ``key``; with ``elementwise`` it is called once per row block, with
            ``rows = (start, stop)`` and the inputs' rows ``start:stop`` (``rows=None``: whole
            tensors). Any dtype; the result is cast to the input's dtype.
        statistic_weights: weights of the BatchNorm running statistics' mean.
        elementwise: ``fn`` treats entries independently (given its pre-pass results), so it
            may see row blocks; memory then holds N blocks, never N whole tensors.
    """

    fn: Callable[[str, list[Tensor], Rows], Tensor]
    statistic_weights: list[float]
    elementwise: bool = False


class TensorwiseMerge(MergeMethod):
    """Base class of the per-tensor (data-free) methods: implement :meth:`plan`, get ``run`` and
    streaming (``mc.merge_files``) for free. ``per_tensor`` is True.
    """

    per_tensor = True

    @abstractmethod
    def plan(self, states: Sequence[Mapping[str, Tensor]], params: object,
             inputs: MergeInputs) -> TensorPlan:
        """The merge of ``states`` as a :class:`TensorPlan`. Model-wide pre-passes read the
        states only through ``read_rows``/``row_blocks`` (states may be lazy files)."""

    def run(self, states: Sequence[Mapping[str, Tensor]], params: object,
            inputs: MergeInputs) -> State:
        return collect(iter_merged(states, self.plan(states, params, inputs)))


def iter_merged(
    states: Sequence[Mapping[str, Tensor]],
    plan: TensorPlan,
    on_read: Callable[[str, list[Tensor]], None] | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """Run ``plan`` over ``states``: ``(key, tensor or its next row block)`` in key order.

    Non-floating tensors (step counters) come from the first model; BatchNorm running statistics
    are the mean weighted by ``plan.statistic_weights``; every other tensor is ``plan.fn``'s.

    Args:
        states: the inputs (dicts or :class:`~modeconn._src.lazy.LazyState`).
        plan: the method's plan.
        on_read: called with every list of input tensors (blocks) read, e.g. a finiteness check.

    Returns:
        An iterator of ``(name, tensor)`` pairs; a name repeats for consecutive row blocks.
    """
    first = states[0]
    for k in first:
        shape, dt = tensor_meta(first, k)
        if not dt.is_floating_point:
            yield k, first[k].clone()
        elif is_statistic(k) or not plan.elementwise:
            ts = [s[k] for s in states]
            if on_read is not None:
                on_read(k, ts)
            if is_statistic(k):
                yield k, weighted_mean(ts, plan.statistic_weights).to(dt)
            else:
                yield k, plan.fn(k, ts, None).to(dt)
            del ts
        else:
            for lo, hi in row_blocks(shape):
                ts = [read_rows(s, k, lo, hi) for s in states]
                if on_read is not None:
                    on_read(k, ts)
                yield k, plan.fn(k, ts, (lo, hi)).to(dt)
                del ts


def collect(chunks: Iterable[tuple[str, Tensor]]) -> State:
    """Assemble :func:`iter_merged`'s output into a state dict (row blocks concatenated)."""
    parts: dict[str, list[Tensor]] = {}
    for k, t in chunks:
        parts.setdefault(k, []).append(t)
    return {k: ts[0] if len(ts) == 1 else torch.cat(ts) for k, ts in parts.items()}


def blocks_of(state: Mapping[str, Tensor], key: str) -> Iterator[tuple[tuple[int, int], Tensor]]:
    """``((start, stop), rows)`` of ``state[key]`` in the row blocks :func:`iter_merged` uses."""
    shape, _ = tensor_meta(state, key)
    for lo, hi in row_blocks(shape):
        yield (lo, hi), read_rows(state, key, lo, hi)


def kth_smallest_abs(blocks: Callable[[], Iterable[Tensor]], rank: int,
                     dtype: torch.dtype) -> Tensor:
    """The ``rank``-th smallest ``|x|`` (1-based) over all entries of all blocks, exactly.

    A streaming selection: non-negative floats order like their bit patterns read as integers,
    so a radix select over those patterns, 16 bits per pass (2 passes over the data for
    float32, 4 for float64), each pass a histogram of one 16-bit digit among the entries that
    match the digits found so far, finds the exact value without concatenating anything.
    Computed in ``dtype`` (float64, else float32). Equals
    ``torch.cat([b.abs().flatten() for b in blocks()]).kthvalue(rank)``.

    Args:
        blocks: a function returning a fresh iterable of the tensors (called once per pass).
        rank: 1 to the total number of entries.
        dtype: ``torch.float32`` or ``torch.float64``.

    Returns:
        A 0-d tensor of ``dtype``.

    Example:
        >>> kth_smallest_abs(lambda: [torch.tensor([3.0, -1.0]), torch.tensor([-2.0])], 2,
        ...                  torch.float32).item()
        2.0
    """
    int_dt, nbits = (torch.int64, 64) if dtype == torch.float64 else (torch.int32, 32)
    prefix = 0
    for p in range(nbits // 16):
        shift = nbits - 16 * (p + 1)
        hist = torch.zeros(1 << 16, dtype=torch.int64)
        for x in blocks():
            bits = x.to(dtype).abs().reshape(-1).view(int_dt)
            if p > 0:
                bits = bits[(bits >> (shift + 16)) == prefix]
            digit = (bits >> shift) & 0xFFFF if shift else bits & 0xFFFF
            hist += torch.bincount(digit, minlength=1 << 16).cpu()
        cum = hist.cumsum(0)
        if rank < 1 or rank > int(cum[-1]):
            raise ValueError(f"rank {rank} outside 1..{int(cum[-1])}")
        d = int(torch.searchsorted(cum, torch.tensor(rank)))
        rank -= int(cum[d - 1]) if d > 0 else 0
        prefix = (prefix << 16) | d
    return torch.tensor(prefix, dtype=int_dt).view(dtype)
