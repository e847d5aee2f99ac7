"""Activation matching (neuron alignment): pair B's units with A's by activation correlation."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..adversarial import PGDConfig, pgd_attack
from ..assign import solve_assignment
from ..errors import ConfigError, DataError, SpecError
from ..evaluation import DataLike, as_loader, model_device, resolve_device, with_state
from ..progress import progress_bar
from ..spec import (
    Permutation,
    PermutationSpec,
    Site,
    apply_permutation,
    identity_permutation,
)
from ..state import check_compatible, check_finite
from .api import first_inputs, register_aligner, resolve_spec

_EPS = 1e-5  # the seed code's z-score guard: z = (a - mean) / (std + eps)


class StreamingCorrelation:
    """Pearson correlation between the units of two activation streams, in bounded memory.

    Rows (examples x spatial positions) arrive in batches; only float64 sums are kept:
    ``sum a``, ``sum b``, ``sum a^2``, ``sum b^2`` and the cross-products ``A^T B`` (``n_a x n_b``).
    Each stream is shifted by the mean of its first batch (covariances do not change, the
    cancellation in ``E[ab] - E[a]E[b]`` does). The correlation is the seed code's
    ``Z_A Z_B^T / N`` with ``z = (a - mean) / (std + eps)`` (population std).

    Example:
        >>> s = StreamingCorrelation(2, 2)
        >>> x = torch.randn(100, 2)
        >>> s.update(x, x.flip(1))
        >>> s.correlation(eps=0).round().tolist()
        [[0.0, 1.0], [1.0, 0.0]]
    """

    def __init__(self, n_a: int, n_b: int, device: torch.device | None = None) -> None:
        dev = device or torch.device("cpu")
        f64 = torch.float64 if dev.type != "mps" else torch.float32
        self.count = 0
        self.shift_a: Tensor | None = None
        self.shift_b: Tensor | None = None
        self.sum_a = torch.zeros(n_a, dtype=f64, device=dev)
        self.sum_b = torch.zeros(n_b, dtype=f64, device=dev)
        self.sq_a = torch.zeros(n_a, dtype=f64, device=dev)
        self.sq_b = torch.zeros(n_b, dtype=f64, device=dev)
        self.cross = torch.zeros(n_a, n_b, dtype=f64, device=dev)

    def update(self, a: Tensor, b: Tensor) -> None:
        """Add rows ``a`` (``rows x n_a``) and ``b`` (``rows x n_b``) observed together."""
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"paired activations have {a.shape[0]} and {b.shape[0]} rows")
        a = a.to(self.cross.device, self.cross.dtype)
        b = b.to(self.cross.device, self.cross.dtype)
        if self.shift_a is None or self.shift_b is None:  # both are set together
            self.shift_a, self.shift_b = a.mean(0), b.mean(0)
        a = a - self.shift_a
        b = b - self.shift_b
        self.count += a.shape[0]
        self.sum_a += a.sum(0)
        self.sum_b += b.sum(0)
        self.sq_a += (a * a).sum(0)
        self.sq_b += (b * b).sum(0)
        self.cross += a.T @ b

    def stds(self) -> tuple[Tensor, Tensor]:
        """Population standard deviations of A's and B's units."""
        n = max(self.count, 1)
        ma, mb = self.sum_a / n, self.sum_b / n
        sa = (self.sq_a / n - ma * ma).clamp_min(0).sqrt()
        sb = (self.sq_b / n - mb * mb).clamp_min(0).sqrt()
        return sa, sb

    def correlation(self, eps: float = _EPS) -> Tensor:
        """``(E[ab] - E[a]E[b]) / ((std_a + eps)(std_b + eps))``, shape ``(n_a, n_b)``, float64."""
        if self.count == 0:
            raise SpecError("no activations were recorded (is the dataset empty?)")
        n = self.count
        ma, mb = self.sum_a / n, self.sum_b / n
        cov = self.cross / n - torch.outer(ma, mb)
        sa, sb = self.stds()
        return cov / torch.outer(sa + eps, sb + eps)


def _units(act: Tensor, site: Site, n: int) -> Tensor:
    """The site's ``n`` units of an activation as rows x units (batch x spatial flattened)."""
    axis = site.axis % act.dim()
    return act.narrow(axis, site.offset, n).movedim(axis, -1).reshape(-1, n)


def _capture(
    model: nn.Module,
    spec: PermutationSpec,
    x: Any,
    nodes: list[str],
    state: dict[str, Tensor] | None = None,
) -> Mapping[str, Tensor]:
    from ..symmetry import capture_sites

    return capture_sites(model, spec, x, nodes=nodes, state=state)


