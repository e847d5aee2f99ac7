"""The end-to-end demo as a pipeline of small stages over a shared context (``modeconn demo``).

Stages are functions ``stage(ctx) -> None`` that read and add keys of one dict. The default
pipeline: load MNIST-1D -> train (or reuse from the cache) two endpoints differing only in seed
-> evaluate the linear path between them -> align B onto A (activation matching, weight
matching) and evaluate the linear paths to the aligned B -> learn Bezier curves between A and B,
unaligned and aligned (the seed paper's comparison) -> print tables and write ``report/``
(report.json, report.html, path.png, the endpoint checkpoints). A later stage adds a path by
putting a
``PathEvaluation`` into ``ctx["paths"][label]``; the report shows every path in its summary
table and plot. Insert stages with :func:`default_stages` + list operations.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .._version import __version__

Context = dict[str, Any]
Stage = Callable[[Context], None]


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo run.

    Attributes:
        model: zoo model of both endpoints.
        model_kwargs: its options (input shape and classes come from the data).
        data: data source.
        seeds: the two endpoints' seeds (initialisation and data order).
        epochs: training epochs per endpoint (``fast`` uses 8).
        lr: peak learning rate.
        points: evaluation points along each path (t evenly spaced in [0, 1]).
        curve_epochs: epochs of curve training (``fast`` uses 4).
        align: add the aligned linear paths (one per method in ``aligners``).
        aligners: the alignment methods (``mc.aligner_names()``); the first also gives the
            aligned curve.
        curves: add the learned Bezier curves (unaligned, and aligned when ``align``).
        plane_grid: grid points per axis of the loss-landscape planes of the curves.
        out: report folder.
        fast: a quick run (fewer epochs), e.g. for tests.
        use_cache: reuse endpoints trained earlier with the same settings.
        device: where to train and evaluate.
        progress: show progress bars.
    """

    model: str = "mlp"
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    data: str = "mnist1d"
    seeds: tuple[int, int] = (0, 1)
    epochs: int = 40
    lr: float = 0.1
    points: int = 25
    curve_epochs: int = 20
    plane_grid: int = 17
    align: bool = True
    aligners: tuple[str, ...] = ("activation", "weight")
    curves: bool = True
    out: str = "report"
    fast: bool = False
    use_cache: bool = True
    device: str | None = None
    progress: bool = True

    @property
    def train_epochs(self) -> int:
        """Epochs actually used (8 in fast mode)."""
        return min(self.epochs, 8) if self.fast else self.epochs

    @property
    def train_curve_epochs(self) -> int:
        """Curve-training epochs actually used (4 in fast mode)."""
        return min(self.curve_epochs, 4) if self.fast else self.curve_epochs

    @property
    def train_plane_grid(self) -> int:
        """Plane grid points per axis actually used (9 in fast mode)."""
        return min(self.plane_grid, 9) if self.fast else self.plane_grid


# --- stages ---------------------------------------------------------------------------------


def stage_data(ctx: Context) -> None:
    """Load the data source: ``ctx["splits"]``."""
    from .. import data

    ctx["splits"] = data.load(ctx["config"].data)


def _endpoint_key(cfg: DemoConfig, seed: int) -> str:
    ident = {
        "model": cfg.model,
        "model_kwargs": dict(cfg.model_kwargs),
        "data": cfg.data,
        "epochs": cfg.train_epochs,
        "lr": cfg.lr,
        "seed": seed,
        "version": __version__,
    }
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    return f"{cfg.model}-{cfg.data}-e{cfg.train_epochs}-seed{seed}-{digest}"


