"""Run the benchmarks: ``python -m benchmarks`` (all) or ``python -m benchmarks spec align``.

Each ``benchmarks/bench_<name>.py`` defines ``main() -> None`` that prints its figures (ratios
measured within one run, since these machines are noisy).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    here = Path(__file__).parent
    names = sorted(
        m.name[len("bench_") :]
        for m in pkgutil.iter_modules([str(here)])
        if m.name.startswith("bench_")
    )
    chosen = argv or names
    unknown = [n for n in chosen if n not in names]
    if unknown:
        sys.exit(f"unknown benchmark(s) {unknown}; available: {names}")
    for name in chosen:
        print(f"\n=== benchmark: {name} ===", flush=True)
        importlib.import_module(f"benchmarks.bench_{name}").main()


if __name__ == "__main__":
    main(sys.argv[1:])
