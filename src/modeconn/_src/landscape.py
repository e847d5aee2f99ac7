"""Loss-landscape slices: the plane through three models, random filter-normalised slices, MLI.

Three views of the landscape around trained networks (ALGORITHMS.md §6):

- :func:`plane` — the 2-D plane through three models (Garipov et al. 2018, Fig. 1): Gram–Schmidt
  on ``θ1 − θ0`` and ``θ2 − θ0`` gives an orthonormal basis ``(e1, e2)``; the grid point ``(x, y)``
  is ``θ0 + x·e1 + y·e2``. A learned curve can be projected into the plane.
- :func:`random_slice` — 1-D / 2-D slices along random Gaussian directions with filter
  normalisation (Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets").
- :func:`monotonic_interpolation` — is the loss monotone on the straight line from initialisation
  to the trained solution (Lucas et al. 2021, "Analyzing Monotonic Linear Interpolation")?

Every grid point is evaluated through ``torch.func.functional_call``; BatchNorm statistics are
recomputed per point when ``bn_data`` is given. :func:`plot_plane` draws a plane as a contour plot.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError, IncompatibleModelsError
from .evaluation import Batches, DataLike, Metrics, StateRunner, cache_batches
from .progress import progress_bar
from .state import check_compatible, combine, lerp

State = dict[str, Tensor]

__all__ = [
    "MLIResult",
    "PlaneBasis",
    "PlaneResult",
    "SliceResult",
    "evaluate_state",
    "filter_normalized_direction",
    "monotonic_interpolation",
    "plane",
    "plot_plane",
    "random_slice",
]


# --- shared helpers --------------------------------------------------------------------------
def evaluate_state(
    model: nn.Module,
    state: Mapping[str, Tensor],
    data: DataLike,
    *,
    bn_data: DataLike | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 1024,
) -> Metrics:
    """Loss and accuracy of ``model`` holding ``state``; BatchNorm statistics recomputed first.

    When the model has BatchNorm layers and ``bn_data`` is given, the running statistics are
    recomputed on ``bn_data`` with an exact cumulative average (``mc.reset_bn``) before evaluating;
    otherwise the state's own buffers are used.

    Args:
        model: the architecture (not modified).
        state: the weights to evaluate.
        data: evaluation data (DataLoader, Dataset or ``(inputs, targets)``).
        bn_data: data for the BatchNorm statistics (typically the training set), or ``None``.
        device: where to run (default: the model's device).
        batch_size: for a Dataset/tuple.

    Returns:
        :class:`~modeconn.Metrics`.

    Example:
        >>> m = nn.Linear(3, 2); x, y = torch.randn(8, 3), torch.zeros(8, dtype=torch.long)
        >>> evaluate_state(m, m.state_dict(), (x, y)).n
        8
    """
    run = StateRunner(model, device=device, bn_data=bn_data, batch_size=batch_size)
    return run(state, data)


def _runner(
    model: nn.Module,
    data: DataLike,
    bn_data: DataLike | None,
    device: str | torch.device | None,
    batch_size: int,
) -> tuple[StateRunner, Batches]:
    """One runner and the data read once, for a grid of states."""
    run = StateRunner(model, device=device, bn_data=bn_data, batch_size=batch_size)
    return run, cache_batches(data, run.device, batch_size)


def _param_names(model: nn.Module, state: Mapping[str, Tensor]) -> list[str]:
    names = [n for n, _ in model.named_parameters() if n in state and state[n].is_floating_point()]
    if not names:
        raise IncompatibleModelsError("the state has no floating-point parameters of the model")
    return names


def _flat(state: Mapping[str, Tensor], names: Sequence[str]) -> Tensor:
    return torch.cat([state[n].detach().reshape(-1).to("cpu", torch.float64) for n in names])


def _progress(iterable: Any, total: int, description: str, enabled: bool) -> Any:
    with progress_bar(enabled, total=total, description=description) as advance:
        for item in iterable:
            yield item
            advance(None)


def _grid_axis(lo: float, hi: float, margin: float, n: int) -> Tensor:
    span = hi - lo
    return torch.linspace(lo - margin * span, hi + margin * span, n, dtype=torch.float64)


# --- plane through three models ------------------------------------------------------------
class PlaneBasis:
    """The plane through three states: origin ``θ0``, orthonormal ``e1``, ``e2`` (Gram–Schmidt).

    ``e1 = (θ1 − θ0)/‖θ1 − θ0‖``, ``e2 = v/‖v‖`` with ``v = (θ2 − θ0) − ⟨θ2 − θ0, e1⟩ e1``; inner
    products over the model's floating-point parameters (buffers such as BatchNorm statistics
    are not coordinates). The point ``(x, y)`` is the affine combination
    ``c0·θ0 + c1·θ1 + c2·θ2`` with ``c2 = y/dy``, ``c1 = x/dx − y·b/(dx·dy)``, ``c0 = 1 − c1 − c2``
    (``dx = ‖θ1 − θ0‖``, ``b = ⟨θ2 − θ0, e1⟩``, ``dy = ‖v‖``), so buffers are combined with the
    same coefficients and the three models are reproduced exactly at their coordinates.

    Args:
        states: three state dicts of one architecture.
        names: the parameter names spanning the plane.

    Example:
        >>> s = [{"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([2.0, 0.0])},
        ...      {"w": torch.tensor([1.0, 3.0])}]
        >>> PlaneBasis(s, ["w"]).points.tolist()
        [[0.0, 0.0], [2.0, 0.0], [1.0, 3.0]]
    """

    def __init__(self, states: Sequence[Mapping[str, Tensor]], names: Sequence[str]) -> None:
        if len(states) != 3:
            raise ConfigError(f"a plane needs exactly three states, got {len(states)}")
        check_compatible(list(states), ["model 0", "model 1", "model 2"])
        self.states = [dict(s) for s in states]
        self.names = list(names)
        self.origin = _flat(states[0], self.names)
        u = _flat(states[1], self.names) - self.origin
        w = _flat(states[2], self.names) - self.origin
        self.dx = float(u.norm())
        if self.dx <= 1e-9 * max(1.0, float(self.origin.norm())):
            raise IncompatibleModelsError("models 0 and 1 are identical: they do not span a plane")
        self.e1 = u / self.dx
        self.b = float(w @ self.e1)
        v = w - self.b * self.e1
        self.dy = float(v.norm())
        if self.dy <= 1e-6 * float(w.norm()):
            raise IncompatibleModelsError(
                "the three models are collinear: they do not span a plane (pick a different third)"
            )
        self.e2 = v / self.dy

    @property
    def points(self) -> Tensor:
        """Coordinates of the three models, ``(3, 2)``: ``(0, 0)``, ``(dx, 0)``, ``(b, dy)``."""
        return torch.tensor([[0.0, 0.0], [self.dx, 0.0], [self.b, self.dy]], dtype=torch.float64)

    def coefficients(self, x: float, y: float) -> tuple[float, float, float]:
        """Affine weights ``(c0, c1, c2)`` of the point ``(x, y)``."""
        c2 = y / self.dy
        c1 = x / self.dx - y * self.b / (self.dx * self.dy)
        return 1.0 - c1 - c2, c1, c2

    def state(self, x: float, y: float) -> State:
        """The state at plane coordinates ``(x, y)``."""
        c = self.coefficients(float(x), float(y))
        if c == (1.0, 0.0, 0.0):
            return dict(self.states[0])
        return combine(self.states, list(c))

    def coordinates(self, state: Mapping[str, Tensor]) -> tuple[float, float, float]:
        """``(x, y, distance)``: the projection of ``state`` into the plane, its distance to it."""
        d = _flat(state, self.names) - self.origin
        x, y = float(d @ self.e1), float(d @ self.e2)
        off = d - x * self.e1 - y * self.e2
        return x, y, float(off.norm())


@dataclass
class PlaneResult:
    """Loss and accuracy over a grid in the plane through three models.

    Attributes:
        xs, ys: grid coordinates along ``e1`` and ``e2``.
        loss, accuracy: ``(len(ys), len(xs))`` tensors (row ``j`` is ``ys[j]``).
        points: ``(3, 2)`` coordinates of the three models.
        basis: the :class:`PlaneBasis` (``.state(x, y)``, ``.coordinates(state)``).
        curve: ``(k, 2)`` coordinates of the projected curve, or ``None``.
        curve_distance: ``(k,)`` distance of each curve point to the plane, or ``None``.
    """

    xs: Tensor
    ys: Tensor
    loss: Tensor
    accuracy: Tensor
    points: Tensor
    basis: PlaneBasis = field(repr=False)
    curve: Tensor | None = None
    curve_distance: Tensor | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the basis is omitted)."""
        out: dict[str, Any] = {
            "xs": self.xs.tolist(),
            "ys": self.ys.tolist(),
            "loss": self.loss.tolist(),
            "accuracy": self.accuracy.tolist(),
            "points": self.points.tolist(),
        }
        if self.curve is not None:
            out["curve"] = self.curve.tolist()
            dist = self.curve_distance
            out["curve_distance"] = None if dist is None else dist.tolist()
        return out


def plane(
    model: nn.Module,
    states: Sequence[Mapping[str, Tensor]],
    data: DataLike,
    *,
    grid: int | tuple[int, int] = 21,
    margin: float = 0.2,
    bn_data: DataLike | None = None,
    curve: Any = None,
    curve_points: int = 61,
    device: str | torch.device | None = None,
    batch_size: int = 1024,
    progress: bool = True,
) -> PlaneResult:
    """Evaluate loss and accuracy on a grid in the plane through three models.

    Garipov et al. (2018) plane: with ``e1 = (θ1 − θ0)/‖θ1 − θ0‖`` and ``e2`` the normalised part of
    ``θ2 − θ0`` orthogonal to ``e1`` (Gram–Schmidt), the grid point ``(x, y)`` is
    ``θ0 + x·e1 + y·e2``. The grid covers the bounding box of the three models (and the projected
    curve) widened by ``margin`` times its extent on each side. BatchNorm statistics are
    recomputed at every grid point when ``bn_data`` is given.

    Args:
        model: the architecture (not modified).
        states: three state dicts, e.g. two endpoints and a curve's bend.
        data: evaluation data.
        grid: points per axis, or ``(nx, ny)``.
        margin: extra extent on each side, as a fraction of the box's width/height.
        bn_data: data for BatchNorm statistics (typically the training set), or ``None``.
        curve: optional path (anything with ``.state(t)``) to project into the plane.
        curve_points: number of ``t`` values at which the curve is projected.
        device: where to run.
        batch_size: evaluation batch size for a Dataset/tuple.
        progress: show a progress bar.

    Returns:
        :class:`PlaneResult`.

    Example:
        >>> m = nn.Linear(2, 2)
        >>> s = [{k: v + i * torch.randn_like(v) for k, v in m.state_dict().items()}
        ...      for i in range(3)]
        >>> x, y = torch.randn(16, 2), torch.randint(0, 2, (16,))
        >>> plane(m, s, (x, y), grid=3, progress=False).loss.shape
        torch.Size([3, 3])
    """
    nx, ny = (grid, grid) if isinstance(grid, int) else tuple(grid)
    if nx < 2 or ny < 2:
        raise ConfigError(f"grid needs at least 2 points per axis, got {(nx, ny)}")
    if margin < 0:
        raise ConfigError(f"margin must be >= 0, got {margin}")
    basis = PlaneBasis(states, _param_names(model, states[0]))
    pts = basis.points
    curve_xy = curve_dist = None
    if curve is not None:
        tgrid = torch.linspace(0, 1, curve_points)
        coords = [basis.coordinates(curve.state(float(t))) for t in tgrid]
        curve_xy = torch.tensor([[c[0], c[1]] for c in coords], dtype=torch.float64)
        curve_dist = torch.tensor([c[2] for c in coords], dtype=torch.float64)
    box = pts if curve_xy is None else torch.cat([pts, curve_xy])
    xs = _grid_axis(float(box[:, 0].min()), float(box[:, 0].max()), margin, nx)
    ys = _grid_axis(float(box[:, 1].min()), float(box[:, 1].max()), margin, ny)
    loss = torch.empty(ny, nx, dtype=torch.float64)
    acc = torch.empty(ny, nx, dtype=torch.float64)
    run, batches = _runner(model, data, bn_data, device, batch_size)
    cells = [(j, i) for j in range(ny) for i in range(nx)]
    for j, i in _progress(cells, len(cells), "plane", progress):
        m = run(basis.state(float(xs[i]), float(ys[j])), batches)
        loss[j, i], acc[j, i] = m.loss, m.accuracy
    return PlaneResult(xs, ys, loss, acc, pts, basis, curve_xy, curve_dist)


# --- random filter-normalised slices --------------------------------------------------------
def filter_normalized_direction(
    state: Mapping[str, Tensor],
    names: Sequence[str] | None = None,
    *,
    seed: int = 0,
    ignore_bias_bn: bool = True,
) -> State:
    """A random Gaussian direction with filter normalisation (Li et al. 2018).

    ``d ~ N(0, I)`` of the state's shapes; for every tensor with ≥ 2 axes, each filter (slice along
    axis 0, i.e. one output unit/channel) is rescaled to the norm of the same filter of ``θ``:
    ``d_i ← d_i · ‖θ_i‖ / ‖d_i‖``. Tensors with ≤ 1 axis (biases, norm-layer parameters) are zeroed
    (``ignore_bias_bn=True``, the paper's default) or set to ``θ`` itself.

    Args:
        state: the point ``θ`` the slice goes through.
        names: the tensors to perturb (default: every floating tensor of ``state``).
        seed: seed of a private generator (the global RNG is untouched).
        ignore_bias_bn: zero the direction on 0/1-axis tensors.

    Returns:
        ``{name: direction}`` for ``names``.

    Example:
        >>> d = filter_normalized_direction({"w": torch.ones(3, 4), "b": torch.ones(3)})
        >>> [round(float(n), 4) for n in d["w"].norm(dim=1)], float(d["b"].abs().sum())
        ([2.0, 2.0, 2.0], 0.0)
    """
    gen = torch.Generator().manual_seed(seed)
    names = [k for k, v in state.items() if v.is_floating_point()] if names is None else list(names)
    out: State = {}
    for k in names:
        w = state[k].detach()
        if w.dim() <= 1:
            out[k] = torch.zeros_like(w) if ignore_bias_bn else w.clone()
            continue
        d = torch.randn(w.shape, generator=gen, dtype=torch.float64)
        w64 = w.to("cpu", torch.float64)
        wn = w64.reshape(w.shape[0], -1).norm(dim=1)
        dn = d.reshape(w.shape[0], -1).norm(dim=1)
        scale = (wn / (dn + 1e-10)).view(-1, *([1] * (w.dim() - 1)))
        out[k] = (d * scale).to(w.device, w.dtype)
    return out


@dataclass
class SliceResult:
    """Loss and accuracy along random directions through one state.

    Attributes:
        alphas: coefficients along the first direction.
        betas: coefficients along the second direction (``None`` for a 1-D slice).
        loss, accuracy: ``(len(alphas),)`` or ``(len(betas), len(alphas))`` tensors.
        directions: the direction state dicts (one or two).
    """

    alphas: Tensor
    betas: Tensor | None
    loss: Tensor
    accuracy: Tensor
    directions: list[State] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "alphas": self.alphas.tolist(),
            "betas": None if self.betas is None else self.betas.tolist(),
            "loss": self.loss.tolist(),
            "accuracy": self.accuracy.tolist(),
        }


