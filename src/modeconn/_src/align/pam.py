"""PAM: proximal alternating minimisation over relaxed permutations and a curve (Tatro 2020).

Tatro, Chen, Das, Melnyk, Sattigeri, Lai, "Optimizing Mode Connectivity via Neuron Alignment",
NeurIPS 2020 (the seed paper; code: IBM/NeuronAlignment, ``train_curve_pam.py``). The curve's
bend is reparametrised as ``θ_1 = ½θ_A + ½P(θ_B) + δ`` and the permutation ``P`` of B's hidden
units is learned together with the curve by alternating two phases:

- **Phase 1 (the permutation, this module).** Each hidden group's ``P`` is relaxed to a doubly
  stochastic matrix (initialised at the identity, or at a given permutation). With ``δ = 0`` the
  curve is ``θ(t) = (1 − t)·θ_A + t·P(θ_B)``; for ≈ 20 epochs, every minibatch draws
  ``t ~ U(0, 1)`` and takes an SGD step on ``CE(f(x; θ(t)), y)`` w.r.t. ``P``, then the
  proximal step ``P ← (P + (η/ν)·P_old)/(1 + η/ν)`` (``ν = 10³``, ``P_old`` the phase's starting
  point) and a projection back onto the doubly stochastic matrices (the seed code's alternating
  projection, finished by Sinkhorn normalisation of the clipped-positive matrix). Rounding:
  candidate permutations from the Birkhoff–von Neumann decomposition of each ``P`` (its top
  terms, sampled by weight), the Hungarian projection ``argmax_π Σ_i P[i, π(i)]`` and the
  previous permutation; the one with the lowest curve objective on training data wins.
- **Phase 2 (the curve).** Train ``δ`` as usual: ``mc.fit_curve(..., align="pam")`` permutes B
  with :func:`pam_align`'s result and fits the curve between A and the permuted B.

The paper's finding: started from the neuron-alignment permutation, PAM stays (nearly) there,
i.e. alignment is locally optimal (``experiments/curves.py`` measures the fraction of units on
which PAM and activation matching agree).

The soft permutation is applied to B's state differentiably through the spec's slots by
``align.sinkhorn.soft_apply`` (shared with Sinkhorn re-basin).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..assign import solve_assignment
from ..errors import ConfigError, DataError
from ..evaluation import (
    AtParams,
    DataLike,
    InputTransform,
    as_loader,
    model_device,
    resolve_device,
)
from ..progress import progress_bar
from ..spec import (
    Permutation,
    PermutationSpec,
    apply_permutation,
    identity_permutation,
)
from ..state import check_compatible, lerp

State = dict[str, Tensor]

__all__ = [
    "birkhoff_decomposition",
    "pam_align",
    "pam_objective",
    "pam_round",
    "project_doubly_stochastic",
]


# --- the relaxation: doubly stochastic matrices ---------------------------------------------
def project_doubly_stochastic(
    matrix: Tensor,
    *,
    method: str = "alternating",
    iters: int = 1000,
    tol: float = 1e-6,
    floor: float | None = None,
) -> Tensor:
    """Map a square matrix back onto the doubly stochastic matrices (the Birkhoff polytope).

    ``"alternating"`` (the seed code's ``project_doubly_stoch``): alternate ``M ← max(M, 0)`` with
    the Euclidean projection onto ``{M : M·1 = 1, Mᵀ·1 = 1}``,
    ``M ← M − (r − 1)1ᵀ/n − 1(c − 1)ᵀ/n + (Σ M − n)/n²`` (``r``, ``c`` the row and column sums),
    until both hold within ``tol``; then clip to positive and finish with Sinkhorn normalisation
    (tiny multiplicative corrections). Like a Euclidean projection it sets small entries to zero,
    so a matrix near a permutation stays near it. ``"sinkhorn"``: clip to positive
    (``max(M, floor)``, which also gives the matrix total support) and alternately divide rows
    and columns by their sums (Sinkhorn–Knopp); every positive entry survives, so mass diffuses
    over many units step after step (on an MNIST-1D MLP, the curve loss from an aligned start
    rose 1.31 → 1.53 in 10 PAM epochs with it, and stayed at 1.30 with ``"alternating"``).

    Args:
        matrix: ``(n, n)`` real matrix.
        method: ``"alternating"`` (default) or ``"sinkhorn"``.
        iters: maximum number of iterations of each stage (PAM's inner loop uses 20, like the
            seed code, which leaves the matrix doubly stochastic only approximately; near a
            permutation, full convergence takes hundreds of iterations).
        tol: stop when ``max |row sum − 1|`` and ``max |column sum − 1|`` are below it.
        floor: the smallest entry kept by Sinkhorn normalisation (default: 10⁻⁶ for
            ``"sinkhorn"``, 10⁻¹² for the final polish of ``"alternating"``).

    Returns:
        A new ``(n, n)`` matrix (same dtype/device), non-negative, rows and columns summing to 1.

    Example:
        >>> P = project_doubly_stochastic(torch.tensor([[2.0, 1.0], [0.0, 1.0]]))
        >>> [round(v, 4) for v in P.sum(0).tolist() + P.sum(1).tolist()]
        [1.0, 1.0, 1.0, 1.0]
    """
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {tuple(matrix.shape)}")
    if method not in ("alternating", "sinkhorn"):
        raise ConfigError(f"projection must be 'alternating' or 'sinkhorn', got {method!r}")
    m = matrix.detach().double()
    n = m.shape[0]

    def off(x: Tensor) -> float:
        return max(float((x.sum(1) - 1).abs().max()), float((x.sum(0) - 1).abs().max()))

    if method == "alternating":
        for _ in range(iters):
            m = m.clamp_min(0.0)
            if off(m) < tol:
                break
            r, c = m.sum(1, keepdim=True), m.sum(0, keepdim=True)
            m = m - (r - 1) / n - (c - 1) / n + (m.sum() - n) / n**2
    if floor is None:
        floor = 1e-12 if method == "alternating" else 1e-6
    m = m.clamp_min(floor)
    for _ in range(iters):
        m = m / m.sum(dim=1, keepdim=True)
        m = m / m.sum(dim=0, keepdim=True)
        if off(m) < tol:
            break
    return m.to(matrix.dtype)


def birkhoff_decomposition(
    matrix: Tensor, *, max_terms: int = 50, tol: float = 1e-6
) -> list[tuple[float, Tensor]]:
    """Greedy Birkhoff–von Neumann decomposition ``D ≈ Σ_k c_k P_k`` of a doubly stochastic matrix.

    Repeatedly take the permutation ``π`` inside the support of the remainder ``S`` (entries
    ``> tol``) with the largest ``Σ_i S[i, π(i)]`` (Hungarian), its weight ``c = min_i S[i, π(i)]``,
    and subtract ``c·P_π``; stop when nothing remains, no permutation fits the support, or after
    ``max_terms`` terms (the PAM code keeps only the top terms anyway).

    Args:
        matrix: ``(n, n)`` doubly stochastic matrix.
        max_terms: maximum number of terms.
        tol: entries at or below it count as zero.

    Returns:
        ``[(c_k, π_k)]`` sorted by decreasing weight; ``π_k`` a LongTensor with ``π_k[i]`` the
        column of row ``i`` (the :class:`~modeconn.Permutation` convention).

    Example:
        >>> terms = birkhoff_decomposition(torch.tensor([[0.75, 0.25], [0.25, 0.75]]))
        >>> [(round(c, 2), p.tolist()) for c, p in terms]
        [(0.75, [0, 1]), (0.25, [1, 0])]
    """
    s = matrix.detach().double().cpu().numpy().copy()
    n = s.shape[0]
    terms: list[tuple[float, Tensor]] = []
    big = float(n * n + 1)
    rows = np.arange(n)
    while len(terms) < max_terms and s.max(initial=0.0) > tol:
        score = np.where(s > tol, s, -big)
        p = solve_assignment(torch.from_numpy(score)).numpy()
        c = float(s[rows, p].min())
        if c <= tol:
            break
        terms.append((c, torch.from_numpy(p.copy()).long()))
        s[rows, p] -= c
    terms.sort(key=lambda cp: -cp[0])
    return terms


def _one_hot(p: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    n = p.numel()
    m = torch.zeros(n, n, dtype=dtype, device=device)
    m[torch.arange(n, device=device), p.to(device)] = 1.0
    return m


# --- the curve objective ------------------------------------------------------------------
def _soft_apply(
    spec: PermutationSpec, soft: Mapping[str, Tensor], state: Mapping[str, Tensor]
) -> State:
    from ..align.sinkhorn import soft_apply

    return soft_apply(spec, soft, state)


def _curve_point(state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor], t: float) -> State:
    """``(1 − t)·θ_A + t·θ_B`` on floating tensors (``state.lerp``, differentiable)."""
    return lerp(state_a, state_b, t)


def _loss(model: nn.Module, params: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(torch.func.functional_call(model, dict(params), (x,)), y)


def pam_objective(
    model: nn.Module,
    spec: PermutationSpec,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    perm: Mapping[str, Tensor],
    data: DataLike,
    *,
    ts: tuple[float, ...] = (0.25, 0.5, 0.75),
    input_transform: InputTransform | None = None,
    batch_size: int = 512,
    device: str | torch.device | None = None,
) -> float:
    """The curve objective PAM rounds with: ``mean_t CE(f(x; (1 − t)θ_A + t·π(θ_B)), y)``.

    Averaged over ``ts`` and the examples of ``data`` (batch statistics in BatchNorm layers, as
    during curve training). Lower is better.

    Args:
        model: the architecture (not modified).
        spec: the permutation spec.
        state_a: θ_A.
        state_b: θ_B (before permuting).
        perm: the permutation π of B.
        data: the data (a fixed subset of the training set).
        ts: positions on the segment.
        input_transform: ``fn(model_fn, x, y) -> x'`` applied per batch and ``t`` (robust
            curves).
        batch_size: for a Dataset/tuple.
        device: where to run.

    Returns:
        The mean cross-entropy.

    Example:
        >>> pam_objective(model, spec, a, b, perm, (x, y))  # doctest: +SKIP
        0.231
    """
    dev = resolve_device(device) if device is not None else model_device(model)
    a = {k: v.to(dev) for k, v in state_a.items()}
    b = {k: v.to(dev) for k, v in apply_permutation(spec, perm, state_b).items()}
    total, n = 0.0, 0
    was_training = model.training
    model.train()
    # a fixed RNG: every candidate sees the same dropout masks / PGD starts (global RNG untouched)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(0)
        try:
            for x, y in as_loader(data, batch_size=batch_size):
                x, y = x.to(dev), y.to(dev)
                for t in ts:
                    point = _curve_point(a, b, float(t))
                    xt = x if input_transform is None else input_transform(
                        _forward(model, point), x, y)
                    with torch.no_grad():
                        total += float(_loss(model, point, xt, y)) * len(y)
                    n += len(y)
        finally:
            model.train(was_training)
    if n == 0:
        raise DataError("cannot evaluate the PAM objective on an empty dataset")
    return total / n


def _forward(model: nn.Module, params: Mapping[str, Tensor]) -> nn.Module:
    """The network at fixed (detached) weights, as ``fit_curve``'s ``input_transform`` gets it."""
    return AtParams(model, {k: v.detach() for k, v in params.items()})


