"""modeconn benchmarks: `python -m benchmarks [name ...]` runs the bench_<name>.py modules."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_time(
    fn: Callable[[], object], repeats: int = 3, clock: Callable[[], float] = time.process_time
) -> float:
    """The fastest of ``repeats`` runs of ``fn`` in seconds of ``clock`` (CPU time by default:
    these machines are shared, so the minimum of CPU times is the steadiest figure)."""
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return min(times)
