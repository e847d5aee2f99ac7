"""The sweep's results database: ``DIR/results.sqlite``, one transaction per finished cell."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

DB_FILE = "results.sqlite"
# The fixed columns of table ``results`` (grid-key columns follow ``cell``), with SQL types.
COLUMNS: dict[str, str] = {
    "cell": "TEXT NOT NULL",
    "seed_a": "INTEGER",
    "seed_b": "INTEGER",
    "align": "TEXT NOT NULL",
    "path": "TEXT NOT NULL",
    "loss_barrier": "REAL",  # test split (``barrier_split``)
    "error_barrier": "REAL",  # test split
    "train_loss_barrier": "REAL",
    "test_acc_mean": "REAL",
    "test_acc_min": "REAL",
    "test_loss_max": "REAL",
    "a_test_loss": "REAL",
    "a_test_accuracy": "REAL",
    "b_test_loss": "REAL",
    "b_test_accuracy": "REAL",
    "time_align_s": "REAL",
    "time_path_s": "REAL",
    "time_cell_s": "REAL",
    "artifact": "TEXT",
    "config_hash": "TEXT",
    "barrier_split": "TEXT",
    "modeconn_version": "TEXT",
    "torch_version": "TEXT",
}
TIMING_COLUMNS = ("time_align_s", "time_path_s", "time_cell_s")


@contextlib.contextmanager
def connect(out_dir: str | Path, grid_columns: Sequence[str] = ()) -> Iterator[sqlite3.Connection]:
    """Open (creating) ``out_dir/results.sqlite`` with tables ``results`` and ``cells``.

    ``grid_columns`` are added to ``results`` when missing (a grid that gained a key).
    """
    path = Path(out_dir) / DB_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, timeout=60)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        with con:
            spec = {"cell": COLUMNS["cell"], **{c: "" for c in grid_columns}, **COLUMNS}
            cols = ", ".join(f'"{c}" {t}'.rstrip() for c, t in spec.items())
            con.execute(
                f"CREATE TABLE IF NOT EXISTS results ({cols}, PRIMARY KEY (cell, align, path))"
            )
            con.execute(
                "CREATE TABLE IF NOT EXISTS cells (cell TEXT PRIMARY KEY, status TEXT NOT NULL, "
                "error TEXT, attempts INTEGER NOT NULL, label TEXT, config TEXT, time_s REAL, "
                "finished REAL)"
            )
            have = {r[1] for r in con.execute("PRAGMA table_info(results)")}
            for c in grid_columns:
                if c not in have:
                    con.execute(f'ALTER TABLE results ADD COLUMN "{c}"')
        yield con
    finally:
        con.close()


def cell_status(con: sqlite3.Connection) -> dict[str, str]:
    """``{cell id: "done" | "failed"}`` for every recorded cell."""
    return dict(con.execute("SELECT cell, status FROM cells").fetchall())


def _attempts(con: sqlite3.Connection, cell: str) -> int:
    row = con.execute("SELECT attempts FROM cells WHERE cell = ?", (cell,)).fetchone()
    return int(row[0]) + 1 if row else 1


def record(
    con: sqlite3.Connection,
    cell: str,
    label: str,
    config: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    error: str | None,
    time_s: float,
) -> None:
    """Store a finished cell in one transaction: its rows (replacing any) and its status."""
    with con:
        attempts = _attempts(con, cell)
        con.execute("DELETE FROM results WHERE cell = ?", (cell,))
        for row in rows:
            names = ", ".join(f'"{k}"' for k in row)
            marks = ", ".join("?" for _ in row)
            values = [json.dumps(v) if isinstance(v, list | dict) else v for v in row.values()]
            con.execute(f"INSERT INTO results ({names}) VALUES ({marks})", values)
        con.execute(
            "INSERT OR REPLACE INTO cells VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (cell, "failed" if error else "done", error, attempts, label,
             json.dumps(config, sort_keys=True, default=str), time_s, time.time()),
        )  # fmt: skip


def rows(out_dir: str | Path, order: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Every row of table ``results`` as a dict, sorted by ``order`` then seeds, align, path."""
    path = Path(out_dir) / DB_FILE
    if not path.is_file():
        return []
    con = sqlite3.connect(path, timeout=60)
    try:
        con.row_factory = sqlite3.Row
        keys = [*order, "seed_a", "seed_b", "align", "path"]
        by = ", ".join(f'"{k}"' for k in keys)
        return [dict(r) for r in con.execute(f"SELECT * FROM results ORDER BY {by}")]
    finally:
        con.close()


def failures(out_dir: str | Path) -> list[dict[str, Any]]:
    """The failed cells: ``cell``, ``label``, ``error``, ``attempts``."""
    path = Path(out_dir) / DB_FILE
    if not path.is_file():
        return []
    con = sqlite3.connect(path, timeout=60)
    try:
        q = "SELECT cell, label, error, attempts FROM cells WHERE status = 'failed' ORDER BY label"
        return [dict(zip(("cell", "label", "error", "attempts"), r, strict=True))
                for r in con.execute(q)]  # fmt: skip
    finally:
        con.close()