def _shift(
    state: Mapping[str, Tensor], dirs: Sequence[Mapping[str, Tensor]], coefs: Sequence[float]
) -> State:
    """``θ + Σ c_i d_i`` on the directions' tensors (:func:`~modeconn.combine`); others kept."""
    moved = {k: state[k] for k in dirs[0]}
    return {**state, **combine([moved, *dirs], [1.0, *coefs])}


def random_slice(
    model: nn.Module,
    state: Mapping[str, Tensor],
    data: DataLike,
    *,
    dims: int = 1,
    steps: int = 21,
    span: float = 1.0,
    filter_norm: bool = True,
    seed: int = 0,
    bn_data: DataLike | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 1024,
    progress: bool = True,
) -> SliceResult:
    """Loss along one or two random directions through ``state`` (Li et al. 2018).

    ``L(θ + α·d1)`` (``dims=1``) or ``L(θ + α·d1 + β·d2)`` (``dims=2``) for ``α, β`` on
    ``linspace(-span, span, steps)``. With ``filter_norm`` each direction is filter-normalised
    (:func:`filter_normalized_direction`); otherwise it is a plain Gaussian scaled to ``‖θ‖``.
    Only the model's parameters move; buffers stay (or are recomputed with ``bn_data``).

    Args:
        model: the architecture (not modified).
        state: the centre ``θ``.
        data: evaluation data.
        dims: 1 or 2.
        steps: grid points per axis.
        span: the grid covers ``[-span, span]``.
        filter_norm: filter-normalise the directions.
        seed: seed of the directions (the second uses ``seed + 1``).
        bn_data: data for BatchNorm statistics, or ``None``.
        device: where to run.
        batch_size: evaluation batch size.
        progress: show a progress bar.

    Returns:
        :class:`SliceResult`.

    Example:
        >>> m = nn.Linear(3, 2); x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
        >>> random_slice(m, m.state_dict(), (x, y), steps=5, progress=False).loss.shape
        torch.Size([5])
    """
    if dims not in (1, 2):
        raise ConfigError(f"dims must be 1 or 2, got {dims}")
    if steps < 2:
        raise ConfigError(f"steps must be >= 2, got {steps}")
    names = _param_names(model, state)
    dirs = []
    for i in range(dims):
        if filter_norm:
            dirs.append(filter_normalized_direction(state, names, seed=seed + i))
        else:
            gen = torch.Generator().manual_seed(seed + i)
            raw = {
                k: torch.randn(state[k].shape, generator=gen, dtype=torch.float64) for k in names
            }
            scale = float(_flat(state, names).norm()) / float(_flat(raw, names).norm())
            dirs.append(
                {k: (v * scale).to(state[k].device, state[k].dtype) for k, v in raw.items()}
            )
    alphas = torch.linspace(-span, span, steps, dtype=torch.float64)
    betas = alphas.clone() if dims == 2 else None
    shape = (steps,) if dims == 1 else (steps, steps)
    loss = torch.empty(shape, dtype=torch.float64)
    acc = torch.empty(shape, dtype=torch.float64)
    cells = (
        [(i,) for i in range(steps)]
        if dims == 1
        else [(j, i) for j in range(steps) for i in range(steps)]
    )
    run, batches = _runner(model, data, bn_data, device, batch_size)
    for cell in _progress(cells, len(cells), "slice", progress):
        coefs = [float(alphas[cell[-1]])] + ([float(alphas[cell[0]])] if dims == 2 else [])
        m = run(_shift(state, dirs, coefs), batches)
        loss[cell], acc[cell] = m.loss, m.accuracy
    return SliceResult(alphas, betas, loss, acc, dirs)


