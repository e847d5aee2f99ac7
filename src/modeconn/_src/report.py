"""Plots for reports: loss and accuracy along several paths on shared axes (matplotlib, Agg)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .io import atomic_path


def plot_paths(
    evaluations: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    split: str | None = None,
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """Draw loss and accuracy along each path, all paths on one pair of axes, and save the figure.

    Left panel: loss against t; right panel: accuracy against t (robust accuracy dashed when it
    was measured). The file is written atomically; the format follows the suffix (.png, .pdf,
    .svg). No global matplotlib state is touched (an Agg canvas is used directly).

    Args:
        evaluations: ``{label: PathEvaluation}`` (e.g. ``{"linear": ev_lin, "bezier": ev}``).
        path: the image file to write.
        split: which split to draw (default: each evaluation's primary split).
        title: figure title.
        dpi: resolution for raster formats.

    Returns:
        The file written.

    Example:
        >>> plot_paths({"linear": ev_lin, "curve": ev_curve}, "report/paths.png")  # doctest: +SKIP
    """
    fig = paths_figure(evaluations, split=split, title=title)
    dest = Path(path)
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, dpi=dpi, format=dest.suffix.lstrip(".") or "png")
    return dest


def paths_figure(
    evaluations: Mapping[str, Any], *, split: str | None = None, title: str | None = None
) -> Any:
    """The figure :func:`plot_paths` saves: loss (left) and accuracy (right, %) against t.

    Args:
        evaluations: ``{label: PathEvaluation}``.
        split: which split to draw (default: each evaluation's primary split).
        title: figure title.

    Returns:
        A ``matplotlib.figure.Figure`` on an Agg canvas (no global pyplot state).

    Example:
        >>> fig = paths_figure({"linear": ev})  # doctest: +SKIP
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not evaluations:
        raise ConfigError("plot_paths needs at least one evaluation")
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for i, (label, ev) in enumerate(evaluations.items()):
        color = f"C{i % 10}"
        name = split or ev.primary
        ts = ev.ts.tolist()
        ax_loss.plot(
            ts, ev.values("loss", name).tolist(), marker="o", ms=3, color=color, label=label
        )
        ax_acc.plot(
            ts, (100 * ev.values("accuracy", name)).tolist(), marker="o", ms=3, color=color,
            label=label,
        )
        if "robust_accuracy" in ev.results[name]:
            ax_acc.plot(
                ts,
                (100 * ev.values("robust_accuracy", name)).tolist(),
                ls="--",
                color=color,
                label=f"{label} (robust)",
            )
    split_name = split or next(iter(evaluations.values())).primary
    ax_loss.set(xlabel="position on the path t (0: A, 1: B)",
                ylabel=f"{split_name} loss (cross-entropy, nats)", title="loss along the path")
    ax_acc.set(xlabel="position on the path t (0: A, 1: B)", ylabel=f"{split_name} accuracy (%)",
               title="accuracy along the path")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.set_xlim(0, 1)
    ax_acc.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return fig
