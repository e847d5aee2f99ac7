"""Aligner contract benchmark: every registered aligner's time relative to weight matching.

One pair of randomly initialised MLPs (MNIST-1D shape, 3 x 128) and 1024 random examples; each
aligner runs with small settings (the contract tests' ``FAST``-like options). Also: the cost of
``align()``'s single input check (``run_aligner``) against calling ``weight_matching`` directly,
annealing's time per move, and ZipIt!/OT barycenter against plain averaging.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

import modeconn as mc

from . import best_time

OPTIONS: dict[str, dict[str, Any]] = {
    "ste": {"max_steps": 20}, "sinkhorn": {"steps": 100},
    "pam": {"epochs": 1, "samples": 4, "eval_examples": 512, "progress": False},
    "annealing": {"steps": 200, "eval_examples": 512},
}



def _best(fn: Callable[[], object], repeats: int = 3) -> float:
    return best_time(fn, repeats, clock=time.perf_counter)  # wall-clock seconds, as a user waits


def main() -> None:
    torch.set_num_threads(1)
    a, b = (mc.models.create("mlp", input_shape=(40,), seed=s) for s in (0, 1))
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(1024, 40, generator=g), torch.randint(0, 10, (1024,), generator=g))
    spec = mc.infer_spec(a, data[0][:2])
    sa, sb = a.state_dict(), b.state_dict()
    base = _best(lambda: mc.weight_matching(spec, sa, sb))
    via = _best(lambda: mc.align(a, b, method="weight", spec=spec))
    print(f"weight_matching: {1e3 * base:.1f} ms; through mc.align: x{via / base:.2f}")
    for name in mc.aligner_names():
        opts = OPTIONS.get(name, {})
        t = _best(lambda n=name, o=opts: mc.align(a, b, method=n, data=data, spec=spec, **o),
                  repeats=1 if name in OPTIONS else 3)
        extra = f" ({1e3 * t / opts['steps']:.2f} ms/move)" if name == "annealing" else ""
        print(f"  {name:<10} x{t / base:8.1f} weight matching{extra}")
    avg = _best(lambda: mc.merge([a, b]))
    zip_t = _best(lambda: mc.merge([a, b], method="zipit", model=a, data=data), repeats=1)
    bary = _best(lambda: mc.ot_barycenter(spec, [sa, sb]), repeats=1)
    print(f"zipit: x{zip_t / avg:.0f} plain averaging; ot_barycenter: x{bary / avg:.0f}")


if __name__ == "__main__":
    main()
