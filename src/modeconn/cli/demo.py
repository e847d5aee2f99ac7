"""``modeconn demo``: the embedded end-to-end run on MNIST-1D, writing a report folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import (
    DeviceOpt,
    JsonOpt,
    MkdirOpt,
    ProgressOpt,
    check_outputs,
    console,
    write_json,
)


def command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder.")] = Path("report"),
    fast: Annotated[bool, typer.Option("--fast", help="Quick run: 8 training epochs.")] = False,
    epochs: Annotated[int, typer.Option(help="Training epochs per endpoint.")] = 40,
    points: Annotated[int, typer.Option(help="Points evaluated along each path.")] = 25,
    curve_epochs: Annotated[int, typer.Option(help="Curve-training epochs per curve.")] = 20,
    align: Annotated[
        bool, typer.Option("--align/--no-align", help="Add the aligned linear paths.")
    ] = True,
    curves: Annotated[
        bool, typer.Option("--curves/--no-curves", help="Add the learned Bezier curves.")
    ] = True,
    cache: Annotated[
        bool, typer.Option("--cache/--no-cache", help="Reuse endpoints trained earlier.")
    ] = True,
    threads: Annotated[
        int, typer.Option(help="torch CPU threads (the demo's models are tiny: 1 is fastest).")
    ] = 1,
    device: DeviceOpt = None,
    json_path: JsonOpt = None,
    mkdir: MkdirOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """The end-to-end run: two MNIST-1D MLPs differing only in seed, and the paths between them.

    Trains the two endpoints (or reuses them from the cache); evaluates the straight line between
    them, the lines to B aligned by activation matching and by weight matching, and Bezier curves
    learned between A and B unaligned and aligned, at --points values of t; prints the
    loss/accuracy table and each path's loss and error barriers; writes the report folder
    (report.json, path.png with every path, the two endpoints).
    """
    from modeconn import ConfigError, DemoConfig, run_demo

    check_outputs({"--out": out, "--json": json_path}, mkdir=mkdir, folders={"--out": ()})
    if epochs < 1 or curve_epochs < 1 or points < 2 or threads < 1:
        raise ConfigError("--epochs, --curve-epochs and --threads must be >= 1 and --points >= 2")
    import torch

    torch.set_num_threads(threads)
    cfg = DemoConfig(
        epochs=epochs,
        points=points,
        curve_epochs=curve_epochs,
        align=align,
        curves=curves,
        out=str(out),
        fast=fast,
        use_cache=cache,
        device=device,
        progress=progress,
    )
    ctx = run_demo(cfg, console=console)
    if json_path is not None:
        write_json(json_path, ctx["report"])
