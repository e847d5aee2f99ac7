"""`modeconn sweep GRID.yaml --out DIR`, `modeconn sweep status DIR` and `modeconn report DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

import modeconn as mc

from .common import (
    DeviceOpt,
    JsonOpt,
    ProgressOpt,
    check_out_dir,
    console,
    on_interrupt,
    print_table,
    write_json,
)

STATUS = "status"


def _summary(rows: list[dict[str, Any]], keys: list[str]) -> None:
    groups = mc.sweep.summarize(rows, [*keys, "align", "path"])

    def ms(g: dict[str, Any], m: str) -> str:
        return f"{g[m + '_mean']:.3f}" + (f"±{g[m + '_std']:.3f}" if g["n"] > 1 else "")

    table = []
    for g in groups:
        table.append([
            *(str(g[k]) for k in keys), g["align"], g["path"], g["n"],
            ms(g, "loss_barrier"), ms(g, "error_barrier"), f"{g['test_acc_mean_mean']:.3f}",
        ])  # fmt: skip
    cols = [*keys, "align", "path", "pairs", "test loss barrier", "test error barrier",
            "mean test acc"]  # fmt: skip
    print_table("sweep: mean ± std over seed pairs (barriers on the test split)", cols, table)


def _status(folder: Path, json_path: Path | None) -> None:
    st = mc.sweep.status(folder)
    print_table(
        f"sweep {folder}",
        ["cells", "done", "failed", "missing", "rows"],
        [[st["cells"], st["done"], st["failed"], st["missing"], st["rows"]]],
    )
    if st["failures"]:
        print_table(
            "failed cells (`--retry-failed` runs them again; tracebacks in DIR/cells/ID/error.txt)",
            ["cell", "id", "attempts", "error"],
            [[f["label"], f["cell"], f["attempts"], f["error"]] for f in st["failures"]],
        )
    if json_path is not None:
        write_json(json_path, st)


def command(
    target: Annotated[
        str,
        typer.Argument(
            metavar="GRID.yaml | status",
            help="The grid file to run, or `status` (then the sweep folder follows).",
        ),
    ],
    folder: Annotated[
        Path | None, typer.Argument(metavar="[DIR]", help="With `status`: the sweep folder.")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="The sweep folder.")] = None,
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            help="A Ray cluster: auto, or ray://HOST:PORT. Default: a "
            "local Ray started for this run.",
        ),
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", "-w", help="Cells at once (default: CPU count).")
    ] = None,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Run cells that failed before again.")
    ] = False,
    allow_code: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-code",
            help="Let the grid name this 'package.module:function' (as model: or data:), "
            "repeatable. A grid naming code is refused otherwise.",
        ),
    ] = None,
    store: Annotated[
        Path | None,
        typer.Option(
            "--store",
            help="Endpoint store folder (default DIR/endpoints); share one "
            "between sweeps to reuse their endpoints.",
        ),
    ] = None,
    threads: Annotated[
        int, typer.Option("--threads", help="Torch threads per task (1: reproducible rows).")
    ] = 1,
    device: DeviceOpt = None,
    json_path: JsonOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Run a grid of experiments on Ray; a rerun finishes only what is missing.

    Every combination of the grid's values and seed pairs is a cell: it trains or reuses its two
    endpoints, aligns B onto A with each method (`none` too) and evaluates each path kind. Rows go
    to DIR/results.sqlite (one transaction per cell), per-t values and curves to DIR/cells/,
    endpoints to DIR/endpoints/. After Ctrl-C or a crash, the same command continues.
    `modeconn sweep status DIR` shows how far a sweep is; `modeconn report DIR` draws it.
    """
    if target == STATUS and (folder is not None or not Path(target).is_file()):
        if folder is None:
            folder = out
        if folder is None:
            raise mc.ConfigError("usage: modeconn sweep status DIR")
        _status(folder, json_path)
        return
    if folder is not None:
        raise mc.ConfigError(f"unexpected argument {str(folder)!r}; the folder goes in --out")
    if out is None:
        raise mc.ConfigError("missing --out DIR: the sweep folder (a rerun continues it)")
    check_out_dir(out)
    done = [0]

    def hint() -> str:
        return (f"{done[0]} cell(s) finished in this run are saved in {out}; run the same command "
                "to finish the rest")  # fmt: skip

    with on_interrupt(hint):
        rows = mc.sweep.run(
            target, out, address=address, workers=workers, retry_failed=retry_failed,
            allow_code=allow_code or (), progress=progress, threads=threads, device=device,
            store=store,
            on_cell=lambda outcome: done.__setitem__(0, done[0] + 1),
        )  # fmt: skip
    st = mc.sweep.status(out)
    if rows:
        _summary(rows, st["keys"])
    console.print(
        f"{st['done']}/{st['cells']} cells done, {st['failed']} failed, {st['missing']} missing; "
        f"rows in {out / 'results.sqlite'}"
    )
    if st["failed"]:
        console.print(f"see `modeconn sweep status {out}`; `--retry-failed` runs them again")
    if json_path is not None:
        write_json(json_path, {"status": st, "rows": rows})


def report(
    folder: Annotated[Path, typer.Argument(help="A sweep folder, or the demo's report folder.")],
) -> None:
    """Write DIR/report.html: one self-contained page with figures (inline SVG) and tables.

    For a sweep: barriers against each grid key (mean ± std over seed pairs, one line per
    alignment method), accuracy along the paths and a table of all rows. For the demo's folder:
    its paths, barriers and loss planes.
    """
    path = mc.write_report(folder)
    console.print(f"wrote {path}")