# --- monotonic linear interpolation -------------------------------------------------------
@dataclass
class MLIResult:
    """Loss along the straight line from initialisation to the trained solution.

    Attributes:
        ts: interpolation coefficients (0 = initialisation, 1 = trained).
        loss, accuracy: per-``t`` tensors.
        monotonic: ``True`` when the loss never rises by more than the tolerance.
        max_bump: largest rise ``max_{i<j} L(t_j) − L(t_i)`` (0 when monotone non-increasing).
        bump_t: the ``t`` where that rise peaks (``None`` when there is no rise).
    """

    ts: Tensor
    loss: Tensor
    accuracy: Tensor
    monotonic: bool
    max_bump: float
    bump_t: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ts": self.ts.tolist(),
            "loss": self.loss.tolist(),
            "accuracy": self.accuracy.tolist(),
            "monotonic": self.monotonic,
            "max_bump": self.max_bump,
            "bump_t": self.bump_t,
        }


def largest_bump(values: Tensor) -> tuple[float, int | None]:
    """``max_{i<j} v_j − v_i`` clipped at 0, and the index ``j`` where it is reached.

    Example:
        >>> largest_bump(torch.tensor([3.0, 1.0, 2.0, 0.0]))
        (1.0, 2)
    """
    v = values.to(torch.float64)
    if v.numel() < 2:
        return 0.0, None
    running_min = torch.cummin(v, dim=0).values
    rise = v[1:] - running_min[:-1]
    j = int(rise.argmax())
    best = float(rise[j])
    return (best, j + 1) if best > 0 else (0.0, None)


