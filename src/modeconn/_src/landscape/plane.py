"""The plane through three models (Garipov et al. 2018) and its contour plot."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, IncompatibleModelsError
from ..evaluation import DataLike
from ..state import check_compatible, combine, gram
from .common import _flat, _grid_axis, _param_names, _progress, _runner

State = dict[str, Tensor]


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
        # inner products only (one pass, no flattened copy): <u,u>, <u,w>, <w,w>, u = θ1 − θ0
        g = gram(self.states[1:], self.names, self.states[0])
        self.dx = float(g[0, 0]) ** 0.5
        norm0 = float(gram(self.states[:1], self.names)[0, 0]) ** 0.5
        if self.dx <= 1e-9 * max(1.0, norm0):
            raise IncompatibleModelsError("models 0 and 1 are identical: they do not span a plane")
        self.b = float(g[0, 1]) / self.dx
        self.dy = max(float(g[1, 1]) - self.b**2, 0.0) ** 0.5
        if self.dy <= 1e-6 * float(g[1, 1]) ** 0.5:
            raise IncompatibleModelsError(
                "the three models are collinear: they do not span a plane (pick a different third)"
            )

    @property
    def origin(self) -> Tensor:
        """θ0 flattened (float64; built on demand)."""
        return _flat(self.states[0], self.names)

    @property
    def e1(self) -> Tensor:
        """``(θ1 − θ0)/dx`` flattened (float64; built on demand)."""
        return (_flat(self.states[1], self.names) - self.origin) / self.dx

    @property
    def e2(self) -> Tensor:
        """``((θ2 − θ0) − b·e1)/dy`` flattened (float64; built on demand)."""
        w = _flat(self.states[2], self.names) - self.origin
        return (w - self.b * self.e1) / self.dy

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
        g = gram([self.states[1], self.states[2], dict(state)], self.names, self.states[0])
        x = float(g[2, 0]) / self.dx
        y = (float(g[2, 1]) - self.b * x) / self.dy
        foot = self.state(x, y)  # the projection; the distance measured to it, not cancelled
        return x, y, float(gram([dict(state)], self.names, foot)[0, 0]) ** 0.5


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

    from ..io import atomic_path

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
