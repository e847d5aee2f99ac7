"""Simulated annealing over permutations (Entezari et al., ICLR 2022): minimise the barrier.

Entezari, Sedghi, Saukh & Neyshabur, "The Role of Permutation Invariance in Linear Mode
Connectivity of Neural Networks", ICLR 2022, search the permutation ``π`` of B's hidden units that
minimises the loss barrier of the linear path ``θ(t) = (1 − t)·θ_A + t·π(θ_B)`` by simulated
annealing: a move swaps two units of one layer; it is accepted with the Metropolis probability
``min(1, exp(−Δ/T_k))`` under a decreasing temperature. Here the objective ``f(π)`` is measured
on a fixed set of training examples and is either

- ``"midpoint"``: ``L(θ(½))`` (the cheap proxy the barrier peaks at for most pairs), or
- ``"barrier"``: ``max_t [L(θ(t)) − ((1 − t)·L(θ_A) + t·L(θ_B))]`` over ``ts`` interior points;

the schedule is geometric, ``T_k = t0·(t_end/t0)^(k/(steps − 1))``; the group of a move is drawn
with probability proportional to its size, the two units uniformly among those a valid
permutation may exchange (attention groups are held at their start). The best permutation seen
is returned. BatchNorm layers use batch statistics (their running statistics are meaningless on
the path).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..evaluation import DataLike, model_device, resolve_device
from ..progress import progress_bar
from ..spec import (
    Permutation,
    PermutationSpec,
    apply_permutation,
    unit_classes,
)
from ..state import check_compatible, lerp
from .base import Aligner, AlignInputs, signature_params
from .builtins import options
from .pam import _subset
from .ste import midpoint_mode

OBJECTIVES = ("midpoint", "barrier")


def annealing_matching(
    model_a: nn.Module,
    model_b: nn.Module,
    data: DataLike,
    *,
    spec: PermutationSpec | None = None,
    init: Mapping[str, Tensor] | str | None = None,
    objective: str = "midpoint",
    ts: int = 3,
    steps: int = 2000,
    t0: float = 1e-2,
    t_end: float = 1e-5,
    eval_examples: int = 1024,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> Permutation:
    """Simulated annealing over B's permutations (Entezari et al., ICLR 2022).

    Minimises ``f(π)`` (module docstring: the midpoint loss or the barrier of the linear path
    A → π(B) on ``eval_examples`` training examples) by ``steps`` Metropolis moves, each
    swapping two units of one group, at temperature ``T_k = t0·(t_end/t0)^(k/(steps − 1))``.

    Args:
        model_a: the reference model (not modified).
        model_b: the model to align (not modified).
        data: training data (DataLoader, Dataset or ``(inputs, targets)``).
        spec: the permutation spec (default: ``mc.infer_spec`` on the first batch).
        init: the start: ``None`` (identity, as the paper), a :class:`~modeconn.Permutation`,
            or an alignment method name (e.g. ``"weight"``) to refine its result.
        objective: ``"midpoint"`` or ``"barrier"``.
        ts: interior points of the path for ``"barrier"``.
        steps: annealing moves.
        t0: initial temperature (in loss units).
        t_end: final temperature.
        eval_examples: training examples the objective is measured on.
        seed: seeds the moves and acceptances.
        device: where to run (default: A's device).
        progress: show a progress bar.

    Returns:
        A :class:`~modeconn.Permutation` mapping B onto A; ``info`` holds ``objective``
        (best), ``start`` (the start's), ``accepted`` (moves taken), ``history`` (best
        objective every ``steps // 20`` moves).

    Example:
        >>> perm = annealing_matching(a, b, (x, y), steps=2000)  # doctest: +SKIP
    """
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if steps < 0 or ts < 1 or eval_examples < 1:
        raise ConfigError(
            f"annealing needs steps >= 0, ts >= 1 and eval_examples >= 1; got {steps}, {ts}, "
            f"{eval_examples}"
        )
    if not 0 < t_end <= t0:
        raise ConfigError(f"annealing needs 0 < t_end <= t0, got t0={t0}, t_end={t_end}")
    if data is None:
        raise ConfigError("annealing measures the barrier on data: pass data=(inputs, targets)")
    from .api import resolve_spec, start_permutation

    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    check_compatible([state_a, state_b], ["model A", "model B"])
    spec = resolve_spec(model_a, spec, data=data)
    start = start_permutation(model_a, model_b, spec, init, data)

    dev = resolve_device(device) if device is not None else model_device(model_a)
    x, y = (t.to(dev) for t in _subset(data, eval_examples))
    a = {k: v.detach().to(dev) for k, v in state_a.items()}
    b = {k: v.detach().to(dev) for k, v in state_b.items()}
    net = midpoint_mode(copy.deepcopy(model_a).to(dev))
    path_ts = [0.5] if objective == "midpoint" else [(i + 1) / (ts + 1) for i in range(ts)]

    def loss(state: Mapping[str, Tensor]) -> float:
        with torch.no_grad():
            out = torch.func.functional_call(net, dict(state), (x,))
            return float(F.cross_entropy(out, y))

    ends = (loss(a), loss(b)) if objective == "barrier" else (0.0, 0.0)

    def f(perm: Mapping[str, Tensor]) -> float:
        pb = apply_permutation(spec, perm, b)
        worst = -math.inf
        for t in path_ts:
            point = lerp(a, pb, t)
            base = (1 - t) * ends[0] + t * ends[1]
            worst = max(worst, loss(point) - base)
        return worst

    free = [g for g, n in spec.groups.items() if g not in spec.heads and n > 1]
    classes = {g: unit_classes(spec, g) for g in free}
    sizes = torch.tensor([float(spec.groups[g]) for g in free])
    gen = torch.Generator().manual_seed(seed)
    cur = Permutation({g: p.clone() for g, p in start.items()})
    f_cur = f_start = f(cur)
    best, f_best = Permutation({g: p.clone() for g, p in cur.items()}), f_cur
    accepted, history = 0, []
    every = max(steps // 20, 1)
    with progress_bar(progress, total=steps, description="annealing") as advance:
        for k in range(steps if free else 0):
            temp = t0 * (t_end / t0) ** (k / max(steps - 1, 1))
            g = free[int(torch.multinomial(sizes, 1, generator=gen))]
            i, j = _pair(classes[g], spec.groups[g], gen)
            if i == j:
                advance(None)
                continue
            cand = Permutation(dict(cur))
            p = cur[g].clone()
            p[[i, j]] = p[[j, i]]
            cand[g] = p
            f_new = f(cand)
            delta = f_new - f_cur
            if delta <= 0 or float(torch.rand((), generator=gen)) < math.exp(-delta / temp):
                cur, f_cur = cand, f_new
                accepted += 1
                if f_cur < f_best:
                    best = Permutation({h: q.clone() for h, q in cur.items()})
                    f_best = f_cur
            if (k + 1) % every == 0:
                history.append(f_best)
            advance(f"best {f_best:.4g}")
    best.info = {"method": "annealing", "objective": f_best, "start": f_start,
                 "accepted": accepted, "history": history, "objective_kind": objective}
    return best


def _pair(labels: Tensor | None, n: int, gen: torch.Generator) -> tuple[int, int]:
    """Two units a valid permutation may exchange (the same class), drawn uniformly."""
    i = int(torch.randint(n, (), generator=gen))
    if labels is None:
        return i, int(torch.randint(n, (), generator=gen))
    same = torch.nonzero(labels == labels[i]).flatten()
    return i, int(same[int(torch.randint(len(same), (), generator=gen))])



class AnnealingAligner(Aligner):
    """Simulated annealing over permutations (Entezari et al. 2022): minimise the barrier."""

    Params = signature_params(annealing_matching, exclude=("spec",), name="AnnealingParams")
    needs = frozenset({"spec", "states", "models", "data"})
    exact = False  # a stochastic search: it lowers the barrier, it does not promise the optimum

    def run(self, inputs: AlignInputs, params: Any) -> Permutation:
        """:func:`annealing_matching` on the two models and the data."""
        assert inputs.model_a is not None and inputs.model_b is not None
        return annealing_matching(inputs.model_a, inputs.model_b, inputs.data, spec=inputs.spec,
                                  **options(params))