def stage_endpoints(ctx: Context) -> None:
    """Train the two endpoints (or load them from the cache): ``ctx["endpoints"]`` (modules),
    ``ctx["endpoint_meta"]`` (seed, metrics, cached or not) and ``ctx["template"]``."""
    from .. import models
    from ..data import cache_dir
    from .io import load_checkpoint, save_checkpoint
    from .train import train

    cfg: DemoConfig = ctx["config"]
    splits = ctx["splits"]
    say = ctx["say"]
    nets, metas = [], []
    for seed in cfg.seeds:
        path = cache_dir() / "demo" / f"{_endpoint_key(cfg, seed)}.safetensors"
        net, cached = None, False
        if cfg.use_cache and path.is_file():
            try:
                ck = load_checkpoint(path)
                net, metrics, cached = ck.build(), ck.meta.get("metrics", {}), True
            except Exception:  # noqa: BLE001 - a broken cache entry is retrained
                net = None
        if net is None:
            say(f"training endpoint seed={seed} ({cfg.model}, {cfg.train_epochs} epochs) ...")
            init = models.create(
                cfg.model,
                input_shape=splits.input_shape,
                num_classes=splits.num_classes,
                seed=seed,
                **dict(cfg.model_kwargs),
            )
            res = train(
                init,
                splits,
                epochs=cfg.train_epochs,
                lr=cfg.lr,
                seed=seed,
                device=cfg.device,
                progress=cfg.progress,
            )
            net, metrics = res.model, res.metrics
            meta = {"data": cfg.data, "seed": seed, "train": res.config, "metrics": metrics}
            with contextlib.suppress(OSError):  # a read-only cache is not fatal
                save_checkpoint(path, net, meta=meta)
        else:
            say(f"reusing endpoint seed={seed} from {path}")
        ctx.setdefault("endpoint_paths", []).append(path)
        nets.append(net)
        metas.append({"seed": seed, "cached": cached, "metrics": metrics})
    ctx["endpoints"], ctx["endpoint_meta"], ctx["template"] = nets, metas, nets[0]


def stage_linear_path(ctx: Context) -> None:
    """Evaluate the straight line between the endpoints at ``points`` values of t:
    ``ctx["paths"]["linear"]`` (a ``PathEvaluation`` on train and test)."""
    from .paths import LinearPath

    a, b = ctx["endpoints"]
    _evaluate(ctx, "linear", LinearPath(a.state_dict(), b.state_dict()))


_SHORT = {"activation": "act", "weight": "weight"}


def _evaluate(ctx: Context, label: str, path: Any) -> None:
    from .paths import evaluate_path

    cfg: DemoConfig = ctx["config"]
    ctx["paths"][label] = evaluate_path(
        ctx["template"],
        path,
        ctx["splits"],
        ts=cfg.points,
        device=cfg.device,
        progress=cfg.progress,
    )


def stage_aligned_paths(ctx: Context) -> None:
    """Permute B's hidden units onto A's and evaluate the linear path to the aligned B.

    The aligners of ``config.aligners``; by default neuron alignment by activation correlation
    (Li et al. 2016; Tatro et al., NeurIPS 2020, the seed paper) and weight matching (Ainsworth
    et al., ICLR 2023). Adds ``ctx["aligned"][method]`` (the permuted copy of B) and one path
    per method.
    """
    from .align import align
    from .paths import LinearPath

    cfg: DemoConfig = ctx["config"]
    if not cfg.align:
        return
    a, b = ctx["endpoints"]
    ctx["aligned"] = {}
    for method in cfg.aligners:
        ctx["say"](f"aligning B onto A ({method}) ...")
        b_aligned = align(a, b, method=method, data=ctx["splits"].train)
        ctx["aligned"][method] = b_aligned
        path = LinearPath(a.state_dict(), b_aligned.state_dict())
        _evaluate(ctx, f"linear/{_SHORT.get(method, method)}", path)


