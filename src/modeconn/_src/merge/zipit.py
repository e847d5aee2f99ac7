"""ZipIt! (Stoica et al., 2023): merge by matching features within and across models.

Stoica, Bolya, Bjorner, Ramesh, Hearn & Hoffman, "ZipIt! Merging Models from Different Tasks
without Training", ICLR 2024 (arXiv 2023; code: gstoica27/ZipIt). For every permutation group
(a layer's features), the N models' ``N·n`` features are run on the same inputs and their
correlation matrix ``C`` (``N·n x N·n``, summed over the group's sites) is computed. Greedy
matching then repeatedly merges the two most correlated clusters until ``n`` remain: pairs may
come from one model ("same-model merges", limited to ``beta·(N·n − n)/N`` per model) or from two;
a merged cluster's similarity to the others is ``alpha·min`` of its members' (``alpha = 0``: it
merges no further). With ``U`` (``N·n x n``, ``U[f, k] = 1`` if feature ``f`` is in cluster
``k``) the **merge** matrix is ``M = (U / colsum U)ᵀ`` (a merged feature is its members' mean)
and the **unmerge** matrix is ``U`` (each feature is approximated by its cluster's). Model ``m``'s
blocks ``M_m`` (``n x n``) and ``U_m`` zip every layer: an axis that *produces* the group's
features gets ``M_m`` and an axis that *consumes* them gets ``U_mᵀ``,

    W* = sum_m M_m^out · W_m · U_m^in            (bias: b* = sum_m M_m b_m),

and tensors without a producing axis (the classifier) are averaged, ``(1/N)·sum_m W_m U_m``.
Which axis consumes: axis 1 of ``nn.Linear``/``nn.Conv*`` weights, axis 0 of ``ConvTranspose``;
every other tensor produces. BatchNorm statistics are zipped like the weights; pass
``reset_bn=True`` to recompute them. Partial zipping (stopping at a layer) is not implemented.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from ..errors import ConfigError, DataError
from ..evaluation import model_device, resolve_device
from ..progress import progress_bar
from ..spec import PermutationSpec, Slot, unit_classes
from .base import MergeInputs, MergeMethod, Params, State, examples, is_per_model_data, n_batches

_CONSUMES_AXIS1 = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONSUMES_AXIS0 = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class ZipItParams(Params):
    """Parameters of :class:`ZipItMerge`."""

    alpha: float = Field(0.3, ge=0.0, le=1.0,
                         description="similarity scale of a merged cluster (0: merges no further)")
    beta: float = Field(0.125, ge=0.0, le=1.0,
                        description="same-model merges allowed per model, as a fraction of "
                                    "(N·n − n)/N")
    n_examples: int | None = Field(None, gt=0, description="use only the first n examples")
    batch_size: int = Field(256, gt=0, description="batch size for a Dataset/tuple")
    eps: float = Field(1e-8, ge=0.0, description="added to standard deviations")


def zip_matching(corr: Tensor, n_models: int, *, alpha: float = 0.3, beta: float = 0.125,
                 labels: Tensor | None = None) -> Tensor:
    """ZipIt!'s greedy matching: the unmerge matrix ``U`` (``N·n x n``, 0/1) of one group.

    Repeatedly merges the two active clusters of highest similarity (initially ``corr``, the
    diagonal excluded); the merged cluster's similarity to every other is ``alpha · min`` of its
    two parts' (``alpha = 0``: it merges no further). A merge of two clusters that both hold
    features of model ``m`` is a same-model merge charged to ``m``'s budget
    ``floor(beta · (N·n − n) / N)``; once spent, no two clusters holding ``m`` merge. Should the
    budget leave no pair (possible for N > 2), the two clusters of highest mean correlation
    merge regardless.

    Args:
        corr: ``(N·n, N·n)`` feature correlations, model ``m``'s features at rows
            ``m·n .. (m+1)·n − 1``.
        n_models: ``N``.
        alpha: similarity scale of a merged cluster.
        beta: same-model budget per model, as a fraction of ``(N·n − n) / N``.
        labels: per-unit classes (``unit_classes``); features of different classes never merge.

    Returns:
        ``U`` (float64): ``U[f, k] = 1`` if feature ``f`` belongs to merged feature ``k``
        (clusters ordered by their first feature).

    Example:
        >>> c = torch.tensor([[1, .2, .9, .1], [.2, 1, .1, .8], [.9, .1, 1, .3], [.1, .8, .3, 1]])
        >>> zip_matching(c.double(), 2).tolist()
        [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]
    """
    total = corr.shape[0]
    n = total // n_models
    lab = labels.repeat(n_models) if labels is not None else torch.zeros(total, dtype=torch.long)
    other_class = lab[:, None] != lab[None, :]
    sims = corr.double().masked_fill(other_class, -torch.inf)
    sims.fill_diagonal_(-torch.inf)
    raw = corr.double().masked_fill(other_class, -torch.inf)
    holds = torch.zeros(total, n_models, dtype=torch.bool)  # cluster k holds model m's features
    holds[torch.arange(total), torch.arange(total) // n] = True
    members: list[list[int]] = [[f] for f in range(total)]
    active = torch.ones(total, dtype=torch.bool)
    budget = [int((total - n) // n_models * beta + 1e-4)] * n_models
    spent = {m for m in range(n_models) if budget[m] <= 0}
    _forbid(sims, holds, active, spent, None)
    for _ in range(total - n):
        flat = int(sims.argmax())
        i, j = divmod(flat, total)
        if not torch.isfinite(sims[i, j]):  # the budget left no pair: the best mean correlation
            i, j = _fallback(raw, members, active)
        i, j = min(i, j), max(i, j)
        shared = (holds[i] & holds[j]).nonzero().flatten().tolist()
        members[i] += members[j]
        holds[i] |= holds[j]
        active[j] = False
        merged = torch.minimum(sims[i], sims[j])
        merged = merged * alpha if alpha > 0 else torch.full_like(merged, -torch.inf)
        sims[i], sims[:, i] = merged, merged
        sims[j], sims[:, j] = -torch.inf, -torch.inf
        sims[i, i] = -torch.inf
        for m in shared:
            budget[m] -= 1
            if budget[m] <= 0:
                spent.add(m)
        _forbid(sims, holds, active, spent, None if shared else i)
    clusters = [members[k] for k in range(total) if active[k]]
    u = torch.zeros(total, len(clusters), dtype=torch.float64)
    for k, fs in enumerate(clusters):
        u[fs, k] = 1.0
    return u


def _forbid(sims: Tensor, holds: Tensor, active: Tensor, spent: set[int],
            only: int | None) -> None:
    """No merges between two clusters that both hold a model whose budget is spent (for all
    clusters, or only for the changed cluster ``only``)."""
    for m in spent:
        sel = holds[:, m] & active
        if only is None:
            sims[sel[:, None] & sel[None, :]] = -torch.inf
        elif sel[only]:
            sims[only, sel] = -torch.inf
            sims[sel, only] = -torch.inf


def _fallback(raw: Tensor, members: list[list[int]], active: Tensor) -> tuple[int, int]:
    """The two active clusters with the highest mean correlation (any origin)."""
    idx = torch.nonzero(active).flatten()
    u = torch.zeros(raw.shape[0], len(idx), dtype=torch.float64)
    for c, k in enumerate(idx.tolist()):
        u[members[k], c] = 1.0
    size = u.sum(0)
    mean = u.T @ raw.clamp_min(-1e6) @ u / torch.outer(size, size)
    mean = mean.masked_fill(mean < -1e3, -torch.inf)  # a pair of different unit classes
    mean.fill_diagonal_(-torch.inf)
    flat = int(mean.argmax())
    a, b = divmod(flat, len(idx))
    if not torch.isfinite(mean[a, b]):
        raise DataError("zipit: no two features may be merged (their unit classes differ)")
    return int(idx[a]), int(idx[b])


def _roles(spec: PermutationSpec, model: nn.Module) -> tuple[PermutationSpec, PermutationSpec]:
    """Split the spec's slots into those that produce a group's features and those that consume."""
    prod: dict[str, list[Slot]] = {g: [] for g in spec.groups}
    cons: dict[str, list[Slot]] = {g: [] for g in spec.groups}
    ndims = {k: v.dim() for k, v in model.state_dict().items()}
    for g, slots in spec.slots.items():
        for s in slots:
            path, _, leaf = s.param.rpartition(".")
            try:
                mod = model.get_submodule(path)
            except AttributeError:
                mod = None
            conv = isinstance(mod, _CONSUMES_AXIS1 + _CONSUMES_AXIS0)
            if conv and getattr(mod, "groups", 1) != 1:
                raise ConfigError(f"zipit cannot zip the grouped convolution {path!r}")
            consumes = leaf == "weight" and (
                (isinstance(mod, _CONSUMES_AXIS1) and s.axis == 1)
                or (isinstance(mod, _CONSUMES_AXIS0) and s.axis == 0)
            )
            known = isinstance(mod, _CONSUMES_AXIS1 + _CONSUMES_AXIS0 + (nn.Embedding,))
            if ndims[s.param] >= 2 and not known:
                raise ConfigError(
                    f"zipit cannot tell which axis of {s.param!r} ({type(mod).__name__}) consumes "
                    "features; it zips Linear, Conv, ConvTranspose, Embedding and norm layers"
                )
            (cons if consumes else prod)[g].append(s)
    return (PermutationSpec(dict(spec.groups), {g: tuple(v) for g, v in prod.items()}),
            PermutationSpec(dict(spec.groups), {g: tuple(v) for g, v in cons.items()}))


def _correlations(spec: PermutationSpec, model: nn.Module, states: Sequence[Mapping[str, Tensor]],
                  data: Any, p: ZipItParams, dev: torch.device | None, progress: bool,
                  ) -> dict[str, Tensor]:
    """``{group: (N·n, N·n) correlation}`` of the N models' features, summed over sites."""
    from ..align.activation import StreamingCorrelation, _units
    from ..symmetry import capture_sites

    groups = [g for g, n in spec.groups.items() if n > 1]
    missing = [g for g in groups if not spec.sites.get(g)]
    if missing:
        raise ConfigError(f"zipit needs forward sites for every group; {missing} have none")
    nodes = list(dict.fromkeys(s.node for g in groups for s in spec.sites[g]))
    stats: dict[tuple[str, int], StreamingCorrelation] = {}
    run = [{k: v.to(dev) for k, v in s.items()} if dev is not None else dict(s) for s in states]
    was = model.training
    model.eval()
    try:
        total = n_batches(data, p.batch_size, p.n_examples)
        with progress_bar(progress, total=total, description="zipit") as advance:
            for x, _ in examples(data, p.batch_size, p.n_examples):
                x = x.to(dev) if dev is not None else x
                acts = [capture_sites(model, spec, x, nodes=nodes, state=s) for s in run]
                for g in groups:
                    for j, site in enumerate(spec.sites[g]):
                        n = spec.groups[g] - site.unit_start if site.length is None else site.length
                        feats = torch.cat([_units(a[site.node], site, n) for a in acts], dim=1)
                        key = (g, j)
                        if key not in stats:
                            stats[key] = StreamingCorrelation(feats.shape[1], feats.shape[1],
                                                              feats.device)
                        stats[key].update(feats, feats)
                advance(None)
    finally:
        model.train(was)
    out: dict[str, Tensor] = {}
    big = len(states)
    for g in groups:
        size = spec.groups[g]
        corr = torch.zeros(big * size, big * size, dtype=torch.float64)
        for j, site in enumerate(spec.sites[g]):
            st = stats[(g, j)]
            c = st.correlation(p.eps).cpu().double()
            sd = st.stds()[0].cpu().double()
            n = c.shape[0] // big
            const = sd <= 1e-12 * (1 + sd.max())
            # two constant features (dead units) are interchangeable: merging them is exact;
            # across models first (so copies of one model zip to that model)
            owner = torch.arange(c.shape[0]) // n
            both = const[:, None] & const[None, :]
            c[both] = 1.0 - 1e-9
            c[both & (owner[:, None] != owner[None, :])] = 1.0
            idx = torch.cat([torch.arange(n) + site.unit_start + m * size for m in range(big)])
            corr[idx[:, None], idx[None, :]] += c
        if not torch.isfinite(corr).all():
            raise DataError(f"zipit: the features of group {g!r} are not finite on the data")
        out[g] = corr
    return out


