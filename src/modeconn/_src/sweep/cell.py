"""One cell of a sweep: load its endpoints, align B with each method, evaluate each path kind."""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..._version import __version__
from ..paths.evaluate import BARRIER_SPLIT
from .grid import NONE, Cell, Grid, column


def _load_endpoint(path: Path, spec: Mapping[str, Any], device: str | None) -> tuple[Any, dict]:
    from ..evaluation import resolve_device
    from ..io import load_checkpoint
    from ..trust import is_import_path

    ck = load_checkpoint(path)
    # An import-path model was accepted by check_grid (the user named it): build it by name.
    net = ck.build(spec["model"] if is_import_path(spec["model"]) else None)
    return net.to(resolve_device(device)), dict(ck.meta.get("metrics") or {})


def _path_row(ev: Any) -> dict[str, Any]:
    """Barriers (test split) and accuracy summaries of one evaluated path."""
    acc = ev.summary("accuracy", BARRIER_SPLIT)
    return {
        "loss_barrier": ev.barrier("loss", BARRIER_SPLIT),
        "error_barrier": ev.barrier("error", BARRIER_SPLIT),
        "train_loss_barrier": ev.barrier("loss", "train"),
        "test_acc_mean": acc["mean"],
        "test_acc_min": acc["min"],
        "test_loss_max": ev.summary("loss", BARRIER_SPLIT)["max"],
    }


def _merge_row(a: Any, sa: Any, sb: Any, method: str, splits: Any, ends: Any) -> dict[str, Any]:
    """The merged point's test loss/error above the endpoints' mean (its barrier), and accuracy."""
    from ..evaluation import evaluate
    from ..merge import merge
    from ..norm import needs_bn_reset

    bn = needs_bn_reset(a)
    merged = merge([sa, sb], method=method, model=a, data=splits.train, reset_bn=bn,
                   bn_data=splits.train if bn else None)  # fmt: skip
    m = evaluate(a, splits.test, state=dict(merged))
    mean_loss = (ends["a_test_loss"] + ends["b_test_loss"]) / 2
    mean_err = 1 - (ends["a_test_accuracy"] + ends["b_test_accuracy"]) / 2
    return {
        "loss_barrier": m.loss - mean_loss,
        "error_barrier": (1 - m.accuracy) - mean_err,
        "train_loss_barrier": None,
        "test_acc_mean": m.accuracy,
        "test_acc_min": m.accuracy,
        "test_loss_max": m.loss,
    }


def run_cell(
    grid: Grid,
    cell: Cell,
    endpoints: tuple[str, str],
    out_dir: str,
    *,
    device: str | None = None,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Run one cell and return ``{"cell", "rows", "error", "traceback", "time_s"}``.

    For each alignment method (``none`` keeps B) B is permuted onto A with ``mc.align``; for each
    path kind the path is built (the straight line, or a curve fitted by ``mc.fit_curve``) and
    evaluated by ``mc.evaluate_path`` on both splits; for each merge method A and the aligned B
    are merged. Per-t values (``PathEvaluation.to_dict``) and fitted curves go to
    ``out_dir/cells/<cell id>/``. An exception is returned as ``error`` (one line) instead of
    raised, so the other cells go on.

    Args:
        grid: the sweep.
        cell: the cell.
        endpoints: the stored checkpoints of A and B (``ensure_endpoint``).
        out_dir: the sweep folder.
        device: where to run.
        threads: torch intra-op threads for this task (1: bit-reproducible rows); ``None`` keeps
            the process setting.

    Returns:
        The outcome; ``rows`` holds one dict per (align, path) with the results columns.
    """
    start = time.perf_counter()
    try:
        rows = _run(grid, cell, endpoints, Path(out_dir), device, threads)
        return {"cell": cell.id, "rows": rows, "error": None, "traceback": None,
                "time_s": time.perf_counter() - start}  # fmt: skip
    except Exception as e:  # noqa: BLE001 - any failure is this cell's result; the sweep goes on
        msg = " ".join(f"{type(e).__name__}: {e}".split())
        return {"cell": cell.id, "rows": [], "error": msg, "traceback": traceback.format_exc(),
                "time_s": time.perf_counter() - start}  # fmt: skip


def _run(
    grid: Grid,
    cell: Cell,
    endpoints: tuple[str, str],
    out: Path,
    device: str | None,
    threads: int | None,
) -> list[dict[str, Any]]:
    import torch

    from ..align import align
    from ..io import atomic_write
    from ..paths import LinearPath, evaluate_path, fit_curve
    from .store import load_data

    if threads is not None:
        torch.set_num_threads(threads)
    t_cell = time.perf_counter()
    splits = load_data(grid.data, grid.data_args)
    a, ma = _load_endpoint(Path(endpoints[0]), cell.endpoint(grid, 0), device)
    b, mb = _load_endpoint(Path(endpoints[1]), cell.endpoint(grid, 1), device)
    ends = {
        "a_test_loss": ma.get("test_loss"), "a_test_accuracy": ma.get("test_accuracy"),
        "b_test_loss": mb.get("test_loss"), "b_test_accuracy": mb.get("test_accuracy"),
    }  # fmt: skip
    fixed = {
        "cell": cell.id,
        "config_hash": cell.id,
        **{column(k): v for k, v in cell.point.items()},
        "seed_a": cell.seeds[0],
        "seed_b": cell.seeds[1],
    }
    rel = Path("cells") / cell.id
    rows = []
    sa = a.state_dict()
    for method in grid.align:
        t0 = time.perf_counter()
        b_al = b if method == NONE else align(a, b, method=method, data=splits.train)
        t_align = time.perf_counter() - t0
        sb = b_al.state_dict()
        for kind in grid.paths:
            t0 = time.perf_counter()
            if kind == "linear":
                path: Any = LinearPath(sa, sb)
            else:
                path = fit_curve(a, b_al, splits.train, kind=kind, bends=grid.curve.bends,
                                 epochs=grid.curve.epochs, lr=grid.curve.lr, seed=cell.seeds[0],
                                 device=device, progress=False)  # fmt: skip
                path.save(out / rel / f"{method}-{kind}.safetensors")
            ev = evaluate_path(a, path, splits, ts=grid.points, device=device, progress=False)
            artifact = rel / f"{method}-{kind}.json"
            with atomic_write(out / artifact, "w") as f:
                json.dump(ev.to_dict(), f)
            rows.append({**fixed, "align": method, "path": kind, **_path_row(ev), **ends,
                         "time_align_s": t_align, "time_path_s": time.perf_counter() - t0,
                         "artifact": str(artifact)})  # fmt: skip
        for m in grid.merge:
            t0 = time.perf_counter()
            rows.append({**fixed, "align": method, "path": f"merge:{m}",
                         **_merge_row(a, sa, sb, m, splits, ends), **ends,
                         "time_align_s": t_align, "time_path_s": time.perf_counter() - t0,
                         "artifact": None})  # fmt: skip
    versions = {"modeconn_version": __version__, "torch_version": torch.__version__,
                "barrier_split": BARRIER_SPLIT}  # fmt: skip
    total = time.perf_counter() - t_cell
    return [{**r, **versions, "time_cell_s": total} for r in rows]
