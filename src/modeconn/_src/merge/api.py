"""``merge()``: validate the inputs, optionally align the models, run a method, repair BatchNorm."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..evaluation import DataLike, resolve_device, with_state
from ..spec import PermutationSpec, apply_permutation
from ..state import check_compatible, check_finite
from .base import MergeInputs, MergeMethod, get_method, is_per_model_data, method_names


class MergedState(dict[str, Tensor]):  # with a .info side channel
    """The merged ``{name: Tensor}`` state dict; ``info`` records how it was made.

    ``info`` holds ``method``, ``params``, ``weights``, ``aligned`` (the alignment method or
    ``None``) and whatever the method measured (``soup`` members, ``regmean_layers``, ...).
    """

    def __init__(self, *args: Any, info: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.info: dict[str, Any] = dict(info or {})


def merge_methods() -> list[str]:
    """Names of the registered merge methods.

    Example:
        >>> merge_methods()[:2]
        ['average', 'soup']
    """
    return method_names()


def _as_state(x: Any, name: str) -> dict[str, Tensor]:
    if isinstance(x, nn.Module):
        return {k: v.detach() for k, v in x.state_dict().items()}
    state = dict(x) if isinstance(x, Mapping) else None  # reads a lazy state once
    if state is None or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(
            f"{name} is a {type(x).__name__}; give a state dict (name -> Tensor) or a module"
        )
    return state


def merge(
    states: Sequence[Mapping[str, Tensor] | nn.Module],
    *,
    method: str = "average",
    weights: Sequence[float] | None = None,
    base: Mapping[str, Tensor] | nn.Module | None = None,
    model: nn.Module | None = None,
    data: DataLike | list[DataLike] | None = None,
    align: str | None = None,
    align_options: Mapping[str, Any] | None = None,
    spec: PermutationSpec | None = None,
    reset_bn: bool = False,
    repair: bool = False,
    bn_data: DataLike | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    **params: Any,
) -> MergedState:
    """Merge several models of one architecture into one, with any registered method.

    Methods (:func:`merge_methods`; each docstring has its paper and formula): ``average``
    (weighted/uniform soup), ``soup`` (greedy soup, Wortsman et al. 2022), ``fisher`` (Matena &
    Raffel 2022), ``regmean`` (Jin et al. 2023), ``task_arithmetic`` (Ilharco et al. 2023),
    ``ties`` (Yadav et al. 2023), ``dare`` (Yu et al. 2024), ``slerp`` (two models).

    Pipeline: validate (same keys/shapes/dtypes, finite) -> align (optional) -> merge -> BN reset
    / REPAIR (optional). In every method non-floating tensors (``num_batches_tracked``) come from
    the first model, BatchNorm running statistics are the weighted mean, dtypes are kept.

    Alignment (``align="weight"|"activation"|...``, Ainsworth et al. 2023): with a ``base`` every
    model is permuted onto the base; else with two models B onto A; with more, weight matching
    uses merge-many (each model matched to the running average of the others, Git Re-Basin) and
    other aligners match each model onto the first. Models fine-tuned from one ``base`` already
    share its unit order, so alignment is usually unnecessary for task arithmetic/TIES/DARE;
    independently trained models need it. Order matters where a reference is taken (the first
    model) and for DARE (model ``i`` gets the ``i``-th drop mask); the other methods are symmetric
    in their inputs.

    Args:
        states: the models' state dicts (or modules); not modified.
        method: a registered method name.
        weights: per-model coefficients (methods that take them; normalised by their sum
            where the method says so).
        base: the pretrained state task vectors are taken from (task arithmetic, TIES, DARE).
        model: a module of the states' architecture (data-dependent methods, alignment, BN reset).
        data: data for data-dependent methods, alignment and BN reset: a DataLoader, Dataset or
            ``(inputs, targets)``, or a list with one per model (Fisher/RegMean use each model's
            own). For ``soup`` it is the held-out set.
        align: alignment method name applied before merging (``None``: no alignment).
        align_options: keyword arguments for the aligner (e.g. ``{"seed": 1}``).
        spec: the permutation spec (default: ``mc.infer_spec(model, data's first batch)``).
        reset_bn: recompute BatchNorm statistics of the merged model on ``bn_data or data``.
        repair: REPAIR (Jordan et al. 2023) the merged model (two models only).
        bn_data: data for the BN reset / REPAIR (default: ``data``).
        device: where data-dependent passes and the merge run (default: where the states are);
            the result is returned on the first state's device.
        progress: draw progress bars.
        **params: the method's parameters (e.g. ``density=0.2`` for ``ties``); unknown ones are
            refused.

    Returns:
        A :class:`MergedState` (a state dict with ``.info``).

    Example:
        >>> a = {"w": torch.tensor([0.0, 2.0])}; b = {"w": torch.tensor([2.0, 4.0])}
        >>> merge([a, b])["w"].tolist()
        [1.0, 3.0]
        >>> merge([a, b], method="average", weights=[3, 1])["w"].tolist()
        [0.5, 2.5]
    """
    m = get_method(method)
    if isinstance(states, Mapping | nn.Module) or not isinstance(states, Sequence):
        raise ConfigError("states must be a list of state dicts (or modules), one per model")
    sts = [_as_state(s, f"model {i}") for i, s in enumerate(states)]
    n = len(sts)
    m.check_count(n)
    p = m.parameters(**params)
    w = _check_weights(m, weights, n)
    base_state = _as_state(base, "base") if base is not None else None
    if m.needs_base and base_state is None:
        raise ConfigError(
            f"method {m.name!r} merges task vectors: pass base= (the pretrained model)"
        )
    if base_state is not None and not m.needs_base:
        raise ConfigError(
            f"method {m.name!r} does not use base=; task-vector methods are: "
            f"{', '.join(n_ for n_ in method_names() if get_method(n_).needs_base)}"
        )
    names = [f"model {i}" for i in range(n)]
    check_compatible([*sts, base_state] if base_state is not None else sts,
                     [*names, "base"] if base_state is not None else names)
    for s, name in zip(sts, names, strict=True):
        check_finite(s, name)
    if base_state is not None:
        check_finite(base_state, "base")
    needs_model = m.needs_data or align is not None or reset_bn or repair
    if needs_model and model is None:
        what = f"method {m.name!r}" if m.needs_data else ("align=" if align else "reset_bn/repair")
        raise ConfigError(f"{what} needs model= (a module of the states' architecture)")
    if model is not None:
        check_compatible([sts[0], _as_state(model, "model")], ["model 0", "model="])
    if m.needs_data and data is None:
        raise ConfigError(f"method {m.name!r} needs data= (a DataLoader, Dataset or (x, y))")
    if is_per_model_data(data) and len(data) != n:  # type: ignore[arg-type]
        raise ConfigError(f"data has {len(data)} entries but there are {n} models")  # type: ignore[arg-type]
    if m.name == "soup" and is_per_model_data(data):
        raise ConfigError("soup needs one held-out data set, not one per model")
    if (reset_bn or repair) and bn_data is None and (data is None or is_per_model_data(data)):
        raise ConfigError(
            "reset_bn/repair need bn_data= (or one data= source) to measure statistics"
        )
    if repair and n != 2:
        raise ConfigError(f"repair applies to merges of two models, got {n}; use reset_bn instead")

    dev = resolve_device(device) if device is not None else None
    out_device = next(iter(sts[0].values())).device if sts[0] else torch.device("cpu")
    if dev is not None:
        sts = [{k: v.to(dev) for k, v in s.items()} for s in sts]
        base_state = {k: v.to(dev) for k, v in base_state.items()} if base_state else None

    info: dict[str, Any] = {"method": m.name, "params": p.model_dump(), "weights": w,
                            "aligned": align}
    if align is not None:
        sts = _align(sts, base_state, align, dict(align_options or {}), spec, model, data, info,
                     progress)

    inputs = MergeInputs(weights=w, base=base_state, model=model, data=data, device=dev,
                         progress=progress, info=info)
    merged = m.run(sts, p, inputs)
    for k, t in sts[0].items():  # step counters etc. always come from the first model
        if not t.is_floating_point():
            merged[k] = t.clone()

    if repair or reset_bn:
        merged = _renormalize(merged, sts, m, p, w, model, bn_data if bn_data is not None else data,
                              repair, dev, progress, info)
    return MergedState({k: v.to(out_device) for k, v in merged.items()}, info=info)


def _check_weights(m: MergeMethod, weights: Sequence[float] | None, n: int) -> list[float] | None:
    if weights is None:
        return None
    if not m.weighted:
        raise ConfigError(f"method {m.name!r} takes no weights")
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ConfigError(f"got {len(w)} weights for {n} models; give one weight per model")
    if not all(math.isfinite(x) for x in w):
        raise ConfigError(f"merge weights must be finite numbers, got {w}")
    return w


def _align(
    sts: list[dict[str, Tensor]],
    base: dict[str, Tensor] | None,
    method: str,
    options: dict[str, Any],
    spec: PermutationSpec | None,
    model: nn.Module | None,
    data: Any,
    info: dict[str, Any],
    progress: bool,
) -> list[dict[str, Tensor]]:
    """Permute the models into one unit order (see :func:`merge`)."""
    from ..align import get_aligner, merge_many
    from ..align.api import resolve_spec

    assert model is not None
    one_data = data[0] if is_per_model_data(data) else data
    aligner = get_aligner(method)
    spec = resolve_spec(model, spec, data=one_data)
    if base is None and len(sts) > 2 and method == "weight":
        perms = merge_many(spec, sts, progress=progress, **options)
        info["alignment"] = dict(perms[0].info)
        return [apply_permutation(spec, pm, s) for pm, s in zip(perms, sts, strict=True)]
    ref = base if base is not None else sts[0]
    ref_model = with_state(model, ref)
    out = [] if base is not None else [sts[0]]
    for s in sts[len(out):]:
        perm = aligner(ref_model, with_state(model, s), one_data, spec, **options)
        out.append(apply_permutation(spec, perm, s))
    info["alignment"] = {"reference": "base" if base is not None else "model 0"}
    return out


def _renormalize(
    merged: dict[str, Tensor],
    sts: list[dict[str, Tensor]],
    m: MergeMethod,
    p: Any,
    w: list[float] | None,
    model: nn.Module | None,
    data: Any,
    repair: bool,
    dev: torch.device | None,
    progress: bool,
    info: dict[str, Any],
) -> dict[str, Tensor]:
    """BN reset (Ainsworth et al. 2023) and/or REPAIR (Jordan et al. 2023) of the merged state."""
    from ..norm import repair as repair_fn
    from ..norm import reset_bn_state

    assert model is not None
    if repair:
        if hasattr(p, "t"):
            alpha = float(p.t)
        elif w is not None and sum(w) != 0:
            alpha = w[1] / sum(w)
        else:
            alpha = 0.5
        fixed = repair_fn(with_state(model, sts[0]), with_state(model, sts[1]),
                          with_state(model, merged), data, alpha=alpha, device=dev,
                          progress=progress)
        info["repaired"] = list(getattr(fixed, "modeconn_repaired", []))
        return {k: v.detach() for k, v in fixed.state_dict().items()}
    info["bn_reset"] = True
    return reset_bn_state(model, merged, data, device=dev)
