"""``modeconn interpolate | curve | evaluate``: paths between two checkpoints and their metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .common import (
    DataOpt,
    DeviceOpt,
    JsonOpt,
    MkdirOpt,
    ModelArgsOpt,
    ModelOpt,
    ProgressOpt,
    ResumeOpt,
    SeedOpt,
    check_finite_losses,
    check_outputs,
    console,
    load_data_arg,
    load_model_arg,
    on_interrupt,
    parse_model_args,
    print_table,
    write_json,
)

PointsOpt = Annotated[int, typer.Option("--points", help="Evaluation points t in [0, 1].")]
PlotOpt = Annotated[Path | None, typer.Option("--plot", help="Write a loss/accuracy plot here.")]
EpsOpt = Annotated[
    float, typer.Option("--eps", help="Also measure PGD-ℓ∞ robust accuracy at this radius (0: no).")
]
PgdStepOpt = Annotated[float | None, typer.Option("--pgd-step", help="PGD step (default eps/4).")]
PgdStepsOpt = Annotated[int, typer.Option("--pgd-steps", help="PGD steps.")]
EVAL_FILE = "evaluation.json"
PLOT_FILE = "curve.png"


def _pgd(eps: float, step: float | None, steps: int) -> dict[str, Any] | None:
    from modeconn import ConfigError, PGDConfig

    if eps < 0:
        raise ConfigError(f"--eps must be >= 0 (0: no robust accuracy), got {eps}")
    if eps == 0:
        return None
    return PGDConfig.coerce({"eps": eps, "step": step or eps / 4, "steps": steps}).model_dump()


def _evaluate(
    net: Any, path: Any, splits: Any, points: int, robust: Any, device: Any, progress: bool
) -> Any:
    import modeconn as mc

    if points < 2:
        from modeconn import ConfigError

        raise ConfigError(f"--points must be >= 2, got {points}")
    return mc.evaluate_path(
        net,
        path,
        {"train": splits.train, "test": splits.test},
        ts=points,
        bn_data=splits.train,
        robust=robust,
        device=device,
        progress=progress,
    )


def _summary_rows(evaluations: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for label, ev in evaluations.items():
        acc = ev.summary("accuracy", "test")
        row = [
            label,
            ev.barrier("loss", "test"),
            ev.barrier("error", "test"),
            ev.barrier("loss", "train"),
            ev.summary("loss", "test")["max"],
            acc["min"],
            acc["mean"],
            acc["arc_mean"],
        ]
        if "robust_accuracy" in ev.results["test"]:
            row.append(ev.summary("robust_accuracy", "test")["mean"])
        rows.append(row)
    return rows


def _print_summary(title: str, evaluations: dict[str, Any]) -> None:
    cols = ["path", "test loss barrier", "test error barrier", "train loss barrier",
            "max test loss", "min test acc", "mean test acc", "arc test acc"]  # fmt: skip
    if any("robust_accuracy" in ev.results["test"] for ev in evaluations.values()):
        cols.append("robust test acc")
    print_table(
        f"{title} (barriers: max over t of the value minus the line between the ends' values)",
        cols,
        _summary_rows(evaluations),
    )


def _barriers(ev: Any) -> dict[str, Any]:
    """The JSON barrier keys: ``loss_barrier`` and ``error_barrier`` on the test split."""
    return {
        "loss_barrier": ev.barrier("loss", "test"),
        "error_barrier": ev.barrier("error", "test"),
        "train_loss_barrier": ev.barrier("loss", "train"),
        "barrier_split": "test",
    }


def _print_per_t(ev: Any) -> None:
    rows = [
        [
            f"{t:.3f}",
            ev.values("loss", "train")[i].item(),
            ev.values("loss", "test")[i].item(),
            ev.values("accuracy", "test")[i].item(),
        ]
        for i, t in enumerate(ev.ts.tolist())
    ]
    print_table("along the path", ["t", "train loss", "test loss", "test accuracy"], rows)


def check_finite_results(evaluations: dict[str, Any]) -> None:
    """The non-finite rule for paths (see :func:`check_finite_losses`), every split."""
    for label, ev in evaluations.items():
        for split, metrics in ev.results.items():
            losses = [float(v) for v in metrics.get("loss", [])]
            check_finite_losses(f"path {label!r}, {split} split", losses, ev.ts.tolist())


def _check_align(align: str | None) -> None:
    """An unknown --align name: one line listing the registered aligners, before any work."""
    import modeconn as mc

    if align is not None and align not in mc.aligner_names():
        raise mc.ConfigError(
            f"--align {align!r} is not an alignment method; choose one of: "
            + ", ".join(mc.aligner_names())
        )


def interpolate(
    model_a: Annotated[Path, typer.Argument(help="Checkpoint A (t = 0).")],
    model_b: Annotated[Path, typer.Argument(help="Checkpoint B (t = 1).")],
    data: DataOpt = None,
    points: PointsOpt = 25,
    align: Annotated[
        str | None, typer.Option("--align", help="Permute B onto A first: an aligner name.")
    ] = None,
    plot: PlotOpt = None,
    eps: EpsOpt = 0.0,
    pgd_step: PgdStepOpt = None,
    pgd_steps: PgdStepsOpt = 5,
    model: ModelOpt = None,
    model_arg: ModelArgsOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = None,
    json_path: JsonOpt = None,
    mkdir: MkdirOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Loss and accuracy along the straight line A -> B (train and test splits).

    BatchNorm statistics are recomputed on the training split at every point. Prints the values
    at each t and the loss/error barriers (Frankle et al. 2020).
    """
    import modeconn as mc

    _check_align(align)
    check_outputs(
        {"--json": json_path, "--plot": plot}, inputs=[model_a, model_b, data], mkdir=mkdir
    )
    robust = _pgd(eps, pgd_step, pgd_steps)
    net_a = load_model_arg(model_a, model, model_arg, device=device)
    net_b = load_model_arg(model_b, model, model_arg, device=device)
    splits = load_data_arg(data, net_a, net_b)
    if align is not None:
        opts: dict[str, Any] = {"seed": seed} if mc.get_aligner(align).accepts("seed") else {}
        net_b = mc.align(net_a, net_b, method=align, data=splits.train, **opts)
    path = mc.LinearPath(net_a.state_dict(), net_b.state_dict())
    ev = _evaluate(net_a, path, splits, points, robust, device, progress)
    label = f"linear+{align}" if align else "linear"
    _print_per_t(ev)
    _print_summary(f"linear path {model_a.name} -> {model_b.name}", {label: ev})
    if plot is not None:
        from modeconn import plot_paths

        plot_paths({label: ev}, plot, split="test", title=f"{model_a.name} -> {model_b.name}")
        console.print(f"wrote {plot}")
    if json_path is not None:
        write_json(
            json_path,
            {"a": str(model_a), "b": str(model_b), "align": align, **_barriers(ev),
             "evaluation": ev.to_dict()},  # fmt: skip
        )
    check_finite_results({label: ev})


