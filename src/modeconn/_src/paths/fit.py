"""Training low-loss curves between two networks (Garipov et al. 2018), for any architecture.

The curve is a module ``curve(t) -> {parameter name: tensor}`` (a :class:`CurveParametrization`);
the network is run on θ(t) with ``torch.func.functional_call``, so no layer needs a curve twin.

Extension points (used by ``paths.pam`` and adversarial curve training):

- ``curve=``: any :class:`CurveParametrization` subclass — reparametrise θ(t) (e.g. PAM's
  ``θ_1 = ½θ_A + ½P(θ_B) + δ``) and add trainable tensors; every ``curve.parameters()`` with
  ``requires_grad`` is optimised and checkpointed with ``curve.state_dict()``.
- ``input_transform(model_fn, x, y) -> x``: replaces each minibatch's inputs, e.g. PGD examples
  (``mc.pgd_attack(model_fn, x, y, ...)``); ``model_fn`` is an ``nn.Module`` computing the logits
  of θ(t) with detached weights (train mode; its mode is restored afterwards).
- ``after_step(curve, optimizer)``: runs after each optimizer step (e.g. a proximal step and a
  projection onto doubly stochastic matrices).
- ``lr_schedule(epoch, epochs) -> factor`` and ``callback(epoch, record)`` (after each epoch's
  checkpoint; raising from it interrupts training, which ``resume=True`` continues).
"""

from __future__ import annotations

import abc
import copy
import io
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path as FsPath
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError, NonFiniteError
from ..evaluation import DataLike, as_loader, model_device, resolve_device
from ..io import atomic_write
from ..progress import progress_bar
from ..state import check_compatible, lerp
from .base import REGISTRY, Path
from .curves import COEFFICIENTS

State = dict[str, Tensor]
CHECKPOINT_NAME = "fit_state.pt"
InputTransform = Callable[[nn.Module, Tensor, Tensor], Tensor]


def garipov_schedule(epoch: int, epochs: int) -> float:
    """Learning-rate factor of Garipov et al. 2018 (``train.py``'s ``learning_rate_schedule``).

    With ``α = epoch / epochs``: 1 for α ≤ 0.5, then linear down to 0.01 at α = 0.9, then 0.01.

    Example:
        >>> [round(garipov_schedule(e, 10), 4) for e in (0, 5, 7, 9)]
        [1.0, 1.0, 0.505, 0.01]
    """
    alpha = epoch / max(epochs, 1)
    if alpha <= 0.5:
        return 1.0
    if alpha <= 0.9:
        return 1.0 - (alpha - 0.5) / 0.4 * 0.99
    return 0.01


class CurveParametrization(nn.Module, abc.ABC):
    """θ(t) for a model's trainable parameters, as a module whose parameters are trained.

    Subclasses implement :meth:`forward` (differentiable in their parameters) and
    :meth:`to_path`; ``param_names`` lists the model parameters ``forward`` returns.
    """

    param_names: list[str]

    @abc.abstractmethod
    def forward(self, t: float) -> dict[str, Tensor]:
        """The model's parameters at ``t`` (``{name: tensor}``, differentiable)."""

    @abc.abstractmethod
    def to_path(self, meta: dict[str, Any] | None = None) -> Path:
        """The trained curve as a :class:`Path` (complete state dicts, on CPU)."""

    def draw(self, generator: torch.Generator) -> Any:
        """The position trained on the next minibatch: ``t ~ U(0, 1)`` (Garipov et al. 2018).

        Override to sample elsewhere (e.g. barycentric coordinates of a simplex, Dirichlet(1)).
        """
        return float(torch.rand((), generator=generator, dtype=torch.float64))

    def penalty(self) -> Tensor | float:
        """A regulariser added to every minibatch's loss (default 0; e.g. a volume term)."""
        return 0.0