def monotonic_interpolation(
    model: nn.Module,
    state_init: Mapping[str, Tensor],
    state_final: Mapping[str, Tensor],
    data: DataLike,
    *,
    ts: int | Sequence[float] | Tensor = 25,
    tol: float = 0.0,
    bn_data: DataLike | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 1024,
    progress: bool = True,
) -> MLIResult:
    """Monotonic linear interpolation test (Lucas et al., ICML 2021).

    Evaluates ``L((1 − t)·θ_init + t·θ_final)`` on a grid of ``t`` and reports whether it is
    monotonically non-increasing, with the largest bump ``max_{i<j} L(t_j) − L(t_i)``.

    Args:
        model: the architecture (not modified).
        state_init: the initialisation ``θ_init``.
        state_final: the trained solution ``θ_final``.
        data: evaluation data.
        ts: number of evenly spaced ``t`` in ``[0, 1]``, or the values themselves (sorted).
        tol: rises up to ``tol`` still count as monotone.
        bn_data: data for BatchNorm statistics, or ``None``.
        device: where to run.
        batch_size: evaluation batch size.
        progress: show a progress bar.

    Returns:
        :class:`MLIResult`.

    Example:
        >>> m = nn.Linear(3, 2); x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
        >>> s0 = {k: torch.zeros_like(v) for k, v in m.state_dict().items()}
        >>> r = monotonic_interpolation(m, s0, m.state_dict(), (x, y), ts=5, progress=False)
        >>> r.loss.shape
        torch.Size([5])
    """
    check_compatible([state_init, state_final], ["initial state", "final state"])
    if isinstance(ts, int):
        if ts < 2:
            raise ConfigError(f"ts must be >= 2 points, got {ts}")
        grid = torch.linspace(0, 1, ts, dtype=torch.float64)
    else:
        grid = torch.as_tensor(ts, dtype=torch.float64).flatten()
        if grid.numel() < 2 or not bool((grid[1:] > grid[:-1]).all()):
            raise ConfigError("ts must hold at least two increasing values")
    loss = torch.empty(len(grid), dtype=torch.float64)
    acc = torch.empty(len(grid), dtype=torch.float64)
    run, batches = _runner(model, data, bn_data, device, batch_size)
    for i in _progress(range(len(grid)), len(grid), "MLI", progress):
        m = run(lerp(state_init, state_final, float(grid[i])), batches)
        loss[i], acc[i] = m.loss, m.accuracy
    bump, j = largest_bump(loss)
    return MLIResult(grid, loss, acc, bump <= tol, bump, None if j is None else float(grid[j]))