def stage_curves(ctx: Context) -> None:
    """Learn one-bend Bezier curves (Garipov et al., NeurIPS 2018) between A and B, and between A
    and the activation-aligned B (Tatro et al., NeurIPS 2020), for the same number of epochs."""
    from .paths import fit_curve

    cfg: DemoConfig = ctx["config"]
    if not cfg.curves:
        return
    a, b = ctx["endpoints"]
    pairs = [("bezier", b)]
    aligned = ctx.get("aligned", {})
    if cfg.aligners and cfg.aligners[0] in aligned:
        first = cfg.aligners[0]
        pairs.append((f"bezier/{_SHORT.get(first, first)}", aligned[first]))
    for label, end in pairs:
        ctx["say"](f"learning the {label} curve ({cfg.train_curve_epochs} epochs) ...")
        curve = fit_curve(
            a,
            end,
            ctx["splits"].train,
            kind="bezier",
            bends=1,
            epochs=cfg.train_curve_epochs,
            seed=cfg.seeds[0],
            device=cfg.device,
            progress=cfg.progress,
        )
        ctx.setdefault("curves", {})[label] = curve
        _evaluate(ctx, label, curve)


def stage_planes(ctx: Context) -> None:
    """Loss landscape in the plane through each learned curve's endpoints and bend, with the curve
    projected into it (Garipov et al., NeurIPS 2018, Fig. 1): ``ctx["planes"][label]``."""
    from .landscape import plane

    cfg: DemoConfig = ctx["config"]
    for label, curve in ctx.get("curves", {}).items():
        ctx["say"](f"loss landscape in the plane of the {label} curve ...")
        a, bend, b = curve.points[0], curve.points[1], curve.points[-1]
        ctx.setdefault("planes", {})[label] = plane(
            ctx["template"],
            [a, b, bend],
            ctx["splits"].train,
            grid=cfg.train_plane_grid,
            curve=curve,
            device=cfg.device,
            progress=cfg.progress,
        )


def stage_print(ctx: Context) -> None:
    """Print the per-t table of the first path and one summary row (barriers) per path."""
    from rich.table import Table

    console = ctx["console"]
    paths = ctx.get("paths", {})
    if not paths:
        return
    first_label, first = next(iter(paths.items()))
    table = Table(title=f"{first_label} path between the endpoints", title_justify="left")
    for col in ("t", "train loss", "train acc", "test loss", "test acc"):
        table.add_column(col, justify="right")
    tr, te = first.values("loss", "train"), first.values("loss", "test")
    tra, tea = first.values("accuracy", "train"), first.values("accuracy", "test")
    for i, t in enumerate(first.ts.tolist()):
        table.add_row(f"{t:.3f}", f"{tr[i]:.4f}", f"{tra[i]:.2%}", f"{te[i]:.4f}", f"{tea[i]:.2%}")
    console.print(table)
    summary = Table(
        title="per path: loss and error barriers (max over t of the value minus the linear "
        "interpolation of the ends' values), and test accuracy along the path",
        title_justify="left",
    )
    summary.add_column("path")
    for col in ("loss\ntrain", "loss\ntest", "error\ntrain", "error\ntest"):
        summary.add_column(col, justify="right", no_wrap=True)
    summary.add_column("test acc\nmean", justify="right", no_wrap=True)
    summary.add_column("test acc\nmin", justify="right", no_wrap=True)
    for label, ev in paths.items():
        summary.add_row(
            label,
            f"{ev.barrier('loss', 'train'):.3f}",
            f"{ev.barrier('loss', 'test'):.3f}",
            f"{ev.barrier('error', 'train'):.1%}",
            f"{ev.barrier('error', 'test'):.1%}",
            f"{float(ev.values('accuracy', 'test').mean()):.1%}",
            f"{float(ev.values('accuracy', 'test').min()):.1%}",
        )
    console.print(summary)
    console.print("[dim]/act: B aligned by activation matching; /weight: by weight matching[/dim]")


def _barriers(ev: Any) -> dict[str, float]:
    return {f"{m}_{s}": ev.barrier(m, s) for m in ("loss", "error") for s in ("train", "test")}


