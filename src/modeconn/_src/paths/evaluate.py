"""Loss and accuracy along a path: per-t metrics on one or several splits, summaries, barriers."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, DataError
from ..evaluation import (
    DataLike,
    StateRunner,
    cache_batches,
    evaluate,
    model_device,
    resolve_device,
)
from ..norm import needs_bn_reset
from ..progress import progress_bar
from ..state import gram
from .base import Path

ENDPOINT_TOL = 1e-4
# modeconn's convention: "loss barrier" / "error barrier" (tables, JSON, sqlite, plots) mean the
# barrier on this split; other splits are always named (e.g. "train loss barrier").
BARRIER_SPLIT = "test"
_METRICS = ("loss", "error", "accuracy", "robust_loss", "robust_error", "robust_accuracy")


@dataclass
class PathEvaluation:
    """Metrics of the networks θ(t) along a path, for each evaluated split.

    Attributes:
        ts: the positions, float64 tensor of shape ``(T,)``.
        results: ``{split: {"loss": (T,), "accuracy": (T,), ["robust_loss", "robust_accuracy"]}}``.
        primary: the split ``.loss`` / ``.accuracy`` refer to (``"test"`` when evaluated, else the
            first one).
        dl: ``dl[i] = ‖θ(t_i) − θ(t_{i−1})‖`` over the parameters (``dl[0] = 0``), for the
            arc-length weighted mean.
        endpoint_error: largest deviation found when checking that t = 0 / t = 1 reproduce the
            endpoints (max |Δlogit|; max |Δθ| for BatchNorm models), ``None`` if not checked.
        meta: free-form information (path kind, number of points, BN reset, PGD settings).

    Example:
        >>> ev = mc.evaluate_path(model, mc.LinearPath(sa, sb), test)  # doctest: +SKIP
        >>> ev.barrier("error"), ev.summary("accuracy")["min"]  # doctest: +SKIP
    """

    ts: Tensor
    results: dict[str, dict[str, Tensor]]
    primary: str
    dl: Tensor
    endpoint_error: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    # -- views -----------------------------------------------------------------------------------
    @property
    def splits(self) -> list[str]:
        """Names of the evaluated splits."""
        return list(self.results)

    @property
    def loss(self) -> Tensor:
        """Mean cross-entropy at each t on the primary split."""
        return self.values("loss")

    @property
    def accuracy(self) -> Tensor:
        """Accuracy at each t on the primary split."""
        return self.values("accuracy")

    @property
    def robust_accuracy(self) -> Tensor:
        """Accuracy on PGD inputs at each t on the primary split (needs ``robust=``)."""
        return self.values("robust_accuracy")

    def values(self, metric: str = "loss", split: str | None = None) -> Tensor:
        """The per-t values of ``metric`` on ``split`` (default: the primary split).

        Args:
            metric: one of ``loss``, ``error``, ``accuracy`` and their ``robust_`` versions.
            split: a split name from :attr:`splits`.

        Returns:
            A float64 tensor of shape ``(T,)``.

        Example:
            >>> ev.values("error", "train")  # doctest: +SKIP
        """
        split = self.primary if split is None else split
        if split not in self.results:
            raise ConfigError(f"no split {split!r} in this evaluation; it has {self.splits}")
        res = self.results[split]
        if metric not in _METRICS:
            raise ConfigError(f"unknown metric {metric!r}; use one of {list(_METRICS)}")
        if metric.endswith("error"):
            return 1.0 - self.values(metric.replace("error", "accuracy"), split)
        if metric not in res:
            raise ConfigError(f"{metric!r} was not measured; evaluate with robust=... to get it")
        return res[metric]

    def split(self, name: str) -> PathEvaluation:
        """The same evaluation with ``name`` as the primary split."""
        self.values("loss", name)
        return PathEvaluation(self.ts, self.results, name, self.dl, self.endpoint_error, self.meta)

    # -- summaries -----------------------------------------------------------------------------
    def barrier(self, metric: str = "loss", split: str | None = None) -> float:
        """Height of the ``metric`` barrier on the path (Frankle et al., ICML 2020, "Linear Mode
        Connectivity and the Lottery Ticket Hypothesis"; Git Re-Basin's loss barrier).

        ``max_t [ L(θ(t)) − ((1 − t) L(θ(0)) + t L(θ(1))) ]`` over the evaluated ts, where the
        baseline interpolates the values at the first and last t (the endpoints when ts span
        [0, 1]).

        Everywhere modeconn reports an unqualified "loss barrier" it is this value on the
        ``test`` split (:data:`BARRIER_SPLIT`), which is the primary split when evaluated.

        Args:
            metric: ``"loss"`` or ``"error"`` (or ``"robust_loss"``/``"robust_error"``).
            split: split name (default: the primary one).

        Returns:
            The barrier (0 or more when the endpoints are evaluated).

        Example:
            >>> ev.barrier("error")  # doctest: +SKIP
        """
        v = self.values(metric, split)
        t0, t1 = float(self.ts[0]), float(self.ts[-1])
        span = (t1 - t0) or 1.0
        w = (self.ts - t0) / span
        base = (1 - w) * v[0] + w * v[-1]
        return float((v - base).max())

    def summary(self, metric: str = "loss", split: str | None = None) -> dict[str, float]:
        """``min``, ``max``, ``mean`` and arc-length weighted ``arc_mean`` of ``metric``.

        ``arc_mean = Σ_i ½ (v_i + v_{i−1}) dl_i / Σ_i dl_i`` with ``dl_i = ‖θ(t_i) − θ(t_{i−1})‖``
        (Garipov et al. 2018's ``eval_curve``: the mean along the curve per unit of length).

        Example:
            >>> ev.summary("accuracy")["min"]  # doctest: +SKIP
        """
        v = self.values(metric, split)
        dl = self.dl[1:]
        if len(v) > 1 and float(dl.sum()) > 0:
            arc = float((0.5 * (v[1:] + v[:-1]) * dl).sum() / dl.sum())
        else:
            arc = float(v.mean())
        return {
            "min": float(v.min()),
            "max": float(v.max()),
            "mean": float(v.mean()),
            "arc_mean": arc,
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON-able values: ts, per-split curves, summaries and barriers.

        Example:
            >>> json.dumps(ev.to_dict())  # doctest: +SKIP
        """
        splits: dict[str, Any] = {}
        for name, res in self.results.items():
            metrics = [m for m in _METRICS if m in res or m.replace("error", "accuracy") in res]
            splits[name] = {
                "values": {m: self.values(m, name).tolist() for m in res},
                "summary": {m: self.summary(m, name) for m in metrics},
                "barrier": {m: self.barrier(m, name) for m in metrics if "accuracy" not in m},
            }
        return {
            "ts": self.ts.tolist(),
            "primary": self.primary,
            "dl": self.dl.tolist(),
            "endpoint_error": self.endpoint_error,
            "meta": self.meta,
            "splits": splits,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PathEvaluation:
        """Rebuild an evaluation from :meth:`to_dict`'s output (e.g. a saved evaluation.json)."""
        try:
            results = {
                name: {m: torch.tensor(v, dtype=torch.float64) for m, v in s["values"].items()}
                for name, s in d["splits"].items()
            }
            return cls(
                ts=torch.tensor(d["ts"], dtype=torch.float64),
                results=results,
                primary=d["primary"],
                dl=torch.tensor(d["dl"], dtype=torch.float64),
                endpoint_error=d.get("endpoint_error"),
                meta=dict(d.get("meta") or {}),
            )
        except (KeyError, TypeError) as e:
            raise DataError(
                f"not a path evaluation (missing {e}); use a file written by to_dict"
            ) from None


# ---------------------------------------------------------------------------------------------
def _named_splits(data: Any, splits: Sequence[str] | None) -> dict[str, DataLike]:
    """``{name: data}`` from a Splits (``.train``/``.test``), a mapping, or one dataset."""
    if hasattr(data, "train") and hasattr(data, "test") and hasattr(data, "input_shape"):
        named = {"train": data.train, "test": data.test}
    elif isinstance(data, Mapping):
        named = dict(data)
    else:
        named = {"data": data}
    if splits is not None:
        unknown = [s for s in splits if s not in named]
        if unknown:
            raise DataError(f"split(s) {unknown} not in the data; it has {list(named)}")
        named = {s: named[s] for s in splits}
    if not named:
        raise DataError("no data to evaluate the path on")
    return named


def _ts(ts: int | Sequence[float] | Tensor) -> Tensor:
    if isinstance(ts, int):
        if ts < 1:
            raise ConfigError(f"ts must be a positive number of points, got {ts}")
        return (
            torch.linspace(0.0, 1.0, ts, dtype=torch.float64)
            if ts > 1
            else torch.zeros(1, dtype=torch.float64)
        )
    out = torch.as_tensor(
        list(ts) if not isinstance(ts, Tensor) else ts, dtype=torch.float64
    ).flatten()
    if len(out) == 0 or bool(((out < 0) | (out > 1)).any()):
        raise ConfigError("ts must be a non-empty list of positions in [0, 1]")
    # Sorted: the barrier's baseline joins the first and last t and dl joins neighbours.
    return torch.sort(out).values


def path_point(path: Path, t: float) -> tuple[Mapping[str, Tensor], bool]:
    """``(θ(t), is_endpoint)``: an endpoint whose coefficient is a lone 1 is returned as it is
    (``path.state`` would copy it bit for bit, ``state.combine``), anything else is built."""
    if t in (0.0, 1.0):
        c = path.coefficients(t)
        if int((c != 0).sum()) == 1 and bool(c[-int(t)] == 1.0):
            return path._points[-int(t)], True
    return path.state(t), False


def _segment_lengths(path: Path, ts: Tensor, names: Sequence[str]) -> Tensor:
    """``‖θ(t_i) − θ(t_{i−1})‖`` for consecutive ts (0 first), from the points' Gram matrix.

    ``θ(t) = Σ c_i(t) θ_i`` with ``Σ c_i = 1``, so a step is ``Σ_{i≥1} d_i (θ_i − θ_0)`` with
    ``d = c(t) − c(t')`` and its squared length ``dᵀ G d``, ``G_ij = ⟨θ_i − θ_0, θ_j − θ_0⟩``
    (float64, computed once): no state is built for it.
    """
    gram_ = gram(path._points[1:], names, path._points[0])
    coefs = torch.stack([path.coefficients(float(t)) for t in ts.tolist()])
    step = (coefs[1:] - coefs[:-1])[:, 1:]
    sq = torch.einsum("si,ij,sj->s", step, gram_, step).clamp_min(0.0)
    return torch.cat([torch.zeros(1, dtype=torch.float64), sq.sqrt()])


def evaluate_path(
    model: nn.Module,
    path: Path,
    data: Any,
    *,
    ts: int | Sequence[float] | Tensor = 25,
    bn_data: DataLike | None = None,
    device: str | torch.device | None = None,
    splits: Sequence[str] | None = None,
    robust: Any = None,
    batch_size: int = 1024,
    progress: bool = True,
) -> PathEvaluation:
    """Loss and accuracy of θ(t) for each t, on one or several named splits.

    For each t the network θ(t) = ``path.state(t)`` is built once; for BatchNorm models its
    running statistics are recomputed over ``bn_data`` with an exact cumulative average
    (``mc.reset_bn``; without it midpoints look broken), then every split is run forward once.
    The data is moved to the device once and reused at every t. Summaries: see
    :meth:`PathEvaluation.summary` and :meth:`PathEvaluation.barrier` (Frankle et al. 2020).
    At t = 0 and t = 1 the endpoints are checked to be reproduced (a warning if they are not).

    Args:
        model: a network of the path's architecture (a template; not modified).
        path: a :class:`LinearPath`, :class:`BezierCurve`, :class:`PolyChain`, ...
        data: one dataset (DataLoader, Dataset or ``(inputs, targets)``), a mapping
            ``{split name: dataset}``, or a ``mc.data.Splits`` (then ``train`` and ``test``).
        ts: number of evenly spaced points in [0, 1] or the positions themselves (sorted).
        bn_data: data for the BatchNorm statistics (default: the ``train`` split if ``data`` has
            one, even when ``splits`` does not evaluate it, else the first evaluated split);
            ignored for models without BatchNorm.
        device: where to run (default: the model's device).
        splits: evaluate only these split names of ``data``.
        robust: PGD settings (``mc.PGDConfig`` or a dict with ``eps``, ``step``, ``steps``) to
            also measure ``robust_loss``/``robust_accuracy`` on PGD-ℓ∞ inputs at each t.
        batch_size: evaluation batch size.
        progress: show a progress bar.

    Returns:
        A :class:`PathEvaluation` (``.ts``, ``.loss``, ``.accuracy``, ``.barrier()``, ...).

    Example:
        >>> a, b = nn.Linear(4, 3), nn.Linear(4, 3)
        >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> ev = mc.evaluate_path(a, mc.LinearPath(a.state_dict(), b.state_dict()), (x, y), ts=11)
        >>> len(ev.ts), ev.barrier("loss") >= 0
        (11, True)
    """
    dev = resolve_device(device) if device is not None else model_device(model)
    t_grid = _ts(ts)
    everything = _named_splits(data, None)
    named = _named_splits(data, splits)
    primary = "test" if "test" in named else next(iter(named))
    bn = needs_bn_reset(model)
    pgd = None
    if robust is not None:
        from ..adversarial import PGDConfig, robust_evaluate

        pgd = PGDConfig.coerce(robust)
    if bn and bn_data is None:
        # The training split even when ``splits`` leaves it out of the evaluation.
        bn_data = everything.get("train", next(iter(named.values())))
    cached = {name: cache_batches(d, dev, batch_size) for name, d in named.items()}
    if bn:  # the cached split when it is the BN data: statistics computed without re-collating
        bn_data = next((c for n, c in cached.items() if named[n] is bn_data), bn_data)
    run = StateRunner(model, device=dev, bn_data=bn_data if bn else None, batch_size=batch_size)
    if any(v.device != dev for v in path._points[0].values()):
        path = path.to(dev)  # θ(t) is built where it is used: no host round trip per t
    param_names = [n for n, _ in model.named_parameters()]
    missing = [n for n in param_names if n not in path._points[0]]
    if missing:
        raise DataError(
            f"the path has no tensor {missing[0]!r} of the model: wrong model for this path"
        )
    endpoints = {0.0: path._points[0], 1.0: path._points[-1]}
    results: dict[str, dict[str, list[float]]] = {n: {"loss": [], "accuracy": []} for n in named}
    if pgd is not None:
        for r in results.values():
            r["robust_loss"], r["robust_accuracy"] = [], []
    endpoint_error: float | None = None
    with progress_bar(progress, total=len(t_grid), description="evaluating path") as advance:
        for t in t_grid.tolist():
            st, exact = path_point(path, t)
            net_t, state_t = run.network(st)
            for name, batches in cached.items():
                m = evaluate(net_t, batches, state=state_t, device=dev)
                results[name]["loss"].append(m.loss)
                results[name]["accuracy"].append(m.accuracy)
                if pgd is not None:
                    # Same random starts at every t (seed 0), so the curve compares like with like.
                    m = robust_evaluate(net_t, batches, pgd, state=state_t, device=dev, seed=0)
                    results[name]["robust_loss"].append(m.loss)
                    results[name]["robust_accuracy"].append(m.accuracy)
            if t in endpoints:
                err = 0.0 if exact else _endpoint_error(endpoints[t], st)
                endpoint_error = max(endpoint_error or 0.0, err)
            del st, net_t, state_t  # one θ(t) alive at a time
            advance(f"t={t:.3f}")
    dl = _segment_lengths(path, t_grid, param_names)
    if endpoint_error is not None and endpoint_error > ENDPOINT_TOL:
        warnings.warn(
            f"the path does not reproduce its endpoints (max deviation {endpoint_error:.2e} > "
            f"{ENDPOINT_TOL}); check that the model matches the path",
            stacklevel=2,
        )
    return PathEvaluation(
        ts=t_grid,
        results={
            n: {m: torch.tensor(v, dtype=torch.float64) for m, v in r.items()}
            for n, r in results.items()
        },
        primary=primary,
        dl=dl,
        endpoint_error=endpoint_error,
        meta={
            "kind": path.kind,
            "num_points": path.num_points,
            "bn_reset": bn,
            "robust": pgd.model_dump() if pgd is not None else None,
        },
    )


@torch.no_grad()
def _endpoint_error(endpoint: Mapping[str, Tensor], st: Mapping[str, Tensor]) -> float:
    """Largest deviation of the evaluated θ(t) from the endpoint it should equal (tensors:
    equal tensors give equal outputs, and no forward pass is spent on it)."""
    return max(
        (
            float((st[k].double() - v.to(st[k].device).double()).abs().max())
            for k, v in endpoint.items()
            if v.numel() and v.is_floating_point()
        ),
        default=0.0,
    )
