"""Lines, curves and simplexes of networks trained from scratch together (Wortsman et al. 2021)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .base import LinearPath, Path
from .fit import ControlPointCurve, _train_split, parameter_names, train_curve
from .spro import SimplexCurve, cosine_penalty

KINDS = ("line", "curve", "simplex")


def cosine_schedule(epoch: int, epochs: int) -> float:
    """Per-epoch cosine learning-rate factor ``½(1 + cos(π · epoch / epochs))``.

    Example:
        >>> [round(cosine_schedule(e, 4), 3) for e in range(4)]
        [1.0, 0.854, 0.5, 0.146]
    """
    return 0.5 * (1.0 + math.cos(math.pi * epoch / max(epochs, 1)))


def reinitialise(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with every ``reset_parameters()`` re-run under ``seed`` (fresh init).

    Example:
        >>> a = reinitialise(nn.Linear(3, 2), 0); b = reinitialise(nn.Linear(3, 2), 0)
        >>> torch.equal(a.weight, b.weight)
        True
    """
    net = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for m in net.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
    return net


class _CosineCurve(ControlPointCurve):
    """A Bezier curve / line with free points and Wortsman et al.'s ``β · mean cos²`` penalty."""

    def __init__(self, *args: Any, cosine_weight: float = 1.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.cosine_weight = float(cosine_weight)

    def penalty(self) -> Tensor | float:
        return self.cosine_weight * cosine_penalty(self) if self.cosine_weight else 0.0


def fit_subspace(
    model: nn.Module,
    data: Any,
    *,
    kind: str = "line",
    vertices: int = 3,
    beta: float = 1.0,
    epochs: int = 20,
    lr: float = 0.1,
    wd: float = 5e-4,
    momentum: float = 0.9,
    batch_size: int = 128,
    seed: int = 0,
    device: str | torch.device | None = None,
    checkpoint_dir: Any = None,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> Path:
    """Train a subspace of networks from scratch (Wortsman et al., ICML 2021, "Learning Neural
    Network Subspaces").

    The subspace's points start from independent initialisations: point 0 is ``model`` as
    given, point i is ``model`` re-initialised with seed ``seed + i`` (:func:`reinitialise`).
    Every minibatch samples a point of the subspace and takes an SGD step on
    ``CE(f(x; θ(α)), y) + ½·wd·‖θ(α)‖² + β · mean_{i<j} cos²(θ_i, θ_j)`` (over the weight
    matrices of all pairs of points, the expectation of the authors' random pair):

    - ``kind="line"``: ``θ(α) = (1 − α) θ_1 + α θ_2``, ``α ~ U(0, 1)``;
    - ``kind="curve"``: a quadratic Bezier curve whose bend is trained too, ``α ~ U(0, 1)``;
    - ``kind="simplex"``: ``θ(c) = Σ_i c_i θ_i`` over ``vertices`` points, ``c ~ Dirichlet(1)``.

    The cos² term keeps the points from collapsing onto one network. The learning rate
    follows a per-epoch cosine schedule. Training is
    :func:`~modeconn._src.paths.fit.train_curve`'s (seeded, resumable); BatchNorm statistics are
    not trained: evaluate a point after ``mc.reset_bn`` (``mc.evaluate_path`` does it).

    Args:
        model: the architecture and the first point's initialisation (not modified).
        data: training data (or a ``Splits``: its train split).
        kind: ``"line"``, ``"curve"`` or ``"simplex"``.
        vertices: number of vertices for ``kind="simplex"`` (≥ 2).
        beta: β of the cos² regulariser (the paper's 1).
        epochs: training epochs.
        lr: peak learning rate.
        wd: L2 coefficient on θ(α).
        momentum: SGD momentum.
        batch_size: minibatch size.
        seed: seed of the initialisations and of all training randomness.
        device: where to train.
        checkpoint_dir: checkpoint every epoch here; ``resume=True`` continues from it.
        resume: continue an interrupted run (same settings); equals an uninterrupted run.
        progress: show a progress bar.
        callback: ``(epoch, record)`` after each epoch (raising interrupts training).

    Returns:
        A :class:`LinearPath` (line), :class:`BezierCurve` (curve) or :class:`Simplex` (one
        simplex of all vertices), on CPU, with the settings and history in ``meta``.

    Example:
        >>> line = mc.fit_subspace(model, splits, kind="line", epochs=20)  # doctest: +SKIP
        >>> mc.evaluate_path(model, line, splits).summary("accuracy")  # doctest: +SKIP
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown subspace kind {kind!r}; use one of {', '.join(KINDS)}")
    if kind == "simplex" and vertices < 2:
        raise ConfigError(f"a simplex subspace needs vertices >= 2, got {vertices}")
    if beta < 0 or epochs < 1:
        raise ConfigError(f"need beta >= 0 and epochs >= 1, got {beta} and {epochs}")
    n = {"line": 2, "curve": 3, "simplex": vertices}[kind]
    points = [model.state_dict()] + [
        reinitialise(model, seed + i).state_dict() for i in range(1, n)
    ]
    names, aliases = parameter_names(model)
    frozen = [p for p, t in model.named_parameters() if not t.requires_grad]
    common: dict[str, Any] = {"aliases": aliases, "fix_endpoints": False, "frozen_names": frozen}
    curve: ControlPointCurve
    if kind == "simplex":
        curve = SimplexCurve(
            points, names, simplices=[tuple(range(n))], cosine_weight=beta, **common
        )
    else:
        order = [points[0], points[2], points[1]] if kind == "curve" else points
        curve = _CosineCurve("bezier", order, names, cosine_weight=beta, **common)
    settings = {
        "kind": kind, "vertices": n, "beta": beta, "epochs": epochs, "lr": lr, "wd": wd,
        "momentum": momentum, "batch_size": batch_size, "seed": seed,
    }  # fmt: skip
    history = train_curve(
        model, curve, _train_split(data), epochs=epochs, lr=lr, wd=wd, momentum=momentum,
        batch_size=batch_size, seed=seed, device=device, checkpoint_dir=checkpoint_dir,
        resume=resume, progress=progress, callback=callback, lr_schedule=cosine_schedule,
        config={"method": "subspace", **settings},
    )  # fmt: skip
    meta = {
        "model": getattr(model, "modeconn_config", None),
        "fit": {"method": "subspace", **settings},
        "history": history,
    }
    path = curve.to_path(meta=meta)
    if kind == "line":
        return LinearPath(path._points[0], path._points[-1], meta=path.meta)
    return path
