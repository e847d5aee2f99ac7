#!/usr/bin/env bash
# The GPU checks of weight matching and the evaluation loop, as one script for a CUDA machine:
#   bash benchmarks/gpu_check_wm.sh        (from the repository root; writes to stdout)
set -euo pipefail
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
python3 -m pytest -q -p no:cacheprovider -o addopts= --rootdir=. --confcutdir=. tests/test_device_cuda.py
python3 - <<'PY'
import time, torch
import modeconn as mc
from benchmarks.bench_align import gpt2_spec, gpt2_state
from modeconn._src.spec import apply_permutation, random_permutation
spec = gpt2_spec(12, 768, 12)
a = {k: v.cuda() for k, v in gpt2_state(12, 768, 50257, 1024, seed=0).items()}
b = {k: v.cuda() for k, v in gpt2_state(12, 768, 50257, 1024, seed=1).items()}
for label, sb in (("independent pair", b), ("planted", None)):
    if sb is None:
        planted = random_permutation(spec, seed=0)
        sb = apply_permutation(spec, planted, a)
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    p = mc.weight_matching(spec, a, sb, max_iter=5)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    extra = (torch.cuda.max_memory_allocated() - base) / base
    ok = "" if label != "planted" else f", recovered {all(torch.equal(p[g], torch.argsort(planted[g])) for g in spec.groups)}"
    print(f"GPU weight matching GPT-2-small shape, {label}: {dt:.1f} s, {p.info['rounds']} rounds after the matched start, peak extra GPU memory / the two models {extra:.2f}{ok}")
PY
