"""AutoNEB: nudged elastic bands with automatic pivot insertion (Draxler et al., ICML 2018)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, ModeconnError
from ..evaluation import as_loader, model_device, resolve_device
from ..progress import progress_bar
from ..state import check_compatible, lerp
from .curves import PolyChain
from .fit import _epoch_seed, _train_split, parameter_names


def neb_tangent(prev: Tensor, here: Tensor, nxt: Tensor, losses: Sequence[float]) -> Tensor:
    """The improved NEB tangent of Henkelman & Jónsson (2000), as AutoNEB uses it (unit norm).

    Towards the higher neighbour (``θ_{i+1} − θ_i`` if ``L_{i+1} > L_{i−1}``, else ``θ_i −
    θ_{i−1}``); at a local extremum of the loss both directions are mixed, weighted by the loss
    differences ``ΔL_max``/``ΔL_min`` so the tangent turns smoothly.

    Example:
        >>> neb_tangent(torch.zeros(2), torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]),
        ...             [0.0, 1.0, 2.0]).tolist()
        [0.0, 1.0]
    """
    l_prev, l_here, l_next = losses
    t_prev = here - prev
    t_prev = t_prev / t_prev.norm().clamp_min(1e-30)
    t_next = nxt - here
    t_next = t_next / t_next.norm().clamp_min(1e-30)
    if (l_prev < l_here > l_next) or (l_prev > l_here < l_next):
        d1, d2 = abs(l_here - l_prev), abs(l_here - l_next)
        hi, lo = max(d1, d2), min(d1, d2)
        w_hi, w_lo = hi / (hi + lo + 1e-30), lo / (hi + lo + 1e-30)
        tau = w_lo * t_prev + w_hi * t_next if l_next > l_prev else w_hi * t_prev + w_lo * t_next
    elif l_next > l_prev:
        tau = t_next
    else:
        tau = t_prev
    return tau / tau.norm().clamp_min(1e-30)


def redistribute(chain: Tensor, weights: Tensor | None = None) -> Tensor:
    """Pivots re-placed along the chain at target arc-length fractions (endpoints bit for bit).

    The spring constant k = ∞ of AutoNEB's configurations: instead of a spring force, pivot i is
    put at arc length ``L · Σ_{j<i} w_j / Σ w`` of the current polygonal chain (total length L)
    after every step. ``weights`` (one per segment, default equal) are the target relative
    segment lengths; AutoNEB splits a segment's weight when it inserts a pivot into it, so
    inserted pivots stay where the loss rose.

    Example:
        >>> redistribute(torch.tensor([[0.0], [0.9], [2.0]])).tolist()
        [[0.0], [1.0], [2.0]]
    """
    n = chain.shape[0]
    seg = (chain[1:] - chain[:-1]).norm(dim=1)
    total = float(seg.sum())
    if n <= 2 or total == 0.0:
        return chain.clone()
    w = torch.ones(n - 1, dtype=torch.float64) if weights is None else weights.double().cpu()
    targets = (w.cumsum(0) / w.sum() * total).tolist()
    cum = torch.cat([seg.new_zeros(1), seg.cumsum(0)]).tolist()
    out = chain.clone()
    j = 0
    for i in range(1, n - 1):
        pos = targets[i - 1]
        while j < n - 2 and cum[j + 1] < pos:
            j += 1
        frac = (pos - cum[j]) / max(cum[j + 1] - cum[j], 1e-30)
        out[i] = torch.lerp(chain[j], chain[j + 1], min(max(frac, 0.0), 1.0))
    return out


class _Potential:
    """Loss (and gradient) of the network at flat parameter vectors, on fixed or given batches."""

    def __init__(self, model: nn.Module, names: list[str], aliases: dict[str, str], dev: Any):
        self.net = copy.deepcopy(model).to(dev).train()
        for p in self.net.parameters():
            p.requires_grad_(False)
        ref = model.state_dict()
        self.names, self.aliases = names, aliases
        self.shapes = [tuple(ref[n].shape) for n in names]
        self.sizes = [ref[n].numel() for n in names]

    def params(self, vec: Tensor) -> dict[str, Tensor]:
        chunks = vec.split(self.sizes)
        out = {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes, strict=True)}
        out.update({a: out[p] for a, p in self.aliases.items()})
        return out

    def loss(self, vec: Tensor, x: Tensor, y: Tensor, grad: bool) -> tuple[float, Tensor | None]:
        if not grad:
            with torch.no_grad():
                out = torch.func.functional_call(self.net, self.params(vec), (x,))
                return float(F.cross_entropy(out, y)), None
        v = vec.detach().requires_grad_(True)
        loss = F.cross_entropy(torch.func.functional_call(self.net, self.params(v), (x,)), y)
        (g,) = torch.autograd.grad(loss, v)
        return float(loss.detach()), g

    def mean_loss(self, vec: Tensor, batches: list[tuple[Tensor, Tensor]]) -> float:
        n = sum(len(y) for _, y in batches)
        return sum(self.loss(vec, x, y, False)[0] * len(y) for x, y in batches) / n


def autoneb(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Any,
    *,
    pivots: int = 3,
    cycles: int = 4,
    steps: int = 200,
    lr: float = 0.1,
    lr_decay: float = 0.5,
    momentum: float = 0.9,
    spring: float = float("inf"),
    insert: int = 2,
    insert_threshold: float = 0.1,
    subsample: int = 9,
    max_pivots: int = 20,
    batch_size: int = 128,
    eval_size: int = 1000,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> PolyChain:
    """A low-loss polygonal chain between two networks by AutoNEB (Draxler et al., ICML 2018,
    "Essentially No Barriers in Neural Network Energy Landscape").

    Nudged elastic band (Jónsson et al. 1998): the chain's inner pivots θ_i move with the force
    ``F_i = −(∇L(θ_i) − (∇L(θ_i)·τ_i) τ_i) + k [(d_i − d̂_i) − (d_{i−1} − d̂_{i−1})] τ_i`` (the
    loss gradient perpendicular to the tangent τ_i of :func:`neb_tangent`, plus a spring along
    it that pulls the segment lengths ``d_i = ‖θ_{i+1} − θ_i‖`` to their targets ``d̂_i``:
    equal at first), minibatch by minibatch, by SGD with momentum. With ``spring=inf`` (the
    authors' configurations) the spring is replaced by re-placing the pivots at their target
    spacing along the chain after each step (:func:`redistribute`). AutoNEB runs ``cycles``
    such NEB runs of ``steps`` steps with learning rate ``lr · lr_decay^c``; the chain starts as
    ``pivots`` evenly spaced points on the segment, and before each later cycle the loss is
    evaluated at ``subsample`` points between neighbours: in up to ``insert`` segments whose largest
    ``(L(θ(α)) − [(1−α) L_i + α L_{i+1}]) / (max_i L_i − min_i L_i)`` exceeds
    ``insert_threshold``, a new pivot is inserted at that α (the authors' ``highest`` rule) and
    that segment's target length is split at α, so the spring (or the redistribution) keeps the
    new pivot there. The endpoints never move.

    Args:
        model_a: endpoint A (not modified).
        model_b: endpoint B (not modified), same architecture.
        data: training data (or a ``Splits``: its train split).
        pivots: inner pivots of the first cycle.
        cycles: NEB cycles.
        steps: optimiser steps (minibatches) per cycle.
        lr: learning rate of the first cycle.
        lr_decay: factor applied to the learning rate after each cycle.
        momentum: SGD momentum.
        spring: spring constant k (``inf``: redistribution to the target spacing).
        insert: most pivots inserted per cycle.
        insert_threshold: normalised rise above which a segment gets a pivot.
        subsample: points evaluated inside each segment for insertion.
        max_pivots: cap on the chain's inner pivots.
        batch_size: minibatch size.
        eval_size: training examples used for the insertion losses.
        seed: seed of shuffling.
        device: where to run (default: model A's device).
        progress: show a progress bar.

    Returns:
        A :class:`PolyChain` (CPU) through the pivots; ``meta["autoneb"]`` holds the settings
        and per-cycle records (pivots, lr, max pivot loss).

    Example:
        >>> chain = mc.autoneb(a, b, splits, cycles=3, steps=100)  # doctest: +SKIP
        >>> mc.evaluate_path(a, chain, splits).barrier("loss", "train")  # doctest: +SKIP
    """
    if pivots < 1 or cycles < 1 or steps < 1 or lr <= 0 or batch_size < 1:
        raise ConfigError("need pivots, cycles, steps, batch_size >= 1 and lr > 0")
    if spring < 0 or insert < 0 or subsample < 1 or max_pivots < pivots:
        raise ConfigError("need spring >= 0, insert >= 0, subsample >= 1, max_pivots >= pivots")
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    check_compatible([state_a, state_b], ["model A", "model B"])
    dev = resolve_device(device) if device is not None else model_device(model_a)
    names, aliases = parameter_names(model_a)
    pot = _Potential(model_a, names, aliases, dev)
    ends = [
        torch.cat([s[n].detach().reshape(-1) for n in names]).to(dev) for s in (state_a, state_b)
    ]
    chain = torch.stack([torch.lerp(ends[0], ends[1], i / (pivots + 1)) for i in range(pivots + 2)])
    train = _train_split(data)
    x_all, y_all = next(iter(as_loader(train, batch_size=eval_size, shuffle=True, seed=seed)))
    eval_batches = [(x_all.to(dev), y_all.to(dev))]
    weights = torch.ones(pivots + 1, dtype=torch.float64)  # target relative segment lengths
    records: list[dict[str, float]] = []
    with progress_bar(progress, total=cycles, description="AutoNEB") as advance:
        for cycle in range(cycles):
            if cycle > 0 and insert > 0 and chain.shape[0] - 2 < max_pivots:
                chain, weights = _insert(pot, chain, weights, eval_batches, insert,
                                         insert_threshold, subsample,
                                         max_pivots - (chain.shape[0] - 2))  # fmt: skip
            rate = lr * lr_decay**cycle
            chain = _neb_cycle(pot, chain, weights, train, rate, momentum, spring, steps,
                               batch_size, _epoch_seed(seed, cycle), dev)  # fmt: skip
            pl = [pot.mean_loss(v, eval_batches) for v in chain]
            records.append({"cycle": cycle + 1, "pivots": chain.shape[0] - 2, "lr": rate,
                            "max_pivot_loss": max(pl)})  # fmt: skip
            advance(f"cycle {cycle + 1}: {chain.shape[0] - 2} pivots, max loss {max(pl):.3f}")
    return _to_chain(chain, state_a, state_b, pot, model_a, records, {
        "pivots": pivots, "cycles": cycles, "steps": steps, "lr": lr, "lr_decay": lr_decay,
        "momentum": momentum, "spring": str(spring) if spring == float("inf") else spring,
        "insert": insert, "insert_threshold": insert_threshold, "subsample": subsample,
        "max_pivots": max_pivots, "batch_size": batch_size, "seed": seed,
    })  # fmt: skip


def _neb_cycle(
    pot: _Potential, chain: Tensor, weights: Tensor, train: Any, lr: float, momentum: float,
    spring: float, steps: int, batch_size: int, seed: int, dev: torch.device,
) -> Tensor:  # fmt: skip
    """``steps`` NEB steps on the inner pivots (SGD with momentum on the negated NEB force)."""
    inner = torch.nn.Parameter(chain[1:-1].clone())
    opt = torch.optim.SGD([inner], lr=lr, momentum=momentum)
    first, last = chain[:1], chain[-1:]
    done = 0
    epoch = 0
    while done < steps:
        for x, y in as_loader(train, batch_size=batch_size, shuffle=True, seed=seed + epoch):
            if done >= steps:
                break
            x, y = x.to(dev), y.to(dev)
            full = torch.cat([first, inner.detach(), last])
            losses, grads = [], []
            for i in range(full.shape[0]):
                is_inner = 0 < i < full.shape[0] - 1
                loss, g = pot.loss(full[i], x, y, grad=is_inner)
                if loss != loss or loss == float("inf"):
                    raise ModeconnError("AutoNEB diverged (non-finite loss); lower lr")
                losses.append(loss)
                grads.append(g)
            force = torch.zeros_like(inner)
            dist = (full[1:] - full[:-1]).norm(dim=1)
            target = (weights / weights.sum()).to(dist) * dist.sum()
            for i in range(1, full.shape[0] - 1):
                tau = neb_tangent(full[i - 1], full[i], full[i + 1], losses[i - 1 : i + 2])
                g = grads[i]
                assert g is not None
                step = g - (g @ tau) * tau
                if spring != float("inf"):  # descent direction of the spring energy
                    stretch = (dist[i - 1] - target[i - 1]) - (dist[i] - target[i])
                    step = step + spring * stretch * tau
                force[i - 1] = step
            inner.grad = force
            opt.step()
            if spring == float("inf"):
                with torch.no_grad():
                    inner.copy_(redistribute(torch.cat([first, inner, last]), weights)[1:-1])
            done += 1
        epoch += 1
    return torch.cat([first, inner.detach(), last])


def _insert(
    pot: _Potential, chain: Tensor, weights: Tensor, batches: list[tuple[Tensor, Tensor]],
    insert: int, threshold: float, subsample: int, room: int,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Insert pivots where the chain's loss rises most above its pivots' (AutoNEB's "highest").

    Returns the new chain and its target segment weights (a split segment's weight is shared
    in proportion α : 1 − α, as the authors' ``fill_chain``).
    """
    pl = [pot.mean_loss(v, batches) for v in chain]
    spread = max(pl) - min(pl) + 1e-12
    alphas = torch.linspace(0, 1, subsample + 2)[1:-1].tolist()
    best: list[tuple[float, int, float]] = []
    for i in range(chain.shape[0] - 1):
        scores = [
            (pot.mean_loss(torch.lerp(chain[i], chain[i + 1], a), batches)
             - ((1 - a) * pl[i] + a * pl[i + 1])) / spread
            for a in alphas
        ]  # fmt: skip
        j = max(range(len(alphas)), key=scores.__getitem__)
        best.append((scores[j], i, alphas[j]))
    chosen = {i: a for s, i, a in sorted(best, reverse=True)[: min(insert, room)] if s > threshold}
    rows, new_w = [], []
    for i in range(chain.shape[0]):
        rows.append(chain[i])
        if i in chosen:
            rows.append(torch.lerp(chain[i], chain[i + 1], chosen[i]))
            new_w += [weights[i] * chosen[i], weights[i] * (1 - chosen[i])]
        elif i < chain.shape[0] - 1:
            new_w.append(weights[i])
    return torch.stack(rows), torch.stack(new_w)


def _to_chain(
    chain: Tensor, state_a: dict[str, Tensor], state_b: dict[str, Tensor], pot: _Potential,
    model: nn.Module, records: list[dict[str, float]], settings: dict[str, Any],
) -> PolyChain:  # fmt: skip
    """Full state dicts for the pivots (buffers interpolated by position); endpoints exact."""
    n = chain.shape[0]
    points = [dict(state_a)]
    for i in range(1, n - 1):
        st = lerp(state_a, state_b, i / (n - 1))
        params = pot.params(chain[i].detach().to("cpu"))
        for k in params:
            st[k] = params[k].clone().to(state_a[k].dtype)
        points.append(st)
    points.append(dict(state_b))
    meta = {
        "model": getattr(model, "modeconn_config", None),
        "autoneb": {**settings, "history": records},
    }
    return PolyChain(points, meta=meta)
