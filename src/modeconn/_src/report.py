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
            ts, ev.values("accuracy", name).tolist(), marker="o", ms=3, color=color, label=label
        )
        if "robust_accuracy" in ev.results[name]:
            ax_acc.plot(
                ts,
                ev.values("robust_accuracy", name).tolist(),
                ls="--",
                color=color,
                label=f"{label} (robust)",
            )
    split_name = split or next(iter(evaluations.values())).primary
    ax_loss.set(xlabel="t", ylabel=f"loss ({split_name})", title="loss along the path")
    ax_acc.set(xlabel="t", ylabel=f"accuracy ({split_name})", title="accuracy along the path")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.set_xlim(0, 1)
    ax_acc.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    dest = Path(path)
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, dpi=dpi, format=dest.suffix.lstrip(".") or "png")
    return dest
