"""The end-to-end demo as a pipeline of small stages over a shared context (``modeconn demo``).

Stages are functions ``stage(ctx) -> None`` that read and add keys of one dict. The default
pipeline: load MNIST-1D -> train (or reuse from the cache) two endpoints differing only in seed
-> evaluate the linear path between them -> print tables and write ``report/`` (report.json,
path.png, the endpoint checkpoints). A later stage adds a path by putting a
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
    out: str = "report"
    fast: bool = False
    use_cache: bool = True
    device: str | None = None
    progress: bool = True

    @property
    def train_epochs(self) -> int:
        """Epochs actually used (8 in fast mode)."""
        return min(self.epochs, 8) if self.fast else self.epochs


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
    from .paths import LinearPath, evaluate_path

    cfg: DemoConfig = ctx["config"]
    a, b = ctx["endpoints"]
    path = LinearPath(a.state_dict(), b.state_dict())
    ev = evaluate_path(
        ctx["template"],
        path,
        ctx["splits"],
        ts=cfg.points,
        device=cfg.device,
        progress=cfg.progress,
    )
    ctx.setdefault("paths", {})["linear"] = ev


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
        title="barriers (max over t of value − linear interpolation of the ends)",
        title_justify="left",
    )
    for col in (
        "path",
        "loss barrier (train)",
        "loss barrier (test)",
        "error barrier (train)",
        "error barrier (test)",
        "min test acc",
    ):
        summary.add_column(col, justify="right")
    for label, ev in paths.items():
        summary.add_row(
            label,
            f"{ev.barrier('loss', 'train'):.4f}",
            f"{ev.barrier('loss', 'test'):.4f}",
            f"{ev.barrier('error', 'train'):.2%}",
            f"{ev.barrier('error', 'test'):.2%}",
            f"{float(ev.values('accuracy', 'test').min()):.2%}",
        )
    console.print(summary)


def _barriers(ev: Any) -> dict[str, float]:
    return {f"{m}_{s}": ev.barrier(m, s) for m in ("loss", "error") for s in ("train", "test")}


def stage_report(ctx: Context) -> None:
    """Write ``report.json``, ``path.png`` and the endpoint checkpoints into ``config.out``
    (each file atomically): ``ctx["files"]``."""
    import shutil

    from .io import atomic_path, atomic_write

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
        "time_s": time.perf_counter() - ctx["start"],
    }
    if paths:
        png = out / "path.png"
        with atomic_path(png) as tmp:
            plot_paths(paths, tmp)
        files.append(str(png))
    dest = out / "report.json"
    with atomic_write(dest, "w") as f:
        json.dump(report, f, indent=2, default=str)
    files.append(str(dest))
    ctx["report"], ctx["files"] = report, files
    ctx["say"](f"wrote {', '.join(files)}")


def plot_paths(paths: Mapping[str, Any], dest: str | Path) -> None:
    """Two panels (loss, accuracy against t), train dashed and test solid, one colour per path.

    Args:
        paths: ``{label: PathEvaluation}`` evaluated on ``train`` and ``test``.
        dest: image file (format from its suffix).

    Example:
        >>> plot_paths({"linear": ev}, "path.png")  # doctest: +SKIP
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    for i, (label, ev) in enumerate(paths.items()):
        color = f"C{i}"
        ts = ev.ts.numpy()
        for split, style in (("train", "--"), ("test", "-")):
            if split not in ev.splits:
                continue
            ax_loss.plot(
                ts, ev.values("loss", split).numpy(), style, color=color, label=f"{label} ({split})"
            )
            ax_acc.plot(
                ts,
                ev.values("accuracy", split).numpy(),
                style,
                color=color,
                label=f"{label} ({split})",
            )
    ax_loss.set(xlabel="t", ylabel="cross-entropy loss", title="loss along the path")
    ax_acc.set(xlabel="t", ylabel="accuracy", title="accuracy along the path")
    ax_acc.legend(fontsize=8)
    fig.savefig(dest, dpi=120)


def default_stages() -> list[Stage]:
    """The demo's stages in order (a new list each time, so callers can insert their own).

    Example:
        >>> [s.__name__ for s in default_stages()][:2]
        ['stage_data', 'stage_endpoints']
    """
    return [stage_data, stage_endpoints, stage_linear_path, stage_print, stage_report]


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