def curve(
    model_a: Annotated[Path, typer.Argument(help="Checkpoint A (one fixed end).")],
    model_b: Annotated[Path, typer.Argument(help="Checkpoint B (the other fixed end).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("curve"),
    data: DataOpt = None,
    kind: Annotated[str, typer.Option("--kind", help="bezier or polychain.")] = "bezier",
    bends: Annotated[int, typer.Option("--bends", help="Trainable control points.")] = 1,
    align: Annotated[
        str | None, typer.Option("--align", help="Permute B first: an aligner name.")
    ] = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Curve-training epochs.")] = 20,
    lr: Annotated[
        float, typer.Option("--lr", help="Base learning rate (Garipov schedule).")
    ] = 0.05,
    wd: Annotated[float, typer.Option("--wd", help="L2 coefficient on θ(t).")] = 5e-4,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Minibatch size.")] = 128,
    resume: ResumeOpt = False,
    adversarial: Annotated[
        bool, typer.Option("--adversarial/--no-adversarial", help="Train on PGD inputs (--eps).")
    ] = False,
    points: PointsOpt = 25,
    eps: EpsOpt = 0.0,
    pgd_step: PgdStepOpt = None,
    pgd_steps: PgdStepsOpt = 5,
    model: ModelOpt = None,
    model_arg: ModelArgsOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = None,
    json_path: JsonOpt = None,
    mkdir: MkdirOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Learn a low-loss Bezier curve / polygonal chain between A and B (Garipov et al. 2018).

    Writes OUT/curve.safetensors (the curve), OUT/evaluation.json (curve and linear path, train
    and test, per t and summaries) and OUT/curve.png; OUT/fit_state.pt is the per-epoch checkpoint
    that --resume continues from.
    """
    import modeconn as mc
    from modeconn import PATH_FILENAME, ConfigError, curve_kinds, plot_paths

    if kind not in curve_kinds():
        raise ConfigError(f"--kind {kind!r} is not one of {', '.join(curve_kinds())}")
    _check_align(align)
    if bends < 1 or epochs < 1:
        raise ConfigError(f"--bends and --epochs must be >= 1, got {bends} and {epochs}")
    if batch_size < 1 or lr <= 0 or wd < 0:
        raise ConfigError(
            f"need --batch-size >= 1, --lr > 0 and --wd >= 0, got {batch_size}, {lr} and {wd}"
        )
    if points < 2:
        raise ConfigError(f"--points must be >= 2, got {points}")
    check_outputs(
        {"--out": out, "--json": json_path},
        inputs=[model_a, model_b, data],
        mkdir=mkdir,
        folders={"--out": (PATH_FILENAME, EVAL_FILE, PLOT_FILE, "fit_state.pt")},
    )
    robust = _pgd(eps, pgd_step, pgd_steps)
    if adversarial and robust is None:
        raise ConfigError("--adversarial needs --eps > 0 (the PGD radius)")
    net_a = load_model_arg(model_a, model, model_arg, device=device)
    net_b = load_model_arg(model_b, model, model_arg, device=device)
    splits = load_data_arg(data, net_a, net_b)
    transform = None
    if adversarial:
        cfg = dict(robust or {})

        def transform(model_fn: Any, x: Any, y: Any) -> Any:
            return mc.pgd_attack(
                model_fn,
                x,
                y,
                eps=cfg["eps"],
                step=cfg["step"],
                steps=cfg["steps"],
                random_start=cfg["random_start"],
            )

    state_file = out / "fit_state.pt"
    if resume and state_file.is_file():
        console.print(f"resuming from {state_file}")

    def resume_hint() -> str:
        if not state_file.is_file():
            return "no epoch had finished, so nothing was kept; run the command again"
        return (
            f"the finished epochs are kept in {state_file}; run the same command with --resume "
            "to continue"
        )

    with on_interrupt(resume_hint):
        path = mc.fit_curve(
            net_a,
            net_b,
            splits,
            kind=kind,
            bends=bends,
            align=align,
            epochs=epochs,
            lr=lr,
            wd=wd,
            batch_size=batch_size,
            seed=seed,
            device=device,
            checkpoint_dir=out,
            resume=resume,
            progress=progress,
            input_transform=transform,
        )
    source = data or (getattr(net_a, "modeconn_meta", None) or {}).get("data") or splits.name
    path.meta.update(data=source, endpoints=[str(model_a), str(model_b)])
    file = path.save(out / PATH_FILENAME)
    with on_interrupt(
        f"the trained curve is saved in {file}; `modeconn evaluate {out}` evaluates it"
    ):
        ev = _evaluate(net_a, path, splits, points, robust, device, progress)
        ends = path.points
        line = mc.LinearPath(ends[0], ends[-1])
        ev_line = _evaluate(net_a, line, splits, points, robust, device, progress)
    label = f"{kind}+{align}" if align else kind
    lin_label = f"linear+{align}" if align else "linear"
    evaluations = {lin_label: ev_line, label: ev}
    _print_summary(f"{kind} curve with {bends} bend(s), {epochs} epochs", evaluations)
    result = {
        "barriers": {label: _barriers(ev), lin_label: _barriers(ev_line)},
        "curve": ev.to_dict(),
        "linear": ev_line.to_dict(),
        "settings": path.meta,
    }
    write_json(out / EVAL_FILE, result)
    plot_paths(
        evaluations, out / PLOT_FILE, split="test", title=f"{model_a.name} -> {model_b.name}"
    )
    console.print(f"wrote {file}, {out / EVAL_FILE}, {out / PLOT_FILE}")
    if json_path is not None:
        write_json(json_path, result)
    check_finite_results(evaluations)


def evaluate(
    path_dir: Annotated[
        Path,
        typer.Argument(help="Folder written by `modeconn curve` (or a .safetensors path file)."),
    ],
    data: DataOpt = None,
    points: PointsOpt = 25,
    plot: PlotOpt = None,
    eps: EpsOpt = 0.0,
    pgd_step: PgdStepOpt = None,
    pgd_steps: PgdStepsOpt = 5,
    model: ModelOpt = None,
    model_arg: ModelArgsOpt = None,
    device: DeviceOpt = None,
    json_path: JsonOpt = None,
    mkdir: MkdirOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Evaluate a saved path (curve) on the train and test splits: per-t values and summaries.

    The model is rebuilt from what the path file records (or --model); the data defaults to the
    source recorded when the curve was trained.
    """
    import modeconn as mc
    from modeconn import PATH_FILENAME, Checkpoint, resolve_device

    check_outputs(
        {"--json": json_path, "--plot": plot},
        inputs=[path_dir, Path(path_dir) / PATH_FILENAME, data],
        mkdir=mkdir,
    )
    robust = _pgd(eps, pgd_step, pgd_steps)
    path = mc.load_path(path_dir)
    ck = Checkpoint(path.points[0], dict(path.meta), str(path_dir))
    net = ck.build(model, **parse_model_args(model_arg)).to(resolve_device(device))
    splits = load_data_arg(data, net)
    ev = _evaluate(net, path, splits, points, robust, device, progress)
    _print_per_t(ev)
    label = f"{path.kind}/{path.num_points}"
    _print_summary(f"path {path_dir}", {label: ev})
    if plot is not None:
        from modeconn import plot_paths

        plot_paths({label: ev}, plot, split="test", title=str(path_dir))
        console.print(f"wrote {plot}")
    if json_path is not None:
        write_json(
            json_path, {"path": str(path_dir), **_barriers(ev), "evaluation": ev.to_dict()}
        )
    check_finite_results({label: ev})
