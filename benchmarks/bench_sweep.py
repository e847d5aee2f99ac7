"""Sweep benchmark: overhead per cell on Ray vs running the same cells directly; 2-worker speed-up.

The same four cells (MNIST-1D mlp, two endpoints trained per cell, three alignments, the linear
path) run (1) directly in this process, one after another (``ensure_endpoint`` twice and
``run_cell``), (2) as ``mc.sweep.run`` on a local Ray with 1 CPU, (3) on a local Ray with 2 CPUs.
Ray's start-up is timed apart. The issue's bar: sweep/direct <= 1.2 for cells of ~10 s.
One torch thread everywhere.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import torch

import modeconn as mc

EPOCHS = int(os.environ.get("BENCH_SWEEP_EPOCHS", "48"))  # ~10 s cells on an idle core
GRID = {
    "data": "mnist1d",
    "model": "mlp",
    "model_args": {"depth": 2},
    "grid": {"width": [256]},
    "seeds": [[0, 1], [2, 3], [4, 5], [6, 7]],  # no endpoint shared: four equal cells
    "train": {"epochs": EPOCHS},
    "align": ["none", "weight", "activation"],
    "paths": ["linear"],
    "points": 11,
}


def _direct(tmp: Path) -> float:
    grid = mc.sweep.load_grid(GRID)
    mc.sweep.check_grid(grid)
    start = time.perf_counter()
    for cell in grid.cells():
        ends = [mc.sweep.ensure_endpoint(cell.endpoint(grid, i), tmp / "store") for i in (0, 1)]
        out = mc.sweep.run_cell(grid, cell, (str(ends[0]), str(ends[1])), str(tmp))
        assert out["error"] is None, out["error"]
    return time.perf_counter() - start


def _busy(tmp: Path) -> float:
    """Seconds the tasks computed: endpoint training plus cell work (from the sweep's records)."""
    cells = {r["cell"]: r["time_cell_s"] for r in mc.sweep.load(tmp)}
    ends = (tmp / "endpoints").glob("*.safetensors")
    train = [mc.load_checkpoint(p).meta["metrics"]["time_s"] for p in ends]
    return sum(cells.values()) + sum(train)


def _on_ray(tmp: Path, cpus: int) -> tuple[float, float]:
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR)  # fmt: skip
    boot = time.perf_counter() - start
    try:
        start = time.perf_counter()
        rows = mc.sweep.run(GRID, tmp, workers=cpus, progress=False)
        assert len(rows) == 12 and mc.sweep.status(tmp)["failed"] == 0
        return boot, time.perf_counter() - start
    finally:
        ray.shutdown()


def main() -> None:
    torch.set_num_threads(1)
    mc.data.load("mnist1d")  # generated once, before any timing
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        direct = _direct(tmp / "direct")
        boot1, one = _on_ray(tmp / "one", 1)
        boot2, two = _on_ray(tmp / "two", 2)
        busy1, busy2 = _busy(tmp / "one"), _busy(tmp / "two")
    n = len(GRID["seeds"])
    print(f"4 cells (mlp 2x256, {EPOCHS} epochs per endpoint, 3 alignments, linear path)")
    print(f"  direct, in process:  {direct / n:6.1f} s/cell")
    print(f"  sweep, Ray 1 CPU:    {one / n:6.1f} s/cell  -> overhead x{one / direct:.2f} "
          f"(x{(one + boot1) / direct:.2f} with Ray start-up {boot1:.1f} s)")  # fmt: skip
    print(f"  sweep, Ray 2 CPUs:   {two / n:6.1f} s/cell  -> speed-up x{one / two:.2f} over 1 CPU "
          f"(Ray start-up {boot2:.1f} s)")  # fmt: skip
    print(f"  tasks busy / wall (concurrency): 1 CPU {busy1 / one:.2f}, 2 CPUs {busy2 / two:.2f} "
          f"(2 CPUs on an idle machine: speed-up ~ concurrency)")  # fmt: skip


if __name__ == "__main__":
    main()