def stage_report(ctx: Context) -> None:
    """Write ``report.json``, ``report.html``, ``path.png`` and the endpoint checkpoints into
    ``config.out``
    (each file atomically): ``ctx["files"]``."""
    import shutil

    from .io import atomic_path, atomic_write
    from .landscape import plot_plane
    from .report import plot_paths

    cfg: DemoConfig = ctx["config"]
    out = Path(cfg.out)
    paths = ctx.get("paths", {})
    files: list[str] = []
    endpoints = []
    for i, (src, meta) in enumerate(zip(ctx["endpoint_paths"], ctx["endpoint_meta"], strict=True)):
        dest = out / f"endpoint_{'ab'[i]}.safetensors"
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
        files.append(str(dest))
        endpoints.append({**meta, "checkpoint": str(dest)})
    report = {
        "modeconn_version": __version__,
        "config": {**asdict(ctx["config"]), "train_epochs": cfg.train_epochs},
        "endpoints": endpoints,
        "barriers": {label: _barriers(ev) for label, ev in paths.items()},
        "paths": {label: ev.to_dict() for label, ev in paths.items()},
        "planes": {label: res.to_dict() for label, res in ctx.get("planes", {}).items()},
        "time_s": time.perf_counter() - ctx["start"],
    }
    if paths:
        png = plot_paths(paths, out / "path.png", split="test", title="MNIST-1D, test split")
        files.append(str(png))
    for label, res in ctx.get("planes", {}).items():
        png_path = out / f"plane_{label.replace('/', '_')}.png"
        title = f"train loss in the plane of the {label} curve"
        files.append(plot_plane(res, png_path, title=title, labels=("A", "B", "bend")))
    dest = out / "report.json"
    with atomic_write(dest, "w") as f:
        json.dump(report, f, indent=2, default=str)
    files.append(str(dest))
    from .html_report import write_report

    files.append(str(write_report(out)))  # report.html: the same, one self-contained page
    ctx["report"], ctx["files"] = report, files
    ctx["say"](f"wrote {', '.join(files)}")


def default_stages() -> list[Stage]:
    """The demo's stages in order (a new list each time, so callers can insert their own).

    Example:
        >>> [s.__name__ for s in default_stages()][:2]
        ['stage_data', 'stage_endpoints']
    """
    return [
        stage_data,
        stage_endpoints,
        stage_linear_path,
        stage_aligned_paths,
        stage_curves,
        stage_planes,
        stage_print,
        stage_report,
    ]


def run_demo(
    config: DemoConfig | None = None,
    *,
    stages: Sequence[Stage] | None = None,
    console: Any = None,
) -> Context:
    """Run the demo pipeline: two MNIST-1D MLPs differing only in seed, and the linear path
    between them (linear mode connectivity: Frankle et al., ICML 2020; the barrier
    ``max_t [L((1-t)θ_A + tθ_B) − ((1-t)L(θ_A) + tL(θ_B))]``, as in Entezari et al., ICLR 2022).

    Args:
        config: settings (default :class:`DemoConfig`).
        stages: the pipeline (default :func:`default_stages`).
        console: a ``rich.console.Console`` for the tables (default: stdout).

    Returns:
        The context dict (``splits``, ``endpoints``, ``paths``, ``report``, ``files``, ...).

    Example:
        >>> ctx = run_demo(DemoConfig(fast=True, out="/tmp/report"))  # doctest: +SKIP
        >>> ctx["report"]["barriers"]["linear"]["loss_test"]  # doctest: +SKIP
    """
    from rich.console import Console

    cfg = config or DemoConfig()
    con = console or Console()
    ctx: Context = {
        "config": cfg,
        "console": con,
        "say": lambda msg: con.print(f"[dim]{msg}[/dim]"),
        "start": time.perf_counter(),
        "paths": {},
    }
    for stage in stages if stages is not None else default_stages():
        stage(ctx)
    return ctx
