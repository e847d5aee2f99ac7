"""Aggregate sweep rows over seed pairs: mean and standard deviation per grid point and method."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

METRICS = ("loss_barrier", "error_barrier", "test_acc_mean", "test_acc_min")


def summarize(
    rows: Sequence[Mapping[str, Any]],
    by: Sequence[str],
    metrics: Sequence[str] = METRICS,
) -> list[dict[str, Any]]:
    """Group ``rows`` by the columns ``by`` and give each metric's mean and std over the group.

    The std is the sample standard deviation (``n − 1``; 0 for a single row). Missing values
    (``None``, e.g. ``train_loss_barrier`` of a merge row) are left out.

    Args:
        rows: results rows (:func:`modeconn.sweep.load`).
        by: grouping columns, e.g. ``["width", "align", "path"]``.
        metrics: the columns to aggregate.

    Returns:
        One dict per group, in first-seen order: the ``by`` values, ``n`` and ``<metric>_mean``,
        ``<metric>_std`` for each metric.

    Example:
        >>> rows = [{"w": 8, "loss_barrier": 1.0}, {"w": 8, "loss_barrier": 3.0}]
        >>> summarize(rows, ["w"], ["loss_barrier"])
        [{'w': 8, 'n': 2, 'loss_barrier_mean': 2.0, 'loss_barrier_std': 1.4142135623730951}]
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in by), []).append(r)
    out = []
    for key, members in groups.items():
        item: dict[str, Any] = dict(zip(by, key, strict=True))
        item["n"] = len(members)
        for m in metrics:
            vals = [float(r[m]) for r in members if r.get(m) is not None]
            mean = sum(vals) / len(vals) if vals else math.nan
            var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else 0.0
            item[f"{m}_mean"], item[f"{m}_std"] = mean, math.sqrt(var) if vals else math.nan
        out.append(item)
    return out
