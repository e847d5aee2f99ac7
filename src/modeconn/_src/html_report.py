"""One self-contained HTML page (inline SVG figures, tables) for a sweep or the demo's report."""

from __future__ import annotations

import html
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .io import atomic_write

REPORT_FILE = "report.html"
_UNITS = {
    "width": "hidden units per layer",
    "depth": "hidden layers",
    "epochs": "epochs",
    "train_epochs": "epochs",
    "lr": "peak learning rate",
    "train_lr": "peak learning rate",
}
_CSS = """body{font:15px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px;
text-align:right}th{background:#f3f3f3}figure{margin:1em 0}svg{max-width:100%;height:auto}
.note{color:#555}"""


def _svg(fig: Any) -> str:
    """The figure as inline SVG markup (text kept as text)."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4g}"
        return html.escape("" if v is None else str(v))

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _page(title: str, parts: Sequence[str]) -> str:
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>"
            f"{html.escape(title)}</title><style>{_CSS}</style></head><body><h1>"
            f"{html.escape(title)}</h1>{''.join(parts)}</body></html>\n")  # fmt: skip


def _figure() -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def barrier_figure(rows: Sequence[Mapping[str, Any]], key: str) -> Any:
    """Test loss and error barrier against grid key ``key``: mean ± std over seed pairs (and any
    other grid keys), one line per alignment method, one row of panels per path kind.

    Args:
        rows: sweep rows (``mc.sweep.load``).
        key: a grid-key column, e.g. ``"width"``.

    Returns:
        A ``matplotlib.figure.Figure`` (Agg canvas, no pyplot state).

    Example:
        >>> fig = barrier_figure(mc.sweep.load("sweep-out"), "width")  # doctest: +SKIP
    """
    from .sweep import summarize

    rows = [dict(r) for r in rows]
    kinds = list(dict.fromkeys(r["path"] for r in rows))
    fig = _figure()
    fig.set_size_inches(10, 3.4 * len(kinds))
    axes = fig.subplots(len(kinds), 2, squeeze=False)
    xs_all = sorted({r[key] for r in rows}, key=lambda v: (isinstance(v, str), v))
    numeric = _numeric(xs_all)
    for i, kind in enumerate(kinds):
        groups = summarize([r for r in rows if r["path"] == kind], ["align", key])
        for j, (metric, scale, label) in enumerate((
            ("loss_barrier", 1.0, "test loss barrier (nats)"),
            ("error_barrier", 100.0, "test error barrier (percentage points)"),
        )):  # fmt: skip
            ax = axes[i][j]
            methods = sorted({g["align"] for g in groups}, key=lambda m: (m != "none", m))
            for c, method in enumerate(methods):  # the naive baseline first
                pts = [g for g in groups if g["align"] == method]
                pts.sort(key=lambda g: xs_all.index(g[key]))
                x = [g[key] if numeric else xs_all.index(g[key]) for g in pts]
                m = [scale * g[f"{metric}_mean"] for g in pts]
                s = [scale * g[f"{metric}_std"] for g in pts]
                ax.errorbar(x, m, yerr=s, marker="o", ms=4, capsize=3, color=f"C{c}",
                            label=f"{method} (n={pts[0]['n']})")  # fmt: skip
            if numeric and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 8:
                ax.set_xscale("log", base=2)
            if not numeric:
                ax.set_xticks(range(len(xs_all)), [str(v) for v in xs_all])
            unit = _UNITS.get(key)
            ax.set_xlabel(f"{key} ({unit})" if unit else key)
            ax.set_ylabel(label)
            ax.set_title(f"{kind} path: {label.split(' (')[0]}")
            ax.axhline(0, color="grey", lw=0.8)
            ax.grid(alpha=0.3)
            if numeric:
                ax.set_xticks(xs_all, [str(v) for v in xs_all])
            ax.legend(title="alignment", fontsize="small")
    return fig


def plot_barriers(
    rows: Sequence[Mapping[str, Any]], key: str, path: str | os.PathLike[str], *, dpi: int = 200
) -> Path:
    """Save :func:`barrier_figure` (``.svg``, ``.pdf`` or ``.png`` at ``dpi``), atomically.

    Example:
        >>> plot_barriers(mc.sweep.load("out"), "width", "docs/results/width.svg")  # doctest: +SKIP
    """
    from .io import atomic_path

    dest = Path(path)
    fig = barrier_figure(rows, key)
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, dpi=dpi, format=dest.suffix.lstrip(".") or "png", bbox_inches="tight")
    return dest


def _accuracy_figure(rows: list[dict[str, Any]], folder: Path, key: str | None) -> str:
    """Test accuracy along each path kind, mean over seed pairs, per value of ``key``."""
    values = list(dict.fromkeys(r[key] for r in rows)) if key else [None]
    values = values[:8]
    fig = _figure()
    cols = min(4, len(values))
    nrows = math.ceil(len(values) / cols)
    fig.set_size_inches(3.6 * cols + 1, 3.2 * nrows)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax, v in zip(axes, values, strict=False):
        curves: dict[tuple[str, str], list[list[float]]] = {}
        ts: list[float] = []
        for r in rows:
            if (key and r[key] != v) or not r.get("artifact"):
                continue
            p = folder / r["artifact"]
            if not p.is_file():
                continue
            d = json.loads(p.read_text())
            ts = d["ts"]
            acc = d["splits"]["test"]["values"]["accuracy"]
            curves.setdefault((r["path"], r["align"]), []).append(acc)
        # the naive baseline first, as in the barrier figure (same colours per method)
        order = sorted(curves, key=lambda pa: (pa[0], pa[1] != "none", pa[1]))
        for c, (path, method) in enumerate(order):
            label, accs = f"{path}, {method}", curves[(path, method)]
            mean = [100 * sum(col) / len(col) for col in zip(*accs, strict=True)]
            ax.plot(ts, mean, color=f"C{c % 10}", label=label)
        ax.set_xlabel("position on the path t (0: A, 1: B)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{key} = {v}" if key else "all cells")
        ax.grid(alpha=0.3)
        ax.legend(title="path, alignment", fontsize="x-small")
    for ax in axes[len(values) :]:
        ax.set_visible(False)
    return _svg(fig)


def _summary_table(rows: list[dict[str, Any]], keys: list[str]) -> str:
    from .sweep import summarize

    def ms(g: dict[str, Any], m: str, scale: float = 1.0) -> str:
        return f"{scale * g[m + '_mean']:.3f} ± {scale * g[m + '_std']:.3f}"

    groups = summarize(rows, [*keys, "align", "path"])
    body = [[*(g[k] for k in keys), g["align"], g["path"], g["n"], ms(g, "loss_barrier"),
             ms(g, "error_barrier", 100), ms(g, "test_acc_mean", 100), ms(g, "test_acc_min", 100)]
            for g in groups]  # fmt: skip
    cols = [*keys, "align", "path", "pairs", "test loss barrier", "test error barrier (%)",
            "mean test acc (%)", "min test acc (%)"]  # fmt: skip
    return _table(cols, body)


def sweep_page(folder: Path) -> str:
    """The HTML of a sweep folder's report."""
    from .sweep import load, status

    rows = load(folder)
    st = status(folder)
    keys = st["keys"]
    parts = [
        f"<p class='note'>{st['done']} of {st['cells']} cells done, {st['failed']} failed, "
        f"{st['missing']} missing; {len(rows)} rows. Barriers are on the <b>test</b> split: "
        "max over t of the value minus the straight line between the ends' values (Frankle et "
        "al. 2020). Error bars: standard deviation over seed pairs.</p>"
    ]
    if rows:
        others = "seed pairs" + (" and the other grid keys' values" if len(keys) > 1 else "")
        for key in keys or []:
            parts.append(f"<h2>Barrier against {html.escape(key)}</h2><figure>"
                         f"{_svg(barrier_figure(rows, key))}<figcaption class='note'>Each point: "
                         f"mean ± std over {others} (n rows, in the legend).</figcaption>"
                         "</figure>")  # fmt: skip
        acc = _accuracy_figure(rows, folder, keys[0] if keys else None)
        parts.append(f"<h2>Accuracy along the paths</h2><figure>{acc}</figure>")
        note = ("<p class='note'>mean ± std over seed pairs; barriers and accuracies on the test "
                "split, in nats and %.</p>")  # fmt: skip
        parts.append(f"<h2>Summary</h2>{note}{_summary_table(rows, keys)}")
        cols = [*keys, "seed_a", "seed_b", "align", "path", "loss_barrier", "error_barrier",
                "test_acc_mean", "test_acc_min", "a_test_accuracy", "b_test_accuracy"]  # fmt: skip
        parts.append("<h2>All rows</h2><p class='note'>loss_barrier, error_barrier: test split; "
                     "every column is in results.sqlite, table results.</p>"
                     + _table(cols, [[r.get(c) for c in cols] for r in rows]))  # fmt: skip
    if st["failures"]:
        parts.append("<h2>Failed cells</h2>" + _table(
            ["cell", "attempts", "error"],
            [[f["label"], f["attempts"], f["error"]] for f in st["failures"]]))  # fmt: skip
    return _page(f"modeconn sweep: {folder.resolve().name}", parts)