# --- plotting ------------------------------------------------------------------------------
def plot_plane(
    result: PlaneResult,
    path: str | os.PathLike[str],
    *,
    metric: str = "loss",
    title: str | None = None,
    labels: Sequence[str] = ("θ0", "θ1", "θ2"),
    levels: int = 20,
) -> str:
    """Draw a :class:`PlaneResult` as a filled contour plot (PNG/SVG/PDF by suffix), atomically.

    Loss is drawn on a log scale; the three models are marked and the projected curve, if any,
    is drawn as a line.

    Args:
        result: from :func:`plane`.
        path: output file.
        metric: ``"loss"`` or ``"error"`` (1 − accuracy).
        title: figure title.
        labels: names of the three models.
        levels: number of contour levels.

    Returns:
        The path written, as a string.

    Example:
        >>> plot_plane(res, "report/plane.png")  # doctest: +SKIP
        'report/plane.png'
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .io import atomic_path

    if metric not in ("loss", "error"):
        raise ConfigError(f"metric must be 'loss' or 'error', got {metric!r}")
    z = (result.loss if metric == "loss" else 1.0 - result.accuracy).numpy()
    fig = Figure(figsize=(5.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    zmin = max(float(z.min()), 1e-6)
    if metric == "loss" and float(z.max()) > zmin:
        import numpy as np
        from matplotlib.colors import LogNorm

        lv = np.geomspace(zmin, float(z.max()), levels)
        # log-spaced levels need a log colour norm, or every level below the top few is dark
        cs = ax.contourf(
            result.xs.numpy(),
            result.ys.numpy(),
            np.maximum(z, zmin),
            levels=lv,
            cmap="viridis",
            norm=LogNorm(vmin=zmin, vmax=float(z.max())),
        )
    else:
        cs = ax.contourf(result.xs.numpy(), result.ys.numpy(), z, levels=levels, cmap="viridis")
    bar = fig.colorbar(cs, ax=ax, label=metric)
    ticks = list(cs.levels)[::3]  # an array at runtime; typed Iterable[float]
    bar.set_ticks(ticks, labels=[f"{v:.3g}" for v in ticks])
    if result.curve is not None:
        c = result.curve.numpy()
        ax.plot(c[:, 0], c[:, 1], color="white", lw=2, label="curve")
    pts = result.points.numpy()
    ax.scatter(pts[:, 0], pts[:, 1], color="red", zorder=3)
    for (px, py), name in zip(pts, labels, strict=False):
        ax.annotate(name, (px, py), textcoords="offset points", xytext=(4, 4), color="white")
    ax.set_xlabel("e1")
    ax.set_ylabel("e2")
    # equal axes show true distances; a very flat plane (bend close to the line) would be a
    # sliver, so beyond 3:1 the axes scale independently (the ticks still give the distances)
    width = float(result.xs[-1] - result.xs[0])
    height = float(result.ys[-1] - result.ys[0])
    flat = math.isclose(result.basis.dy, 0.0) or height < width / 3
    ax.set_aspect("auto" if flat else "equal")
    if title:
        ax.set_title(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
    return str(path)
