"""Merge benchmark: seconds per million parameters for every method, and peak memory of merging
four models relative to the size of one.

Model: the zoo MLP (input 256, width 640, 3 hidden layers, 10 classes), about 1.0M float32
parameters (4 MB). Four models are merged (SLERP: two); task-vector methods get a fifth state as
``base``; data-dependent methods (soup, Fisher, RegMean) see 256 random examples.

Memory: torch's CPU allocations are invisible to ``tracemalloc`` (they do not go through Python's
allocator) and the profiler's CPU memory events proved incomplete here, so each method runs in a
fresh subprocess that reads the kernel's accounting: the inputs are built, the peak resident set
(``VmHWM``) is reset through ``/proc/self/clear_refs``, the merge runs, and
``VmHWM - VmRSS(before)`` is the extra memory the merge needed (output included). Linux only;
elsewhere it is skipped.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

METHODS = ["average", "soup", "fisher", "regmean", "task_arithmetic", "ties", "dare", "slerp"]
N_MODELS = 4
N_EXAMPLES = 256


def _setup(method: str) -> tuple[list, dict]:
    import modeconn as mc
    from modeconn._src.merge import get_method

    def net(seed: int) -> torch.nn.Module:
        return mc.models.create(
            "mlp", input_shape=(256,), num_classes=10, width=640, depth=3, seed=seed
        )

    m = get_method(method)
    n = m.max_models or N_MODELS
    states = [{k: v.detach().clone() for k, v in net(s).state_dict().items()} for s in range(n)]
    kw: dict = {"method": method}
    if m.needs_base:
        kw["base"] = {k: v.detach().clone() for k, v in net(99).state_dict().items()}
    if m.needs_data:
        g = torch.Generator().manual_seed(0)
        kw.update(
            model=net(0),
            data=(
                torch.randn(N_EXAMPLES, 256, generator=g),
                torch.randint(0, 10, (N_EXAMPLES,), generator=g),
            ),
        )
    return states, kw


def _n_params(state: dict) -> int:
    return sum(v.numel() for v in state.values() if v.is_floating_point())


def _status(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024  # type: ignore[union-attr]


def memory_probe(method: str) -> None:
    """Run in a fresh process: print JSON with the merge's extra peak memory (bytes)."""
    import gc

    import modeconn as mc

    torch.set_num_threads(1)
    states, kw = _setup(method)
    gc.collect()  # no warm-up merge: it would leave freed pages in the heap and hide the peak
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    out = mc.merge(states, **kw)
    peak = _status("VmHWM") - before
    one = sum(v.numel() * v.element_size() for v in states[0].values())
    print(json.dumps({"peak_extra": peak, "model_bytes": one, "out_keys": len(out)}))


def _time(method: str, repeats: int) -> tuple[float, int]:
    import modeconn as mc

    states, kw = _setup(method)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mc.merge(states, **kw)
        best = min(best, time.perf_counter() - t0)
    return best, _n_params(states[0])


def main() -> None:
    torch.set_num_threads(2)
    root = Path(__file__).resolve().parents[1]
    print(
        f"{N_MODELS} models (slerp: 2) of the zoo MLP 256-640x3-10; data-dependent methods: "
        f"{N_EXAMPLES} examples; best of repeats; 2 threads"
    )
    print(f"{'method':<16} {'s / M params':>12} {'peak extra / one model':>24}")
    have_proc = Path("/proc/self/clear_refs").exists()
    for method in METHODS:
        seconds, n = _time(method, repeats=1 if method in ("fisher", "soup", "regmean") else 3)
        ratio = "n/a"
        if have_proc:
            res = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    f"from benchmarks.bench_merge import memory_probe; memory_probe({method!r})",
                ],
                cwd=root,
                capture_output=True,
                text=True,
                check=False,
            )
            try:
                r = json.loads(res.stdout.strip().splitlines()[-1])
                ratio = f"{r['peak_extra'] / r['model_bytes']:.2f}x"
            except (IndexError, ValueError, KeyError):
                ratio = "failed: " + (res.stderr.strip().splitlines() or ["?"])[-1][:40]
        print(f"{method:<16} {seconds / (n / 1e6):>12.4f} {ratio:>24}", flush=True)
    print(
        "peak extra = VmHWM during the merge - RSS before it (output state included); one model"
        " = 4.0 MB of float32 weights. Fisher's peak is dominated by per-example gradients"
        " (batch_size x model; lower it with batch_size=)."
    )


if __name__ == "__main__":
    main()
