"""Scale benchmark: streamed merges of Hugging Face model folders, and mergekit as a peer.

Four GPT-2-shaped "fine-tunes" (a base plus noise) are written as model folders; every
per-tensor method of ``mc.merge_files`` merges them (SLERP: two) folder to folder. Each merge runs
in a fresh process that samples its own anonymous resident memory (``RssAnon`` in
``/proc/self/status``, every 2 ms, from a thread) and reports the peak above the baseline after
its imports, divided by one model's size; file pages the kernel can drop (the mmapped inputs) are
not counted, as they are not in ``RssAnon``. mergekit (when ``/work/venvs/mergekit`` or
``$MERGEKIT_PYTHON`` exists) merges the same folders through its YAML CLI in the same kind of
probe: linear, TIES (density 0.2) and DARE (``dare_linear``, density 0.5).

    python -m benchmarks scale                       # moderate: ~17M parameters per model
    MODECONN_BENCH_SCALE=large python -m benchmarks scale   # GPT-2 small, 124M parameters

Linux only (``/proc``). Ratios measured in one run on a shared machine; times are wall clock.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SIZES = {  # GPT-2 configurations
    "small": {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 1024},
    "moderate": {"n_embd": 384, "n_layer": 6, "n_head": 6, "vocab_size": 16384},
    "large": {"n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257},  # GPT-2 small
}
N_MODELS = 4
MERGEKIT = [("linear", "average", {}), ("ties", "ties", {"density": 0.2}),
            ("dare_linear", "dare", {"p": 0.5})]


def _rss_anon() -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"RssAnon:\s+(\d+) kB", text).group(1)) * 1024  # type: ignore[union-attr]


def probe(job: dict) -> None:
    """In a fresh process: run one merge, print JSON ``{"peak": bytes, "seconds": s}``."""
    import gc

    import torch

    torch.set_num_threads(1)
    if job["tool"] == "modeconn":
        import modeconn as mc

        def run() -> None:
            mc.merge_files(job["paths"], job["out"], method=job["method"], base=job.get("base"),
                           **job["params"])
    else:
        from mergekit.scripts.run_yaml import main as mergekit_yaml

        def run() -> None:
            mergekit_yaml.main([job["config"], job["out"], "--quiet", "--no-cuda"],
                               standalone_mode=False)
    gc.collect()
    base = _rss_anon()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_anon())
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    run()
    seconds = time.perf_counter() - t0
    stop.set()
    th.join()
    peak[0] = max(peak[0], _rss_anon())
    print(json.dumps({"peak": peak[0] - base, "seconds": seconds}))


def _make_folders(root: Path, size: str) -> tuple[Path, list[Path], int]:
    """The base (random GPT-2 of ``size``) and N fine-tunes (base + noise), as model folders."""
    import torch
    import transformers

    from modeconn._src.hf import save_state, write_tensors

    cfg = transformers.GPT2Config(**SIZES[size], n_positions=1024)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    model.save_pretrained(root / "base")  # the tied lm_head.weight is not saved
    import modeconn as mc

    base = mc.load_checkpoint(root / "base").state
    layout = {k: (base.shape(k), base.dtype(k)) for k in base}  # type: ignore[attr-defined]
    nbytes = sum(base[k].numel() * base[k].element_size() for k in base)
    del model
    fts = []
    for i in range(N_MODELS):
        g = torch.Generator().manual_seed(i + 1)

        def chunks(g: torch.Generator = g):
            for k in layout:
                t = base[k]
                noise = torch.randn(t.shape, generator=g) if t.is_floating_point() else 0
                yield k, t + 0.01 * noise if t.is_floating_point() else t

        fts.append(write_tensors(root / f"ft{i}", layout, chunks(), folder_from=root / "base",
                                 max_shard_bytes=nbytes // 3 + 1))
    save_state(root / "base_sharded", base, folder_from=root / "base")
    return root / "base", fts, nbytes


def _run_probe(python: str, job: dict, env: dict[str, str]) -> dict:
    res = subprocess.run([python, __file__, "--probe", json.dumps(job)], capture_output=True,
                         text=True, env=env, check=False)
    try:
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"error": (res.stderr.strip().splitlines() or ["?"])[-1][:70]}


def _mergekit_python() -> str | None:
    cand = os.environ.get("MERGEKIT_PYTHON", "/work/venvs/mergekit/bin/python")
    return cand if Path(cand).is_file() else None


def _mergekit_config(path: Path, method: str, base: Path, fts: list[Path], params: dict) -> None:
    models = []
    for f in fts:
        p: dict = {"weight": 1.0}
        if "density" in params:
            p["density"] = params["density"]
        models.append({"model": str(f), "parameters": p})
    cfg: dict = {"merge_method": method, "models": models, "dtype": "float32"}
    if method != "linear":
        cfg["base_model"] = str(base)
    else:
        cfg["parameters"] = {"normalize": True}
    path.write_text(json.dumps(cfg))  # JSON is YAML


def _max_diff(a: Path, b: Path) -> float:
    import modeconn as mc

    sa, sb = mc.load_checkpoint(a).state, mc.load_checkpoint(b).state
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa if k in sb)


def main() -> None:
    size = os.environ.get("MODECONN_BENCH_SCALE", "moderate")
    if size not in SIZES:
        sys.exit(f"MODECONN_BENCH_SCALE must be one of {sorted(SIZES)}")
    if not Path("/proc/self/status").exists():
        print("skipped: needs Linux /proc")
        return
    import modeconn as mc
    from modeconn._src.merge import get_method

    repo = Path(__file__).resolve().parents[1]
    path = f"{repo / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    root = Path(tempfile.mkdtemp(prefix="modeconn-bench-scale-"))
    try:
        base, fts, one = _make_folders(root, size)
        print(f"{N_MODELS} GPT-2 '{size}' fine-tunes ({one / 4e6:.1f}M float32 parameters, "
              f"{one / 2**20:.0f} MiB each; sharded folders) onto a base; 1 thread")
        print(f"{'tool':<10} {'method':<24} {'seconds':>8} {'peak anon / one model':>22}")
        ours: dict[str, Path] = {}
        for name in mc.streaming_methods():
            m = get_method(name)
            variants = ([("", {"density": 0.2}), (" trim=model", {"density": 0.2, "trim": "model"})]
                        if name == "ties" else [("", {"p": 0.5})] if name == "dare" else [("", {})])
            for label, params in variants:
                paths = fts[: m.max_models or N_MODELS]
                out = root / f"out_{name}{label.strip()}"
                job = {"tool": "modeconn", "paths": [str(p) for p in paths], "out": str(out),
                       "method": name, "params": params,
                       "base": str(base) if m.needs_base else None}
                r = _run_probe(sys.executable, job, env)
                if "error" in r:
                    print(f"{'modeconn':<10} {name + label:<24} failed: {r['error']}")
                    continue
                ours[name + label] = out
                print(f"{'modeconn':<10} {name + label + f' ({len(paths)})':<24} "
                      f"{r['seconds']:>8.1f} {r['peak'] / one:>21.2f}x", flush=True)
        py = _mergekit_python()
        if py is None:
            print("mergekit: skipped (no /work/venvs/mergekit; set MERGEKIT_PYTHON)")
            return
        for mk_method, our_method, params in MERGEKIT:
            cfg = root / f"mk_{mk_method}.yaml"
            _mergekit_config(cfg, mk_method, base, fts, params)
            out = root / f"mk_{mk_method}"
            r = _run_probe(py, {"tool": "mergekit", "config": str(cfg), "out": str(out)},
                           {**os.environ, "OMP_NUM_THREADS": "1"})
            if "error" in r:
                print(f"{'mergekit':<10} {mk_method:<24} failed: {r['error']}")
                continue
            note = ""
            if our_method == "average" and "average" in ours:
                note = f"  (max |ours - mergekit| = {_max_diff(ours['average'], out):.1e})"
            print(f"{'mergekit':<10} {mk_method + f' ({N_MODELS})':<24} {r['seconds']:>8.1f} "
                  f"{r['peak'] / one:>21.2f}x{note}", flush=True)
        print("peak anon = max RssAnon during the merge - RssAnon after imports (sampled every "
              "2 ms); target <= 2.5x")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--probe":
        probe(json.loads(sys.argv[2]))
    else:
        main()