def demo_page(folder: Path) -> str:
    """The HTML of the demo's report folder (``report.json``)."""
    from .landscape import PlaneResult, plot_plane
    from .paths import PathEvaluation
    from .report import paths_figure

    report = json.loads((folder / "report.json").read_text())
    evs = {k: PathEvaluation.from_dict(v) for k, v in report.get("paths", {}).items()}
    parts = []
    if evs:
        parts.append("<h2>Loss and accuracy along each path (test split)</h2><figure>"
                     f"{_svg(paths_figure(evs, split='test'))}</figure>")  # fmt: skip

    def pct(v: Any) -> Any:
        return None if v is None else 100 * v

    rows = [[k, b.get("loss_test"), b.get("loss_train"), pct(b.get("error_test")),
             pct(b.get("error_train"))] for k, b in report.get("barriers", {}).items()]  # fmt: skip
    parts.append("<h2>Barriers</h2><p class='note'>loss barrier: test split (modeconn's "
                 "convention); train split alongside.</p>" + _table(
                     ["path", "test loss barrier (nats)", "train loss barrier (nats)",
                      "test error barrier (%)", "train error barrier (%)"], rows))  # fmt: skip
    import tempfile
    import types

    import torch

    for label, d in report.get("planes", {}).items():
        t = {k: torch.tensor(d[k]) for k in ("xs", "ys", "loss", "accuracy", "points")}
        curve = torch.tensor(d["curve"]) if d.get("curve") else None
        span = float(t["ys"][-1] - t["ys"][0])
        res = PlaneResult(**t, basis=types.SimpleNamespace(dy=span), curve=curve)  # type: ignore[arg-type]  # plot_plane reads only basis.dy
        with tempfile.TemporaryDirectory() as tmp:
            title = f"train loss in the plane of the {label} curve"
            svg = Path(plot_plane(res, Path(tmp) / "p.svg", labels=("A", "B", "bend"), title=title))
            text = svg.read_text()
        parts.append(f"<h2>Plane of the {html.escape(label)} curve</h2><figure>"
                     f"{text[text.index('<svg'):]}</figure>")  # fmt: skip
    return _page("modeconn demo report", parts)


def write_report(folder: str | os.PathLike[str]) -> Path:
    """Write ``folder/report.html``: one self-contained page, figures inline as SVG.

    For a sweep folder (``results.sqlite``): the test loss and error barriers against each grid
    key (mean ± std over seed pairs, one line per alignment method, a row of panels per path
    kind), test accuracy along the paths, and a table of all rows. For the demo's report folder
    (``report.json``): loss and accuracy along each path, the barriers and the loss planes.

    Args:
        folder: a sweep folder or the demo's report folder.

    Returns:
        The page written (atomically).

    Example:
        >>> write_report("sweep-out")  # doctest: +SKIP
        PosixPath('sweep-out/report.html')
    """
    p = Path(folder)
    if (p / "results.sqlite").is_file():
        text = sweep_page(p)
    elif (p / "report.json").is_file():
        text = demo_page(p)
    else:
        raise ConfigError(
            f"{str(p)!r} is neither a sweep folder (results.sqlite) nor a demo report folder "
            "(report.json)"
        )
    dest = p / REPORT_FILE
    with atomic_write(dest, "w") as f:
        f.write(text)
    return dest
