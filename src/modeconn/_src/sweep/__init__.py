"""Sweeps: grids of mode-connectivity experiments on Ray that resume, with queryable results.

``mc.sweep.run(grid, out_dir)`` runs the cells ``out_dir`` lacks; ``mc.sweep.load(out_dir)``
returns the rows of ``out_dir/results.sqlite``; ``mc.sweep.status(out_dir)`` says how far it is.
Ray (``pip install 'modeconn[sweep]'``) is imported only when cells have to run.
"""

from __future__ import annotations

from ..html_report import plot_barriers
from .cell import BARRIER_SPLIT, run_cell
from .grid import Cell, CurveOptions, Grid, check_grid, load_grid, train_options
from .runner import import_ray, load, run, status
from .store import endpoint_key, ensure_endpoint
from .summary import summarize

__all__ = [
    "BARRIER_SPLIT", "Cell", "CurveOptions", "Grid", "check_grid", "import_ray",
    "endpoint_key", "ensure_endpoint", "load", "load_grid", "plot_barriers", "run", "run_cell",
    "status", "summarize", "train_options",
]  # fmt: skip
