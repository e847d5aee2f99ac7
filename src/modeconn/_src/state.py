"""Pure helpers over state dicts: compatibility checks and weighted combinations."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .errors import IncompatibleModelsError

State = dict[str, Tensor]


def check_compatible(
    states: Sequence[Mapping[str, Tensor]], names: Sequence[str] | None = None
) -> None:
    """Raise :class:`IncompatibleModelsError` naming the first tensor where the states differ.

    Args:
        states: two or more state dicts that should share one architecture.
        names: labels for the error message (default ``model 0``, ``model 1``, ...).

    Example:
        >>> check_compatible([{"w": torch.zeros(2)}, {"w": torch.ones(2)}])
    """
    names = list(names) if names is not None else [f"model {i}" for i in range(len(states))]
    ref = states[0]
    for other, name in zip(states[1:], names[1:], strict=True):
        missing = [k for k in ref if k not in other]
        extra = [k for k in other if k not in ref]
        if missing or extra:
            k = (missing or extra)[0]
            where = name if missing else names[0]
            raise IncompatibleModelsError(
                f"{where} has no tensor {k!r} ({len(missing)} missing, {len(extra)} extra): "
                "the models do not share one architecture"
            )
        for k, t in ref.items():
            u = other[k]
            if t.shape != u.shape:
                raise IncompatibleModelsError(
                    f"tensor {k!r} has shape {tuple(t.shape)} in {names[0]} but "
                    f"{tuple(u.shape)} in {name}: the models do not share one architecture"
                )
            if t.dtype != u.dtype:
                raise IncompatibleModelsError(
                    f"tensor {k!r} has dtype {t.dtype} in {names[0]} but {u.dtype} in {name}"
                )


def check_finite(state: Mapping[str, Tensor], name: str = "state") -> None:
    """Raise :class:`IncompatibleModelsError` if a floating tensor holds NaN or inf."""
    for k, t in state.items():
        # a finite sum means finite entries (NaN and inf propagate): no tensor-sized temporary
        # unless the sum overflows or is not finite, then the exact test
        if t.is_floating_point() and not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
            raise IncompatibleModelsError(f"{name} has NaN or inf in {k!r}; refusing to use it")


def combine(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> State:
    """``sum_i w_i * state_i`` on floating tensors: the one interpolation of states.

    Every weighted sum of states goes through here: linear paths and curves (``θ(t) =
    Σ c_i(t) θ_i``), :func:`lerp`, plane and slice grids, averages. Terms with weight 0 are
    skipped and a lone weight of 1 copies its state, so endpoints are reproduced bit for bit.
    Two weights summing to 1 use ``torch.lerp`` (one pass, exact at both ends); otherwise the sum
    accumulates in float32 (float64 for float64 tensors) and is cast back, one tensor at a time.
    Differentiable. Other tensors (step counters) come from state 0.

    Args:
        states: state dicts of one architecture.
        weights: one coefficient per state (need not sum to 1).

    Returns:
        A new state dict; dtypes are preserved.

    Example:
        >>> combine([{"w": torch.ones(2)}, {"w": torch.zeros(2)}], [0.25, 0.75])["w"].tolist()
        [0.25, 0.25]
    """
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    terms = [(s, float(w)) for s, w in zip(states, weights, strict=True) if float(w) != 0.0]
    two = len(terms) == 2 and terms[0][1] + terms[1][1] == 1.0
    out: State = {}
    for k, t in states[0].items():
        if not t.is_floating_point():
            out[k] = t.clone()
        elif not terms:
            out[k] = torch.zeros_like(t)
        elif len(terms) == 1 and terms[0][1] == 1.0:
            out[k] = terms[0][0][k].clone()
        elif two:
            out[k] = torch.lerp(terms[0][0][k], terms[1][0][k].to(t.dtype), terms[1][1])
        else:
            cd = torch.float64 if t.dtype == torch.float64 else torch.float32
            acc = terms[0][0][k].to(cd) * terms[0][1]
            for s, w in terms[1:]:
                acc.add_(s[k].to(cd), alpha=w)
            out[k] = acc.to(t.dtype)
    return out


def lerp(state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor], t: float) -> State:
    """``(1 - t) * a + t * b`` on floating tensors (:func:`combine`; exact at t = 0 and t = 1);
    other tensors from the nearer end.

    Example:
        >>> lerp({"w": torch.zeros(1)}, {"w": torch.ones(1)}, 0.5)["w"].tolist()
        [0.5]
    """
    t = float(t)
    out = combine([state_a, state_b], [1.0 - t, t])
    near = state_a if t < 0.5 else state_b
    for k, v in near.items():
        if not v.is_floating_point():
            out[k] = v.clone()
    return out


def gram(
    states: Sequence[Mapping[str, Tensor]],
    names: Sequence[str],
    origin: Mapping[str, Tensor] | None = None,
    *,
    piece: int = 1 << 17,
) -> Tensor:
    """``G_ij = ⟨s_i − o, s_j − o⟩`` over the tensors ``names`` (float64, ``o``: ``origin`` or 0).

    Read in cache-sized pieces converted to float64, so no flattened copy of a state is made:
    distances and angles between states (path segment lengths, the plane through three models)
    cost one pass over them.

    Args:
        states: state dicts of one architecture.
        names: the tensors that count (e.g. the model's parameters).
        origin: subtracted from every state first (``None``: nothing).
        piece: elements per piece.

    Returns:
        ``(len(states), len(states))`` float64 matrix on the CPU.

    Example:
        >>> a, b = {"w": torch.tensor([3.0, 4.0])}, {"w": torch.tensor([1.0, 0.0])}
        >>> gram([a, b], ["w"]).tolist()
        [[25.0, 3.0], [3.0, 1.0]]
    """
    k = len(states)
    out = torch.zeros(k, k, dtype=torch.float64)
    for n in names:
        flat = [s[n].detach().reshape(-1) for s in states]
        base = None if origin is None else origin[n].detach().reshape(-1)
        for i in range(0, flat[0].numel(), piece):
            d = torch.stack([f[i : i + piece].double() for f in flat])
            if base is not None:
                d = d - base[i : i + piece].to(d.device, torch.float64)
            out += (d @ d.T).cpu()
    return out