def _batches(
    model_a: nn.Module,
    model_b: nn.Module,
    data: DataLike,
    max_batches: int | None,
    dev: torch.device,
    pgd: PGDConfig | None,
    against: str,
    seed: int,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Inputs for A and for B, batch by batch (PGD examples if asked)."""
    for i, batch in enumerate(as_loader(data, batch_size=256)):
        if max_batches is not None and i >= max_batches:
            return
        x = batch[0] if isinstance(batch, list | tuple) else batch
        x = x.to(dev)
        if pgd is None:
            yield x, x
            continue
        if not isinstance(batch, list | tuple) or len(batch) < 2:
            raise ConfigError("adversarial alignment needs labelled data (inputs, targets)")
        y = batch[1].to(dev)
        kw = pgd.model_dump()  # eps, step, steps, random_start
        xa = pgd_attack(model_a, x, y, seed=seed + i, **kw)
        xb = xa if against == "a" else pgd_attack(model_b, x, y, seed=seed + i, **kw)
        yield xa, xb


def _correlations(
    model_a: nn.Module,
    model_b: nn.Module,
    spec: PermutationSpec,
    groups: list[str],
    batches: Iterator[tuple[Tensor, Tensor]],
    dev: torch.device,
    eps: float,
    advance: Any,
    state_b: dict[str, Tensor] | None = None,
) -> dict[str, _GroupStats]:
    """Summed site correlations ``{group: (n, n)}`` for ``groups`` over one pass of the data
    (B run with ``state_b`` instead of its own weights if given), with constant-unit masks."""
    stats: dict[tuple[str, int], StreamingCorrelation] = {}
    nodes = list(dict.fromkeys(s.node for g in groups for s in spec.sites[g]))
    with torch.no_grad():
        for xa, xb in batches:
            acts_a = _capture(model_a, spec, xa, nodes)
            acts_b = _capture(model_b, spec, xb, nodes, state_b)
            for g in groups:
                size = spec.groups[g]
                for j, site in enumerate(spec.sites[g]):
                    n = size - site.unit_start if site.length is None else site.length
                    if site.node not in acts_a or site.node not in acts_b:
                        raise SpecError(f"site {site.node!r} of group {g!r} was not captured")
                    ua = _units(acts_a[site.node], site, n)
                    ub = _units(acts_b[site.node], site, n)
                    key = (g, j)
                    if key not in stats:
                        stats[key] = StreamingCorrelation(n, n, dev)
                    stats[key].update(ua, ub)
            advance(None)
    out: dict[str, _GroupStats] = {}
    for g in groups:
        size = spec.groups[g]
        corr = torch.zeros(size, size, dtype=torch.float64)
        spread_a = torch.zeros(size, dtype=torch.float64)
        spread_b = torch.zeros(size, dtype=torch.float64)
        for j, site in enumerate(spec.sites[g]):
            lo = site.unit_start
            st = stats[(g, j)]
            c = st.correlation(eps).cpu().double()
            corr[lo : lo + c.shape[0], lo : lo + c.shape[1]] += c
            sa, sb = st.stds()
            spread_a[lo : lo + c.shape[0]] += sa.cpu().double()
            spread_b[lo : lo + c.shape[1]] += sb.cpu().double()
        if not torch.isfinite(corr).all():
            raise DataError(
                f"the activations of group {g!r} at {[s.node for s in spec.sites[g]]} are not "
                "finite on the data (NaN or inf in the inputs, or a model that overflows on them)"
            )
        out[g] = _GroupStats(corr, _constant(spread_a), _constant(spread_b))
    return out


@dataclass
class _GroupStats:
    corr: Tensor  # (n, n) summed site correlations
    const_a: Tensor  # (n,) bool: A's unit is constant over the data at every site (dead ReLU)
    const_b: Tensor


def _constant(spread: Tensor) -> Tensor:
    return spread <= 1e-7 * float(spread.max().clamp_min(1e-30))


def _rematch_constant_units(
    spec: PermutationSpec,
    perm: Permutation,
    stats: Mapping[str, _GroupStats],
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
) -> dict[str, int]:
    """Pair units that are constant in both nets (no correlation to go by) by their weights.

    Positions ``i`` whose A unit and assigned B unit are both constant over the data are tied
    in correlation (all zero); among them, the assignment maximising the weight-matching score
    ``C_g`` (Ainsworth et al. 2023, other groups held at ``perm``) is taken. Returns the number of
    units re-paired per group. Attention groups are left as they are (head structure).
    """
    from .weight import _Problem

    todo = {}
    for g, st in stats.items():
        if g in spec.heads or not spec.slots.get(g):
            continue
        rows = torch.nonzero(st.const_a & st.const_b[perm[g]]).flatten()
        if len(rows) > 1:
            todo[g] = rows
    if not todo:
        return {}
    prob = _Problem(spec, state_a, state_b, torch.device("cpu"), torch.float64)
    for g, rows in todo.items():
        cols = perm[g][rows]
        c = prob.cost(g, perm)[rows][:, cols]
        perm[g] = perm[g].clone()
        perm[g][rows] = cols[solve_assignment(c)]
        prob.invalidate(g)
    return {g: len(r) for g, r in todo.items()}


def activation_matching(
    model_a: nn.Module,
    model_b: nn.Module,
    data: DataLike,
    *,
    spec: PermutationSpec | None = None,
    example_inputs: Any = None,
    max_batches: int | None = None,
    layerwise: bool = False,
    adversarial: PGDConfig | Mapping[str, Any] | None = None,
    adversarial_against: str = "each",
    eps: float = _EPS,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> Permutation:
    """Activation matching / neuron alignment (Li et al., "Convergent Learning", ICLR 2016;
    Tatro et al., "Optimizing Mode Connectivity via Neuron Alignment", NeurIPS 2020).

    Both networks see the same inputs; for every group and every site carrying its units (spec
    ``sites``), the unit axis is flattened over batch x spatial positions and the Pearson
    correlation of A's unit ``i`` with B's unit ``j`` is accumulated in one streaming pass:

        corr_g[i, j] = sum_{sites} (E[a_i b_j] - E[a_i] E[b_j]) / ((std(a_i) + eps)(std(b_j) + eps))

    (a residual stream has several sites: their correlation matrices are summed, one
    permutation for the stream). Each group's permutation maximises ``sum_i corr_g[i, pi(i)]``
    (Hungarian; the seed code's ``linear_sum_assignment(1.01 - corr)``; heads-structured for
    attention groups). Groups without a site fall back to weight matching (Ainsworth et al.
    2023) with the matched groups held fixed; they are listed in ``info["weight_groups"]``. This
    is the case of ``nn.MultiheadAttention``: it computes q, k and v inside one module, so no
    forward tensor carries its head dims and its attention group is weight-matched (heads-
    structured; the residual stream around it is still activation-matched). Attention written
    with separate or fused projection layers has sites and is activation-matched. Units constant
    over the data in both nets (dead ReLUs) correlate with nothing, so every pairing among them
    ties; those ties are broken by the weight-matching score (documented deviation from the seed
    code, which leaves them to the solver's arbitrary order).

    ``layerwise=True`` is REPAIR's formulation (Jordan et al., ICLR 2023): groups in spec
    (forward) order, each measured in its own pass with B already permuted for the earlier
    groups. For an exact symmetry the result is the same (B's function does not change); it keeps
    the statistics of one group in memory at a time. ``adversarial`` aligns robust models on
    PGD-ℓ∞ examples (Tatro et al.): generated against each model (``adversarial_against="each"``,
    the seed code) or against A only (``"a"``).

    Args:
        model_a: reference network (not modified; its train/eval mode is restored).
        model_b: network to align (not modified).
        data: DataLoader, Dataset or ``(inputs, targets)``; no augmentation is applied.
        spec: permutation spec with sites (default: ``mc.infer_spec(model_a, first batch)``).
        example_inputs: inputs for tracing the spec (default: the first batch of ``data``).
        max_batches: use only the first batches.
        layerwise: REPAIR's layer-by-layer variant (see above).
        adversarial: PGD settings (``mc.PGDConfig`` or dict with ``eps``, ``step``, ``steps``).
        adversarial_against: ``"each"`` or ``"a"``.
        eps: z-score guard.
        seed: seed of the PGD random starts.
        device: where to run (default: A's device).
        progress: show a progress bar over batches.

    Returns:
        A :class:`Permutation` mapping B onto A; ``info`` has ``mean_corr_before`` and
        ``mean_corr_after`` (mean diagonal correlation per group), ``weight_groups`` (groups
        aligned by the weight fallback) and ``constant_units_rematched`` (per group).

    Example:
        >>> import torch, modeconn as mc
        >>> a = mc.models.create("mlp", input_shape=(40,), width=16)
        >>> b = mc.models.create("mlp", input_shape=(40,), width=16)
        >>> x, y = torch.randn(64, 40), torch.randint(0, 10, (64,))
        >>> p = activation_matching(a, b, (x, y))
        >>> sorted(p) == sorted(mc.infer_spec(a, x).groups)
        True
    """
    check_compatible([model_a.state_dict(), model_b.state_dict()], ["model A", "model B"])
    check_finite(model_a.state_dict(), "model A")
    check_finite(model_b.state_dict(), "model B")
    if adversarial_against not in ("each", "a"):
        raise ConfigError(f"adversarial_against must be 'each' or 'a', got {adversarial_against!r}")
    if max_batches is not None and max_batches < 1:
        raise ConfigError(f"max_batches must be >= 1 (or None for all data), got {max_batches}")
    pgd = PGDConfig.coerce(adversarial) if adversarial is not None else None
    dev = resolve_device(device) if device is not None else model_device(model_a)
    if example_inputs is None and spec is None:
        example_inputs = first_inputs(data)
    spec = resolve_spec(model_a, spec, data=data, example_inputs=example_inputs)
    spec.check(model_a.state_dict())
    site_groups = [g for g in spec.groups if spec.sites.get(g)]
    if not site_groups:
        raise SpecError(
            "the permutation spec has no sites (forward tensors) to measure activations at; "
            "use mc.infer_spec(model, inputs) or method='weight'"
        )

    ma, mb = _on_device(model_a, dev), _on_device(model_b, dev)
    modes = (model_a.training, model_b.training)
    ma.eval()
    mb.eval()
    state_b = mb.state_dict()
    n_batches = _count(data, max_batches)
    total = n_batches * (len(site_groups) if layerwise else 1)
    try:
        with progress_bar(progress, total=total, description="activation matching") as advance:

            def batches(m_b: nn.Module) -> Iterator[tuple[Tensor, Tensor]]:
                return _batches(ma, m_b, data, max_batches, dev, pgd, adversarial_against, seed)

            if not layerwise:
                stats = _correlations(ma, mb, spec, site_groups, batches(mb), dev, eps, advance)
                perm = identity_permutation(spec)
                for g in site_groups:
                    perm[g] = _solve(spec, g, stats[g].corr)
            else:
                perm = identity_permutation(spec)
                stats = {}
                for g in site_groups:
                    st = apply_permutation(spec, perm, state_b)  # B permuted for earlier groups
                    mb_g = with_state(mb, st).eval() if pgd is not None else mb
                    stats[g] = _correlations(
                        ma, mb, spec, [g], batches(mb_g), dev, eps, advance, state_b=st
                    )[g]
                    perm[g] = _solve(spec, g, stats[g].corr)
    finally:
        model_a.train(modes[0])
        model_b.train(modes[1])

    sa_cpu = {k: v.detach().cpu() for k, v in model_a.state_dict().items()}
    sb_cpu = {k: v.detach().cpu() for k, v in model_b.state_dict().items()}
    rematched = _rematch_constant_units(spec, perm, stats, sa_cpu, sb_cpu)
    rest = [g for g in spec.groups if g not in site_groups and spec.slots.get(g)]
    if rest:
        from .weight import weight_matching

        partial = apply_permutation(spec, perm, sb_cpu)
        sub = PermutationSpec(
            groups={g: spec.groups[g] for g in rest},
            slots={g: spec.slots[g] for g in rest},
            heads={g: h for g, h in spec.heads.items() if g in rest},
        )
        wm = weight_matching(sub, sa_cpu, partial, seed=seed)
        perm.update({g: wm[g] for g in rest})

    before = {g: float(torch.diagonal(st.corr).mean()) for g, st in stats.items()}
    after = {
        g: float(st.corr[torch.arange(len(st.corr)), perm[g]].mean()) for g, st in stats.items()
    }
    return Permutation(
        perm,
        info={
            "method": "activation",
            "layerwise": layerwise,
            "adversarial": pgd.model_dump() if pgd is not None else None,
            "mean_corr_before": before,
            "mean_corr_after": after,
            "weight_groups": rest,
            "constant_units_rematched": rematched,
        },
    )


def _solve(spec: PermutationSpec, g: str, corr: Tensor) -> Tensor:
    """Maximise the trace of the permuted correlation (seed code: ``lsa(1.01 - corr)``)."""
    from .weight import block_mask, masked

    return solve_assignment(masked(corr, block_mask(spec, g)), spec.heads.get(g))


def _on_device(model: nn.Module, dev: torch.device) -> nn.Module:
    """``model`` itself if it already lives on ``dev``, else a copy moved there."""
    if model_device(model) == dev:
        return model
    return copy.deepcopy(model).to(dev)


def _count(data: DataLike, max_batches: int | None) -> int:
    try:
        n = len(as_loader(data, batch_size=256))
    except TypeError:
        n = max_batches or 0
    return min(n, max_batches) if max_batches is not None else n


@register_aligner("activation")
def _activation_aligner(
    model_a: nn.Module, model_b: nn.Module, data: DataLike, spec: PermutationSpec, **kwargs: Any
) -> Permutation:
    if data is None:
        raise ConfigError("method 'activation' needs data (--data SOURCE / data=...)")
    return activation_matching(model_a, model_b, data, spec=spec, **kwargs)
