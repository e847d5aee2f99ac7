#!/usr/bin/env bash
# The GPU checks in one prepared script, for a machine with a CUDA GPU (CI has none):
#   bash scripts/gpu-check.sh [WORKDIR]     (from the repository root)
# 1. the tests that need a GPU (they skip elsewhere); 2. every command with --device cuda on
# MNIST-1D; 3. evaluate_path on the GPU against the CPU (agreement and time); 4. weight matching
# on a GPT-2-small-shaped pair on the GPU (time, peak memory, planted recovery).
set -euo pipefail
root=$PWD
work=${1:-/tmp/modeconn-gpu}
mkdir -p "$work"
export PYTHONPATH="$root/src:$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export MODECONN_CACHE="$work/cache"
py=${PYTHON:-python3}
$py -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print('torch', torch.__version__, torch.cuda.get_device_name(0))"

echo "== 1. GPU tests"
$py -m pytest -q -p no:cacheprovider -o addopts= --rootdir=. --confcutdir=. \
    tests/test_device_cuda.py tests/test_folders_streaming.py -k "cuda or device"

echo "== 2. commands with --device cuda"
mc() { echo "+ modeconn $*"; (cd "$work" && $py -m _modeconn_cli "$@"); }
d=(--device cuda)
mc train --model mlp --data mnist1d --seed 0 --epochs 3 --out a.safetensors "${d[@]}"
mc train --model mlp --data mnist1d --seed 1 --epochs 3 --out b.safetensors "${d[@]}"
mc train --model mlp --data mnist1d --seed 2 --epochs 2 --optimizer sam --out s.safetensors "${d[@]}"
mc spec a.safetensors
mc interpolate a.safetensors b.safetensors --points 9 --json line.json "${d[@]}"
mc align a.safetensors b.safetensors --method weight --data mnist1d --out bw.safetensors "${d[@]}"
mc align a.safetensors b.safetensors --method activation --data mnist1d --out ba.safetensors "${d[@]}"
mc curve a.safetensors bw.safetensors --data mnist1d --kind bezier --bends 1 --epochs 2 --out curve "${d[@]}"
mc evaluate curve --data mnist1d --points 9 "${d[@]}"
mc merge a.safetensors bw.safetensors --method average --out avg.safetensors "${d[@]}"
mc merge a.safetensors bw.safetensors --method fisher --data mnist1d --out fisher.safetensors "${d[@]}"
mc autoneb a.safetensors b.safetensors --data mnist1d --out neb --cycles 2 --steps 50 "${d[@]}"

echo "== 3. evaluate_path: GPU vs CPU"
(cd "$work" && $py - <<'PY'
import time, torch, modeconn as mc
splits = mc.data.load("mnist1d")
a, b = mc.load_checkpoint("a.safetensors"), mc.load_checkpoint("bw.safetensors")
model, path = a.build(), mc.LinearPath(a.state, b.state)
res = {}
for dev in ("cpu", "cuda"):
    mc.evaluate_path(model, path, splits, ts=3, device=dev, progress=False)  # warm-up
    torch.cuda.synchronize(); t0 = time.perf_counter()
    ev = mc.evaluate_path(model, path, splits, ts=25, device=dev, progress=False)
    torch.cuda.synchronize(); res[dev] = (time.perf_counter() - t0, ev)
    print(f"evaluate_path, 25 points, {dev}: {res[dev][0]:.2f} s")
diff = (res["cpu"][1].loss - res["cuda"][1].loss).abs().max().item()  # test split
print(f"cpu time / cuda time {res['cpu'][0] / res['cuda'][0]:.1f}; max test-loss difference {diff:.1e}")
assert diff < 1e-3, diff
PY
)

echo "== 4. weight matching, GPT-2-small shape, on the GPU"
$py - <<'PY'
import time, torch
import modeconn as mc
from benchmarks.bench_align import gpt2_spec, gpt2_state
spec = gpt2_spec(12, 768, 12)
a = {k: v.cuda() for k, v in gpt2_state(12, 768, 50257, 1024, seed=0).items()}
b = {k: v.cuda() for k, v in gpt2_state(12, 768, 50257, 1024, seed=1).items()}
for label in ("independent pair", "planted"):
    planted = mc.random_permutation(spec, seed=0) if label == "planted" else None
    sb = mc.apply_permutation(spec, planted, a) if planted is not None else b
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated(); t0 = time.perf_counter()
    p = mc.weight_matching(spec, a, sb, max_iter=5)
    torch.cuda.synchronize(); dt = time.perf_counter() - t0
    extra = (torch.cuda.max_memory_allocated() - base) / base
    ok = "" if planted is None else (
        f", recovered {all(torch.equal(p[g], torch.argsort(planted[g])) for g in spec.groups)}")
    print(f"{label}: {dt:.1f} s, peak extra GPU memory / the two models {extra:.2f}{ok}")
PY
echo "gpu-check: all passed"
