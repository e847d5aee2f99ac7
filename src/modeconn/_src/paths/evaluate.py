"""Loss and accuracy along a path: per-t metrics on one or several splits, summaries, barriers."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ..errors import ConfigError, DataError
from ..evaluation import DataLike, as_loader, model_device, resolve_device
from ..norm import needs_bn_reset, reset_bn
from ..progress import progress_bar
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


def _cache(data: DataLike, dev: torch.device, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    # Batches are materialised once on the device and reused at every t (saves the DataLoader's
    # per-example collation T times over). Whole tensors are sliced without a DataLoader.
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        data = tuple(data.tensors)
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = (t.to(dev) for t in data)
        if len(x) != len(y):
            raise DataError(f"inputs have {len(x)} rows but targets have {len(y)}")
        batches = [
            (x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)
        ]
    else:
        batches = [(x.to(dev), y.to(dev)) for x, y in as_loader(data, batch_size=batch_size)]
    if not batches:
        raise DataError("cannot evaluate on an empty dataset")
    return batches


@torch.no_grad()
def _measure(
    net: nn.Module, state: dict[str, Tensor] | None, batches: list[tuple[Tensor, Tensor]]
) -> tuple[float, float]:
    total, correct, n = 0.0, 0, 0
    for x, y in batches:
        out = net(x) if state is None else torch.func.functional_call(net, state, (x,))
        total += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(-1) == y).sum())
        n += len(y)
    return total / n, correct / n


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
    cached = {name: _cache(d, dev, batch_size) for name, d in named.items()}
    if bn:
        # Pre-batched and on the device: reset_bn iterates it at every t without re-collating.
        bn_batches = next((c for n, c in cached.items() if named[n] is bn_data), None)
        bn_loader: DataLoader[tuple[Tensor, Tensor]] = DataLoader(
            bn_batches or _cache(bn_data, dev, batch_size),  # type: ignore[arg-type]  # a list is a map-style dataset
            batch_size=None,
        )

    net = copy.deepcopy(model).to(dev).eval()
    work = copy.deepcopy(net) if bn else net  # θ(t) is loaded here before each BN reset
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
    dl = [0.0]
    prev: dict[str, Tensor] | None = None
    endpoint_error: float | None = None
    with progress_bar(progress, total=len(t_grid), description="evaluating path") as advance:
        for t in t_grid.tolist():
            st = path.state(t)
            if prev is not None:
                sq = sum(
                    float((st[n].double() - prev[n].double()).pow(2).sum()) for n in param_names
                )
                dl.append(sq**0.5)
            prev = {n: st[n] for n in param_names}
            if bn:
                work.load_state_dict(st, strict=True)
                net_t, state_t = reset_bn(work, bn_loader, device=dev), None
            else:
                net_t, state_t = net, st
            for name, batches in cached.items():
                loss, acc = _measure(net_t, state_t, batches)
                results[name]["loss"].append(loss)
                results[name]["accuracy"].append(acc)
                if pgd is not None:
                    # Same random starts at every t (seed 0), so the curve compares like with like.
                    m = robust_evaluate(
                        net_t,
                        named[name],
                        pgd,
                        state=state_t,
                        device=dev,
                        batch_size=batch_size,
                        seed=0,
                    )
                    results[name]["robust_loss"].append(m.loss)
                    results[name]["robust_accuracy"].append(m.accuracy)
            if t in endpoints:
                err = _endpoint_error(
                    net, net_t, state_t, endpoints[t], st, bn, cached[primary][0][0]
                )
                endpoint_error = max(endpoint_error or 0.0, err)
            advance(f"t={t:.3f}")
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
        dl=torch.tensor(dl, dtype=torch.float64),
        endpoint_error=endpoint_error,
        meta={
            "kind": path.kind,
            "num_points": path.num_points,
            "bn_reset": bn,
            "robust": pgd.model_dump() if pgd is not None else None,
        },
    )


@torch.no_grad()
def _endpoint_error(net, net_t, state_t, endpoint, st, bn: bool, x: Tensor) -> float:
    """Deviation of the evaluated θ(t) from the endpoint it should equal."""
    if bn:
        # BN statistics are recomputed identically from identical tensors: compare the tensors.
        return max(
            float((st[k].double() - v.to(st[k].device).double()).abs().max()) if v.numel() else 0.0
            for k, v in endpoint.items()
        )
    ref = torch.func.functional_call(net, {k: v.to(x.device) for k, v in endpoint.items()}, (x,))
    out = torch.func.functional_call(net_t, state_t, (x,))
    return float((out - ref).abs().max())