class ControlPointCurve(CurveParametrization):
    """A Bezier curve or polygonal chain with trainable control points (Garipov et al. 2018).

    θ(t) = Σ_i c_i(t) θ_i with Bernstein (``kind="bezier"``) or hat (``"polychain"``)
    coefficients. Each point's parameters are stored as one flat vector, so θ(t) costs
    ``num_points`` fused multiply-adds over the parameter vector. Buffers (BatchNorm statistics)
    are not trained; the returned path carries the points' initial buffers. Frozen parameters
    (``frozen_names``, e.g. ``requires_grad=False`` in the model) are not trained either, but
    θ(t) contains their interpolation ``Σ_i c_i(t) θ_i`` (what ``path.state(t)`` gives them), so
    the network trained at t is the network evaluated at t.

    Args:
        kind: ``"bezier"`` or ``"polychain"``.
        points: initial state dicts ``[θ_A, bend_1, ..., θ_B]``.
        param_names: the model's trainable parameter names (``model.named_parameters()``).
        aliases: extra state-dict keys that are tied to a parameter (``{alias: parameter}``).
        fix_endpoints: keep θ_A and θ_B fixed (the usual setting) or train them too.
        frozen_names: floating parameters that are interpolated but not trained.

    Example:
        >>> m = nn.Linear(2, 1); s = m.state_dict()
        >>> c = ControlPointCurve("bezier", [s, s, s], ["weight", "bias"])
        >>> sorted(c(0.5))
        ['bias', 'weight']
    """

    def __init__(
        self,
        kind: str,
        points: Sequence[Mapping[str, Tensor]],
        param_names: Sequence[str],
        *,
        aliases: Mapping[str, str] | None = None,
        fix_endpoints: bool = True,
        frozen_names: Sequence[str] = (),
    ):
        super().__init__()
        custom = type(self).coefficients is not ControlPointCurve.coefficients
        if kind not in COEFFICIENTS and not (custom and kind in REGISTRY):
            raise ConfigError(f"unknown curve kind {kind!r}; use one of {sorted(COEFFICIENTS)}")
        if len(points) < 2:
            raise ConfigError(f"a curve needs at least 2 points, got {len(points)}")
        self.kind = kind
        self.param_names = list(param_names)
        self.aliases = dict(aliases or {})
        first = points[0]
        dtypes = {first[n].dtype for n in self.param_names}
        if len(dtypes) > 1 or not all(d.is_floating_point for d in dtypes):
            raise ConfigError(
                f"curve training needs one floating dtype for all parameters, got {dtypes}"
            )
        self.shapes = [tuple(first[n].shape) for n in self.param_names]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.keys = list(first)
        self.num_points = len(points)
        self.trainable = [
            not (fix_endpoints and i in (0, len(points) - 1)) for i in range(len(points))
        ]
        self.free = nn.ParameterList()
        self._slots: list[tuple[bool, int]] = []
        for i, p in enumerate(points):
            vec = torch.cat([p[n].detach().reshape(-1) for n in self.param_names]).clone()
            if self.trainable[i]:
                self._slots.append((True, len(self.free)))
                self.free.append(nn.Parameter(vec))
            else:
                self._slots.append((False, i))
                self.register_buffer(f"fixed{i}", vec)
        self.frozen_names = [n for n in frozen_names if first[n].is_floating_point()]
        for i, p in enumerate(points):
            for j, n in enumerate(self.frozen_names):
                self.register_buffer(f"frozen{i}_{j}", p[n].detach().clone(), persistent=False)
        skip = set(self.param_names) | set(self.aliases)
        self._rest = [
            {k: v.detach().to("cpu").clone() for k, v in p.items() if k not in skip} for p in points
        ]

    def vectors(self) -> list[Tensor]:
        """The control points as flat parameter vectors (trainable ones are ``nn.Parameter``)."""
        return [self.free[j] if free else getattr(self, f"fixed{j}") for free, j in self._slots]

    def coefficients(self, t: Any) -> Tensor:
        """``c_i(t)`` of each control point (float64); subclasses may take other positions."""
        return COEFFICIENTS[self.kind](t, self.num_points)

    def forward(self, t: Any) -> dict[str, Tensor]:
        """``{name: Σ_i c_i(t) θ_i[name]}`` for the model's parameters (differentiable)."""
        coeffs = self.coefficients(t).tolist()
        flat: Tensor | None = None
        for c, v in zip(coeffs, self.vectors(), strict=True):
            if c != 0.0:
                flat = v * c if flat is None else flat.add(v, alpha=c)
        assert flat is not None
        out = {
            n: chunk.view(s)
            for n, chunk, s in zip(
                self.param_names, flat.split(self.sizes), self.shapes, strict=True
            )
        }
        with torch.no_grad():
            for j, n in enumerate(self.frozen_names):
                out[n] = sum(
                    c * getattr(self, f"frozen{i}_{j}") for i, c in enumerate(coeffs) if c != 0.0
                )
        return out

    def to_path(self, meta: dict[str, Any] | None = None) -> Path:
        """The control points as complete state dicts in a BezierCurve / PolyChain (CPU)."""
        points = []
        for vec, rest in zip(self.vectors(), self._rest, strict=True):
            chunks = vec.detach().to("cpu").split(self.sizes)
            params = {
                n: c.reshape(s).clone()
                for n, c, s in zip(self.param_names, chunks, self.shapes, strict=True)
            }
            params.update({a: params[p].clone() for a, p in self.aliases.items()})
            points.append({k: params[k] if k in params else rest[k] for k in self.keys})
        return REGISTRY[self.kind].from_points(points, meta=meta)