class ZipItMerge(MergeMethod):
    """ZipIt! (Stoica et al., 2023): zip features matched within and across models.

    ``W* = sum_m M_m^out W_m U_m^in`` with ZipIt!'s greedy merge/unmerge matrices (module
    docstring). Needs ``model=`` and one ``data=`` source (the same inputs for every model).
    ``MergedState.info["zipit"]`` records, per group, how many merged features hold units of
    one model only (``one_model``), how many span models (``cross_model``) and how many merges
    joined two units of one model (``same_model_merges``).
    """

    Params = ZipItParams
    needs_data = True
    weighted = False
    min_models = 2

    def run(self, states: Sequence[Mapping[str, Tensor]], params: Any,
            inputs: MergeInputs) -> State:
        from ..align.api import resolve_spec
        from ..align.sinkhorn import soft_apply

        assert inputs.model is not None
        if is_per_model_data(inputs.data):
            raise ConfigError("zipit runs every model on the same inputs: give one data= source")
        dev = resolve_device(inputs.device) if inputs.device is not None else None
        model = inputs.model
        if dev is not None and model_device(model) != dev:
            model = copy.deepcopy(model).to(dev)  # never move the caller's module
        spec = resolve_spec(model, None, data=inputs.data)
        if spec.heads:
            raise ConfigError("zipit does not zip attention heads; use align= with average")
        produce, consume = _roles(spec, model)
        corr = _correlations(spec, model, states, inputs.data, params, dev, inputs.progress)
        big = len(states)
        maps_m: list[dict[str, Tensor]] = [{} for _ in states]
        maps_u: list[dict[str, Tensor]] = [{} for _ in states]
        report: dict[str, dict[str, int]] = {}
        for g, size in spec.groups.items():
            if g not in corr:
                for m in range(big):
                    maps_m[m][g] = torch.eye(size, dtype=torch.float64) / big
                    maps_u[m][g] = torch.eye(size, dtype=torch.float64)
                continue
            u = zip_matching(corr[g], big, alpha=params.alpha, beta=params.beta,
                             labels=unit_classes(spec, g))
            merge = (u / u.sum(0, keepdim=True)).T
            for m in range(big):
                rows = slice(m * size, (m + 1) * size)
                maps_m[m][g] = merge[:, rows]
                maps_u[m][g] = u[rows].T
            per_model = u.view(big, size, -1).sum(1)  # (models, clusters): features of each
            owners = (per_model > 0).sum(0)
            report[g] = {"one_model": int((owners == 1).sum()),
                         "cross_model": int((owners > 1).sum()),
                         "same_model_merges": int((per_model - 1).clamp_min(0).sum())}
        inputs.info["zipit"] = report
        produced = {s.param for slots in produce.slots.values() for s in slots}
        out: State = {}
        acc: dict[str, Tensor] = {}
        for m, s in enumerate(states):
            s64 = {k: v.detach().to("cpu", torch.float64) for k, v in s.items()
                   if v.is_floating_point()}
            zipped = soft_apply(consume, maps_u[m], soft_apply(produce, maps_m[m], s64))
            for k, v in zipped.items():
                w = 1.0 if k in produced else 1.0 / big
                acc[k] = acc[k] + w * v if k in acc else w * v
        for k, v in states[0].items():
            out[k] = acc[k].to(v.dtype).to(v.device) if k in acc else v.clone()
        return out
