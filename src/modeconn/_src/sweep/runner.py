"""Run a sweep's missing cells as Ray tasks and record each one as it finishes."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..io import atomic_write
from . import db
from .cell import run_cell
from .grid import Cell, Grid, check_grid, column, load_grid
from .store import endpoint_key, ensure_endpoint

GRID_FILE = "grid.json"


def import_ray() -> Any:
    """Import Ray, or raise ``mc.MissingExtraError`` saying ``pip install 'modeconn[sweep]'``."""
    from ..optional import require

    return require("ray", "sweep", feature="modeconn sweep (Ray)")


def _connect(ray: Any, address: str | None, workers: int | None) -> bool:
    """Connect to Ray: an existing connection, ``address``, or a local Ray started here.

    Returns whether this call started it (then the caller shuts it down).
    """
    if ray.is_initialized():
        return False
    import logging

    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(num_cpus=workers or os.cpu_count() or 1, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address!r}" if address else "a local Ray"
        raise ConfigError(f"cannot start {where}: {' '.join(str(e).split())}") from None
    return True


def _endpoint_task(spec: Mapping[str, Any], store: str, device: str | None, threads: int) -> str:
    import torch

    torch.set_num_threads(threads)
    return str(ensure_endpoint(spec, store, device=device))


def _cell_task(
    grid: Grid, cell: Cell, a: str, b: str, out: str, device: str | None, threads: int
) -> dict:
    return run_cell(grid, cell, (a, b), out, device=device, threads=threads)


def _error_of(ray: Any, e: BaseException) -> str:
    """One line for a task that raised (an endpoint that failed to train) or died."""
    cause = getattr(e, "cause", None)
    if isinstance(e, ray.exceptions.RayTaskError) and cause is not None:
        e = cause
    return " ".join(f"{type(e).__name__}: {e}".split())[:2000]


def run(
    grid_or_path: Grid | Mapping[str, Any] | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    address: str | None = None,
    workers: int | None = None,
    retry_failed: bool = False,
    allow_code: Iterable[str] = (),
    store: str | os.PathLike[str] | None = None,
    device: str | None = None,
    threads: int = 1,
    progress: bool = True,
    on_cell: Any = None,
) -> list[dict[str, Any]]:
    """Run every cell of a grid that ``out_dir`` does not hold yet, on Ray; return all rows.

    The grid is validated before any work (:func:`check_grid`). Each cell trains or reuses its
    endpoints (a content-addressed store, ``out_dir/endpoints`` by default, keyed by model,
    options, data, training config and seed; each endpoint is its own Ray task, trained once even
    when several cells need it), aligns B onto A with each method and evaluates each path kind
    (:func:`run_cell`). A finished cell is written to ``out_dir/results.sqlite`` in one
    transaction, so after SIGKILL or Ctrl-C the same call finishes only what is missing, and the
    rows equal those of an uninterrupted run (timing columns aside). A cell that raises is
    recorded with its error and the others go on; ``retry_failed`` runs failed cells again.

    Args:
        grid_or_path: a :class:`Grid`, a dict or a YAML file.
        out_dir: the sweep folder.
        address: a Ray cluster (``"auto"``, ``"ray://host:10001"``); default: an existing Ray
            connection, else a local Ray started here (no dashboard) and stopped at the end.
        workers: cells running at once (default: the local CPU count, or 2 per cluster CPU).
        retry_failed: run cells recorded as failed again.
        allow_code: import paths (``pkg.mod:fn``) the user allows as the grid's model or data.
        store: the endpoint store folder (share one between sweeps to reuse endpoints).
        device: where tasks train and evaluate.
        threads: torch threads per task (1: results do not depend on the machine's load).
        progress: draw a progress bar over cells (with ETA) on a terminal.
        on_cell: called as ``on_cell(outcome)`` after each cell is recorded.

    Returns:
        All rows of the results table (:func:`load`).

    Example:
        >>> rows = run("grid.yaml", "sweep-out", workers=2)  # doctest: +SKIP
        >>> rows[0]["loss_barrier"]  # doctest: +SKIP
    """
    grid = load_grid(grid_or_path)
    if workers is not None and workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    if threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    check_grid(grid, allow_code)
    if os.path.exists(grid.data):  # tasks may run in another working directory
        grid = grid.model_copy(update={"data": os.path.abspath(grid.data)})
    out = Path(out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"sweep folder {str(out)!r} is a file; give a folder")
    store_dir = Path(store).absolute() if store is not None else out / "endpoints"
    with atomic_write(out / GRID_FILE, "w") as f:
        json.dump(grid.model_dump(mode="json"), f, indent=2)
    cells = grid.cells()
    columns = [column(k) for k in grid.grid]
    with db.connect(out, columns) as con:
        status = db.cell_status(con)
        todo = [
            c for c in cells if status.get(c.id) not in ("done", None if retry_failed else "failed")
        ]
        if todo:
            ray = import_ray()
            started = _connect(ray, address, workers)
            try:
                _execute(ray, con, grid, todo, out, store_dir, workers, device, threads, progress,
                         on_cell)  # fmt: skip
            finally:
                if started:
                    ray.shutdown()
    return load(out)


def _execute(
    ray: Any,
    con: Any,
    grid: Grid,
    todo: list[Cell],
    out: Path,
    store: Path,
    workers: int | None,
    device: str | None,
    threads: int,
    progress: bool,
    on_cell: Any,
) -> None:
    from ..progress import progress_bar

    resources = ray.cluster_resources()
    window = workers or max(int(resources.get("CPU", 1)), 1) * 2
    # Ray hides GPUs from tasks that request none: with a CUDA device, cells share the GPUs.
    gpus = 0.0
    if device is not None and str(device).startswith("cuda"):
        if not resources.get("GPU"):
            raise ConfigError(f"device {device!r}, but the Ray cluster has no GPU")
        gpus = min(1.0, resources["GPU"] / window)
    # A task whose worker or node dies is retried (results are deterministic); one that raises is
    # not (the cell is recorded as failed; --retry-failed runs it again).
    opts = {"num_cpus": 1, "num_gpus": gpus, "max_retries": 2, "retry_exceptions": False}
    ep_task = ray.remote(**opts)(_endpoint_task)
    cell_task = ray.remote(**opts)(_cell_task)
    grid_ref = ray.put(grid)
    eps: dict[str, Any] = {}
    inflight: dict[Any, Cell] = {}
    queue = list(todo)

    def endpoint(cell: Cell, which: int) -> Any:
        spec = cell.endpoint(grid, which)
        key = endpoint_key(spec)
        if key not in eps:
            path = store / f"{key}.safetensors"
            eps[key] = str(path) if path.is_file() else ep_task.remote(spec, str(store), device,
                                                                        threads)  # fmt: skip
        return eps[key]

    failed = 0
    with progress_bar(progress, total=len(todo), description="sweep", eta=True) as advance:
        # Ctrl-C / an error: this run's tasks end with the driver (ray.shutdown of a local Ray;
        # on a cluster when this job disconnects); every finished cell is already saved. (No
        # ray.cancel(force=True) here: racing a task that just finished, it crashed Ray 2.60.)
        while queue or inflight:
            while queue and len(inflight) < window:
                cell = queue.pop(0)
                ref = cell_task.remote(grid_ref, cell, endpoint(cell, 0), endpoint(cell, 1),
                                       str(out), device, threads)  # fmt: skip
                inflight[ref] = cell
            done, _ = ray.wait(list(inflight), num_returns=1)
            cell = inflight.pop(done[0])
            outcome = _record(ray, con, out, cell, done[0])
            failed += bool(outcome["error"])
            if on_cell is not None:
                on_cell(outcome)
            advance(f"{cell.label()}" + (f" ({failed} failed)" if failed else ""))


def _record(ray: Any, con: Any, out: Path, cell: Cell, ref: Any) -> dict[str, Any]:
    """Fetch a finished cell task's outcome and store it (rows or error) in one transaction."""
    try:
        outcome = ray.get(ref)
    except Exception as e:  # noqa: BLE001 - an endpoint failed to train, or a worker died
        outcome = {"cell": cell.id, "rows": [], "error": _error_of(ray, e), "traceback": None,
                   "time_s": None}  # fmt: skip
    if outcome["traceback"]:
        with atomic_write(out / "cells" / cell.id / "error.txt", "w") as f:
            f.write(outcome["traceback"])
    config = {"point": dict(cell.point), "seeds": list(cell.seeds)}
    db.record(con, cell.id, cell.label(), config, outcome["rows"], outcome["error"],
              outcome["time_s"])  # fmt: skip
    return outcome


def load(out_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of ``out_dir/results.sqlite``, sorted by grid keys, seeds, align and path.

    One dict per (cell, align, path): a column per grid key, ``seed_a``, ``seed_b``, ``align``,
    ``path``, ``loss_barrier`` and ``error_barrier`` (on the test split, ``barrier_split``),
    ``train_loss_barrier``, ``test_acc_mean``, ``test_acc_min``, ``test_loss_max``, the
    endpoints' test metrics, timings, ``config_hash`` and versions.

    Example:
        >>> load("no-such-sweep")
        []
    """
    out = Path(out_dir)
    order: list[str] = []
    if (out / GRID_FILE).is_file():
        order = [column(k) for k in json.loads((out / GRID_FILE).read_text()).get("grid", {})]
    return db.rows(out, order)


def status(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """How far a sweep is: ``cells`` (in its grid), ``done``, ``failed``, ``missing``, ``rows``,
    ``failures`` (``cell``, ``label``, ``error``, ``attempts``) and ``keys`` (grid-key columns).

    Example:
        >>> status("no-such-sweep")  # doctest: +SKIP
    """
    out = Path(out_dir)
    if not (out / GRID_FILE).is_file():
        raise ConfigError(f"{str(out)!r} is not a sweep folder (no {GRID_FILE}); run a sweep first")
    grid = load_grid(json.loads((out / GRID_FILE).read_text()))
    ids = {c.id for c in grid.cells()}
    with db.connect(out) as con:
        st = {k: v for k, v in db.cell_status(con).items() if k in ids}
    done = sum(v == "done" for v in st.values())
    failed = sum(v == "failed" for v in st.values())
    return {
        "cells": len(ids), "done": done, "failed": failed, "missing": len(ids) - done - failed,
        "rows": len(load(out)), "keys": [column(k) for k in grid.grid],
        "failures": [f for f in db.failures(out) if f["cell"] in ids],
    }  # fmt: skip