def parameter_names(model: nn.Module) -> tuple[list[str], dict[str, str]]:
    """The model's trainable parameter names and its tied aliases (``{alias: parameter}``).

    Example:
        >>> parameter_names(nn.Linear(2, 1))
        (['weight', 'bias'], {})
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[n] = first[id(p)]
        else:
            first[id(p)] = n
    return names, aliases


class _AtTheta(nn.Module):
    """``model_fn`` for ``input_transform``: the network evaluated at fixed (detached) weights."""

    def __init__(self, net: nn.Module, params: dict[str, Tensor]):
        super().__init__()
        self.net = net
        self.params = params

    def forward(self, x: Tensor) -> Tensor:
        return torch.func.functional_call(self.net, self.params, (x,))


def _epoch_seed(seed: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + 7919 * (epoch + 1)) % (2**63 - 1)


def _save_checkpoint(file: FsPath, payload: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    with atomic_write(file, "wb") as f:
        f.write(buf.getvalue())


def _load_checkpoint(file: FsPath, config: dict[str, Any]) -> dict[str, Any]:
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a corrupt file
        raise CheckpointError(f"cannot read the curve-training checkpoint {file} ({e})") from None
    old = ckpt.get("config", {})
    diff = [k for k in sorted(set(old) | set(config)) if old.get(k) != config.get(k)]
    if diff:
        k = diff[0]
        raise CheckpointError(
            f"{file} was written with different settings ({k}: {old.get(k)!r} there, "
            f"{config.get(k)!r} now); resume with the same settings or use a fresh directory"
        )
    return ckpt


def train_curve(
    model: nn.Module,
    curve: CurveParametrization,
    data: DataLike,
    *,
    epochs: int,
    lr: float,
    wd: float = 5e-4,
    momentum: float = 0.9,
    batch_size: int = 128,
    seed: int = 0,
    device: str | torch.device | None = None,
    checkpoint_dir: str | FsPath | None = None,
    resume: bool = False,
    progress: bool = True,
    input_transform: InputTransform | None = None,
    lr_schedule: Callable[[int, int], float] = garipov_schedule,
    after_step: Callable[[CurveParametrization, torch.optim.Optimizer], None] | None = None,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    config: Mapping[str, Any] | None = None,
) -> list[dict[str, float]]:
    """Train ``curve`` in place (Garipov et al., NeurIPS 2018, "Loss Surfaces, Mode Connectivity,
    and Fast Ensembling of DNNs").

    Each minibatch draws ``t ~ U(0, 1)`` (``curve.draw``) and takes an SGD step (momentum, no
    optimizer weight decay) on ``CE(f(x; θ(t)), y) + ½·wd·‖θ(t)‖² + curve.penalty()`` (the
    penalty is 0 for Garipov curves); the learning rate is ``lr ·
    lr_schedule(epoch, epochs)``. The network runs in train mode (BatchNorm uses batch
    statistics; its buffers are not trained). Randomness (shuffling, t, dropout, PGD starts drawn
    from the global RNG) is seeded per epoch from ``(seed, epoch)`` inside a forked RNG, so the
    caller's RNG is untouched and an interrupted run resumed from its last checkpoint equals the
    uninterrupted one bit for bit (for a Dataset/tuple ``data``; a DataLoader shuffles with its
    own generator).

    Args:
        model: a network of the curve's architecture (a template; not modified).
        curve: the parametrisation to train (e.g. :class:`ControlPointCurve`).
        data: training data (DataLoader, Dataset or ``(inputs, targets)``).
        epochs: total number of epochs.
        lr: base learning rate.
        wd: coefficient of the L2 term on θ(t).
        momentum: SGD momentum.
        batch_size: minibatch size (Dataset/tuple data).
        seed: seed of all randomness.
        device: where to train (default: the model's device).
        checkpoint_dir: write ``fit_state.pt`` here after every epoch (atomically).
        resume: continue from ``checkpoint_dir``'s checkpoint if there is one (same settings).
        progress: show a progress bar.
        input_transform: ``(model_fn, x, y) -> x``, e.g. PGD inputs (see the module docstring).
        lr_schedule: ``(epoch, epochs) -> factor``.
        after_step: called after every optimizer step with ``(curve, optimizer)``.
        callback: called after every epoch (after its checkpoint) with ``(epoch, record)``.
        config: extra settings recorded in the checkpoint and checked on resume.

    Returns:
        One record per epoch: ``epoch``, ``lr``, ``loss`` (CE), ``accuracy`` (running means).

    Example:
        >>> curve = ControlPointCurve("bezier", [sa, sm, sb], names)  # doctest: +SKIP
        >>> history = train_curve(model, curve, (x, y), epochs=10, lr=0.05)  # doctest: +SKIP
    """
    if epochs < 1 or lr <= 0:
        raise ConfigError(f"need epochs >= 1 and lr > 0, got epochs={epochs}, lr={lr}")
    dev = resolve_device(device) if device is not None else model_device(model)
    net = copy.deepcopy(model).to(dev).train()
    for p in net.parameters():
        p.requires_grad_(False)  # θ(t) comes from the curve; the template's own weights are unused
    curve.to(dev)
    trainable = [p for p in curve.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError(
            "the curve has nothing to train (fixed endpoints and no bends): use bends >= 1"
        )
    opt = torch.optim.SGD(trainable, lr=lr, momentum=momentum, weight_decay=0.0)
    cfg = {
        "epochs": epochs,
        "lr": lr,
        "wd": wd,
        "momentum": momentum,
        "batch_size": batch_size,
        "seed": seed,
        **dict(config or {}),
    }
    file = FsPath(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    start, history = 0, []
    if resume and file is not None and file.is_file():
        ckpt = _load_checkpoint(file, cfg)
        curve.load_state_dict(ckpt["curve"])
        opt.load_state_dict(ckpt["optimizer"])
        start, history = int(ckpt["epoch"]), list(ckpt["history"])
    rng_devices = [dev.index or 0] if dev.type == "cuda" else []
    with progress_bar(progress, total=epochs, description="training curve") as advance:
        for _ in range(start):
            advance(None)
        for epoch in range(start, epochs):
            rate = lr * lr_schedule(epoch, epochs)
            for g in opt.param_groups:
                g["lr"] = rate
            es = _epoch_seed(seed, epoch)
            t_gen = torch.Generator().manual_seed(es)
            total, correct, n = 0.0, 0, 0
            with torch.random.fork_rng(devices=rng_devices):
                torch.manual_seed(es)
                for x, y in as_loader(data, batch_size=batch_size, shuffle=True, seed=es):
                    x, y = x.to(dev), y.to(dev)
                    t = curve.draw(t_gen)
                    theta = curve(t)
                    if input_transform is not None:
                        x = input_transform(
                            _AtTheta(net, {k: v.detach() for k, v in theta.items()}), x, y
                        )
                        net.train()
                    out = torch.func.functional_call(net, theta, (x,))
                    ce = F.cross_entropy(out, y)
                    l2 = sum(v.pow(2).sum() for v in theta.values())
                    loss = ce + 0.5 * wd * l2 + curve.penalty()
                    if not torch.isfinite(loss):
                        raise NonFiniteError(
                            f"curve training diverged at epoch {epoch + 1} (loss {float(loss)}); "
                            "lower the learning rate"
                        )
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if after_step is not None:
                        after_step(curve, opt)
                    total += float(ce.detach()) * len(y)
                    correct += int((out.argmax(-1) == y).sum())
                    n += len(y)
            record = {
                "epoch": epoch + 1,
                "lr": rate,
                "loss": total / max(n, 1),
                "accuracy": correct / max(n, 1),
            }
            history.append(record)
            if file is not None:
                _save_checkpoint(
                    file,
                    {
                        "version": 1,
                        "epoch": epoch + 1,
                        "config": cfg,
                        "history": history,
                        "curve": curve.state_dict(),
                        "optimizer": opt.state_dict(),
                    },
                )
            advance(f"epoch {epoch + 1} loss {record['loss']:.3f}")
            if callback is not None:
                callback(epoch, record)
    return history


def _train_split(data: Any) -> Any:
    if hasattr(data, "train") and hasattr(data, "test") and hasattr(data, "input_shape"):
        return data.train
    return data


def fit_curve(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Any,
    *,
    kind: str = "bezier",
    bends: int = 1,
    align: str | None = None,
    epochs: int = 20,
    lr: float = 0.05,
    wd: float = 5e-4,
    momentum: float = 0.9,
    batch_size: int = 128,
    fix_endpoints: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
    checkpoint_dir: str | FsPath | None = None,
    resume: bool = False,
    progress: bool = True,
    input_transform: InputTransform | None = None,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    align_options: Mapping[str, Any] | None = None,
) -> Path:
    """Learn a low-loss curve between two trained networks (Garipov et al., NeurIPS 2018).

    θ(t) = Σ_i c_i(t) θ_i, a Bezier curve (``c_i = C(n,i) t^i (1−t)^(n−i)``) or a polygonal
    chain (``c_i = max(0, 1 − |t(n−1) − i|)``) with ``bends`` trainable control points between
    θ_A and θ_B. The bends start evenly spaced on the segment between the (aligned) endpoints
    (one bend: the midpoint, as in Tatro et al., NeurIPS 2020, "Optimizing Mode Connectivity via
    Neuron Alignment") and are trained by :func:`train_curve`: t ~ U(0,1) per minibatch, loss
    ``CE + ½·wd·‖θ(t)‖²``, SGD with momentum, lr constant for half the epochs then linear down to
    1% at 90%.

    Args:
        model_a: endpoint A (not modified).
        model_b: endpoint B (not modified), same architecture.
        data: training data (DataLoader, Dataset, ``(inputs, targets)`` or a ``Splits``: its
            ``train`` split).
        kind: ``"bezier"`` or ``"polychain"``.
        bends: number of trainable control points (≥ 1).
        align: ``None``; ``"weight"``/``"activation"`` to permute B onto A first
            (``mc.align``); ``"pam"``: B permuted by proximal alternating minimisation over
            relaxed permutations (PAM phase 1, Tatro et al. 2020, ``paths.pam.pam_align``),
            then the curve is trained here (phase 2).
        epochs: training epochs.
        lr: base learning rate.
        wd: L2 coefficient on θ(t) (the optimizer has no weight decay).
        momentum: SGD momentum.
        batch_size: minibatch size.
        fix_endpoints: keep the endpoints fixed (default) or train them too.
        seed: seed of all randomness (shuffling, t, dropout).
        device: where to train (default: model A's device).
        checkpoint_dir: checkpoint every epoch here; with ``resume=True`` continue from it.
        resume: continue an interrupted run (same settings); the result equals an uninterrupted run.
        progress: show a progress bar.
        input_transform: ``(model_fn, x, y) -> x`` applied to each minibatch (e.g. PGD inputs
            for adversarial curve training).
        callback: ``(epoch, record)`` after each epoch (raising interrupts training).
        align_options: keywords for the alignment method (e.g. ``{"epochs": 20}`` for PAM;
            PAM also receives ``seed``, ``device``, ``progress`` and ``input_transform``).

    Returns:
        A :class:`BezierCurve` or :class:`PolyChain` on CPU whose ``meta`` records the model
        config, the settings and the per-epoch history.

    Example:
        >>> curve = mc.fit_curve(a, b, splits, epochs=10, align="weight")  # doctest: +SKIP
        >>> mc.evaluate_path(a, curve, splits.test).summary("accuracy")  # doctest: +SKIP
    """
    if kind not in COEFFICIENTS:
        raise ConfigError(f"unknown curve kind {kind!r}; use one of {sorted(COEFFICIENTS)}")
    if bends < (1 if fix_endpoints else 0):
        need = ">= 1" if fix_endpoints else ">= 0 (free endpoints)"
        raise ConfigError(f"bends must be {need}, got {bends}")
    if epochs < 1 or batch_size < 1:
        raise ConfigError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    aligns = (None, "weight", "activation", "pam")
    if align not in aligns:
        raise ConfigError(f"unknown align {align!r}; use one of {list(aligns)}")
    train_data = _train_split(data)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    check_compatible([state_a, state_b], ["model A", "model B"])
    if align is not None:
        from ..align import align as align_models

        options = dict(align_options or {})
        if align == "pam":
            from . import pam  # noqa: F401 - registers the "pam" aligner (PAM phase 1)

            options = {
                "seed": seed,
                "device": device,
                "progress": progress,
                "input_transform": input_transform,
                **options,
            }
        state_b = align_models(
            model_a, model_b, method=align, data=train_data, **options
        ).state_dict()
    curve = initial_curve(
        model_a, state_a, state_b, kind=kind, bends=bends, fix_endpoints=fix_endpoints
    )
    fingerprint = [
        round(float(sum(v.double().sum() for v in s.values() if v.is_floating_point())), 6)
        for s in (state_a, state_b)
    ]
    history = train_curve(
        model_a,
        curve,
        train_data,
        epochs=epochs,
        lr=lr,
        wd=wd,
        momentum=momentum,
        batch_size=batch_size,
        seed=seed,
        device=device,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        progress=progress,
        input_transform=input_transform,
        callback=callback,
        config={
            "kind": kind,
            "bends": bends,
            "align": align,
            "fix_endpoints": fix_endpoints,
            "endpoints": fingerprint,
        },
    )
    meta = {
        "model": getattr(model_a, "modeconn_config", None),
        "fit": {
            "kind": kind,
            "bends": bends,
            "align": align,
            "epochs": epochs,
            "lr": lr,
            "align_options": {
                k: v
                for k, v in dict(align_options or {}).items()
                if isinstance(v, int | float | str | bool | None)
            },
            "wd": wd,
            "momentum": momentum,
            "batch_size": batch_size,
            "fix_endpoints": fix_endpoints,
            "seed": seed,
            "adversarial": input_transform is not None,
        },
        "history": history,
    }
    return curve.to_path(meta=meta)


def initial_curve(
    model: nn.Module,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    *,
    kind: str = "bezier",
    bends: int = 1,
    fix_endpoints: bool = True,
) -> ControlPointCurve:
    """A :class:`ControlPointCurve` whose bends sit evenly on the segment θ_A → θ_B.

    Bend i of k is ``lerp(θ_A, θ_B, i / (k + 1))``, so the untrained curve is the linear path
    (for both kinds); with one bend it is the midpoint ``½θ_A + ½θ_B``.

    Example:
        >>> m = nn.Linear(2, 1)
        >>> c = initial_curve(m, m.state_dict(), m.state_dict(), bends=2)
        >>> c.num_points
        4
    """
    points = [dict(state_a)] + [
        lerp(state_a, state_b, i / (bends + 1)) for i in range(1, bends + 1)
    ]
    points.append(dict(state_b))
    names, aliases = parameter_names(model)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    return ControlPointCurve(
        kind, points, names, aliases=aliases, fix_endpoints=fix_endpoints, frozen_names=frozen
    )