# --- PAM phase 1 ----------------------------------------------------------------------------
def pam_align(
    model_a: nn.Module,
    model_b: nn.Module,
    data: DataLike,
    *,
    spec: PermutationSpec | None = None,
    init: Mapping[str, Tensor] | str | None = None,
    epochs: int = 20,
    lr: float = 1.0,
    nu: float = 1e3,
    projection: str = "alternating",
    projection_iters: int = 20,
    batch_size: int = 128,
    bvn_terms: int = 11,
    samples: int = 32,
    eval_examples: int = 2048,
    input_transform: InputTransform | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Permutation:
    """PAM phase 1 (Tatro et al., NeurIPS 2020): learn B's permutation for the curve A → B.

    Each hidden group's permutation is relaxed to a doubly stochastic ``P`` (init: the identity,
    or ``init``); with the curve ``θ(t) = (1 − t)θ_A + t·P(θ_B)`` (the bend offset ``δ = 0``),
    every minibatch draws ``t ~ U(0, 1)`` and takes one SGD step (``lr``) on
    ``CE(f(x; θ(t)), y)`` w.r.t. ``P``, followed by the proximal step
    ``P ← (P + (η/ν) P_old)/(1 + η/ν)`` and the projection :func:`project_doubly_stochastic`.
    Rounding: the Hungarian projection of ``P``, the previous (initial) permutation, the top
    ``bvn_terms`` permutations of each ``P``'s Birkhoff–von Neumann decomposition and ``samples``
    random combinations of them (drawn per group with probability ∝ weight); the candidate with
    the lowest :func:`pam_objective` on ``eval_examples`` training examples is returned.
    Attention groups (``spec.heads``) are held at their initial permutation.

    Phase 2 (training the curve ``δ``) is ``mc.fit_curve(model_a, model_b, data, align="pam")``.

    Args:
        model_a: endpoint A (not modified).
        model_b: endpoint B (not modified).
        data: training data (DataLoader, Dataset or ``(inputs, targets)``).
        spec: the permutation spec (default: ``mc.infer_spec`` on the first batch).
        init: starting permutation: ``None`` (identity, the paper's default), a
            :class:`~modeconn.Permutation`, or an alignment method name (``"activation"``,
            ``"weight"``) to start from that method's result.
        epochs: phase-1 epochs (the seed code: 20).
        lr: SGD learning rate on ``P``. The seed code's 0.05 is tuned for CIFAR runs of
            ≈ 7800 steps; on small data (MNIST-1D: 32 steps an epoch) ``P`` then barely leaves
            its start (an MLP, from the identity: 10 epochs at 0.05 took the objective from
            2.05 to 2.01 and moved 2.6% of units; 20 epochs at 1.0: to 1.31, 26% moved),
            hence the default 1.0.
        nu: proximal parameter ``ν`` (the seed code: 10³).
        projection: how ``P`` returns to the doubly stochastic matrices after each step:
            ``"alternating"`` (the seed code's) or ``"sinkhorn"``; see
            :func:`project_doubly_stochastic`.
        projection_iters: iterations of each projection stage per step (the seed code: 20).
        batch_size: minibatch size for a Dataset/tuple.
        bvn_terms: top Birkhoff–von Neumann terms kept per group (the seed code: 11).
        samples: random BvN combinations tried (the seed code: 32).
        eval_examples: training examples used to rank the candidates.
        input_transform: ``fn(model_fn, x, y) -> x'`` applied to every batch, e.g. PGD inputs
            for robust curves (``model_fn``: an ``nn.Module`` computing the current point of the
            curve with detached weights; the same hook as ``mc.fit_curve``'s).
        seed: seeds the data order, the ``t`` draws and the BvN sampling.
        device: where to run (default: A's device).
        progress: show a progress bar.

    Returns:
        A :class:`~modeconn.Permutation` mapping B onto A; ``.info`` holds ``objective`` (of the
        chosen candidate), ``chosen`` (``"hungarian"``, ``"previous"`` or ``"bvn"``),
        ``candidates``, ``objectives`` (per source, best), ``history`` (mean loss per epoch) and
        ``changed`` (fraction of units moved from the initial permutation).

    Example:
        >>> perm = pam_align(model_a, model_b, train, epochs=20)  # doctest: +SKIP
        >>> b_aligned = mc.apply_permutation(spec, perm, model_b.state_dict())  # doctest: +SKIP
    """
    if epochs < 0 or lr <= 0 or nu <= 0:
        raise ConfigError(f"pam needs epochs >= 0, lr > 0 and nu > 0; got {epochs}, {lr}, {nu}")
    if data is None:
        raise ConfigError("PAM learns the permutation on data: pass data=(inputs, targets)")
    if projection not in ("alternating", "sinkhorn"):
        raise ConfigError(f"projection must be 'alternating' or 'sinkhorn', got {projection!r}")
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    check_compatible([state_a, state_b], ["model A", "model B"])
    from .api import resolve_spec, start_permutation

    spec = resolve_spec(model_a, spec, data=data)
    dev = resolve_device(device) if device is not None else model_device(model_a)
    start = start_permutation(model_a, model_b, spec, init, data)
    a = {k: v.detach().to(dev) for k, v in state_a.items()}
    b = {k: v.detach().to(dev) for k, v in state_b.items()}
    free = [g for g, n in spec.groups.items() if g not in spec.heads and n > 1]
    dtype = next((v.dtype for v in a.values() if v.is_floating_point()), torch.float32)
    P = {g: _one_hot(start[g], dtype, dev).requires_grad_(True) for g in free}
    P_old = {g: m.detach().clone() for g, m in P.items()}
    fixed = {g: _one_hot(start[g], dtype, dev) for g in spec.groups if g not in P}

    loader = as_loader(data, batch_size=batch_size, shuffle=True, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(list(P.values()), lr=lr) if P else None
    ratio = lr / nu
    history: list[float] = []
    model = model_a
    params = {n for n, _ in model.named_parameters()}
    was_training = model.training
    model.train()
    try:
        with (
            progress_bar(progress, total=epochs * len(loader), description="PAM") as advance,
            torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []),
        ):
            torch.manual_seed(seed)  # dropout and input_transform draws: reproducible
            for epoch in range(epochs if opt is not None else 0):
                assert opt is not None
                total, n = 0.0, 0
                for x, y in loader:
                    x, y = x.to(dev), y.to(dev)
                    t = float(torch.rand((), generator=gen))
                    soft_b = _soft_apply(spec, {**fixed, **P}, b)
                    point = _curve_point(a, soft_b, t)
                    # buffers (BatchNorm statistics) carry no gradient: train mode ignores them
                    point = {k: v if k in params else v.detach() for k, v in point.items()}
                    if input_transform is not None:
                        x = input_transform(_forward(model, point), x, y)
                    loss = _loss(model, point, x, y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        for g, m in P.items():
                            prox = (m + ratio * P_old[g]) / (1 + ratio)
                            m.copy_(project_doubly_stochastic(
                                prox, method=projection, iters=projection_iters))
                    total += float(loss.detach()) * len(y)
                    n += len(y)
                    advance(f"epoch {epoch + 1}/{epochs}")
                history.append(total / max(n, 1))
    finally:
        model.train(was_training)

    soft = {g: m.detach().cpu() for g, m in P.items()}
    perm = pam_round(
        model_a, spec, state_a, state_b, soft, data,
        previous=start, bvn_terms=bvn_terms, samples=samples, eval_examples=eval_examples,
        input_transform=input_transform, seed=seed, device=dev,
    )
    units = sum(spec.groups.values())
    changed = sum(int((perm[g] != start[g]).sum()) for g in spec.groups) / max(units, 1)
    perm.info.update({"method": "pam", "history": history, "changed": changed})
    return perm


def pam_round(
    model: nn.Module,
    spec: PermutationSpec,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    soft: Mapping[str, Tensor],
    data: DataLike,
    *,
    previous: Mapping[str, Tensor] | None = None,
    bvn_terms: int = 11,
    samples: int = 32,
    eval_examples: int = 2048,
    input_transform: InputTransform | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> Permutation:
    """PAM's rounding of relaxed permutations (Tatro et al. 2020, ``sample_permutation``).

    Candidates: the Hungarian projection ``argmax_π Σ_i P[i, π(i)]`` of every group's doubly
    stochastic ``P``; the ``previous`` permutation; the combination of each group's heaviest
    Birkhoff–von Neumann term; and ``samples`` combinations drawing, per group, one of its top
    ``bvn_terms`` terms with probability ∝ weight. The candidate with the lowest
    :func:`pam_objective` on the first ``eval_examples`` examples of ``data`` wins (ties: the
    earlier candidate, in the order above).

    Args:
        model: the architecture (not modified).
        spec: the permutation spec.
        state_a: θ_A.
        state_b: θ_B (unpermuted).
        soft: ``{group: (n, n) doubly stochastic matrix}``; groups not given come from
            ``previous`` (default: the identity).
        data: training data.
        previous: the permutation before the relaxation (default: the identity).
        bvn_terms: top Birkhoff–von Neumann terms kept per group.
        samples: random combinations tried.
        eval_examples: examples used to rank the candidates.
        input_transform: as in :func:`pam_align`.
        seed: seed of the sampling.
        device: where to run.

    Returns:
        The best :class:`~modeconn.Permutation`; ``.info`` holds ``objective``, ``chosen``
        (``"hungarian"``, ``"previous"`` or ``"bvn"``), ``candidates`` (distinct ones evaluated)
        and ``objectives`` (best per source).

    Example:
        >>> soft = {"h": 0.6 * torch.eye(4) + 0.4 * torch.eye(4).flip(0)}  # doctest: +SKIP
        >>> pam_round(model, spec, sa, sb, soft, train).info["chosen"]  # doctest: +SKIP
        'bvn'
    """
    start = identity_permutation(spec) if previous is None else Permutation(dict(previous))
    unknown = [g for g in soft if g not in spec.groups]
    if unknown:
        raise ConfigError(f"soft permutation names group {unknown[0]!r}, which the spec lacks")
    soft = {g: m.detach().double().cpu() for g, m in soft.items()}
    candidates: list[tuple[str, Permutation]] = [
        ("hungarian", Permutation({**start, **{g: solve_assignment(m) for g, m in soft.items()}})),
        ("previous", Permutation(dict(start))),
    ]
    terms = {g: birkhoff_decomposition(m)[:bvn_terms] for g, m in soft.items()}
    terms = {g: ts for g, ts in terms.items() if ts}
    if terms:
        top = {g: ts[0][1] for g, ts in terms.items()}
        candidates.append(("bvn", Permutation({**start, **top})))
        rng = np.random.default_rng(seed)
        for _ in range(samples):
            pick = {}
            for g, ts in terms.items():
                w = np.array([c for c, _ in ts])
                pick[g] = ts[int(rng.choice(len(ts), p=w / w.sum()))][1]
            candidates.append(("bvn", Permutation({**start, **pick})))
    sub = _subset(data, eval_examples)
    seen: dict[tuple[bytes, ...], float] = {}
    best: tuple[float, str, Permutation] | None = None
    per_source: dict[str, float] = {}
    for source, cand in candidates:
        key = tuple(cand[g].numpy().tobytes() for g in spec.groups)
        if key not in seen:
            seen[key] = pam_objective(
                model, spec, state_a, state_b, cand, sub,
                input_transform=input_transform, device=device,
            )
        obj = seen[key]
        per_source[source] = min(obj, per_source.get(source, float("inf")))
        if best is None or obj < best[0]:
            best = (obj, source, cand)
    assert best is not None
    obj, source, perm = best
    perm = Permutation(dict(perm))
    perm.info = {"objective": obj, "chosen": source, "candidates": len(seen),
                 "objectives": per_source}
    return perm


def _subset(data: DataLike, n: int) -> DataLike:
    """The first ``n`` examples of ``data`` as a tuple (a DataLoader is read up to ``n``)."""
    xs, ys, got = [], [], 0
    for x, y in as_loader(data, batch_size=min(n, 1024)):
        xs.append(x)
        ys.append(y)
        got += len(y)
        if got >= n:
            break
    if not xs:
        raise DataError("PAM needs a non-empty dataset")
    return torch.cat(xs)[:n], torch.cat(ys)[:n]
