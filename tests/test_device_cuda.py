"""Weight matching and the evaluation loop on a CUDA device give what they give on the CPU.

Skipped without a GPU. On a machine with one: ``pytest -q tests/test_device_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch
from benchmarks.bench_align import gpt2_spec, gpt2_state
from torch import nn

import modeconn as mc
from modeconn._src.align.weight import weight_matching
from modeconn._src.evaluation import StateRunner, cache_batches
from modeconn._src.spec import apply_permutation, random_permutation

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("where", ["states on cuda", "device=cuda"])
def test_weight_matching_on_cuda_recovers_the_planted_permutation(dtype, where):
    spec = gpt2_spec(6, 64, 4)
    a = gpt2_state(6, 64, vocab=500, n_pos=32, seed=0, dtype=dtype)
    planted = random_permutation(spec, seed=1)
    b = apply_permutation(spec, planted, a)
    if where == "states on cuda":
        a = {k: v.cuda() for k, v in a.items()}
        b = {k: v.cuda() for k, v in b.items()}
        found = weight_matching(spec, a, b)
    else:
        found = weight_matching(spec, a, b, device="cuda")
    assert all(torch.equal(found[g].cpu(), torch.argsort(planted[g])) for g in spec.groups)
    cpu = weight_matching(
        spec, {k: v.cpu() for k, v in a.items()}, {k: v.cpu() for k, v in b.items()}
    )
    assert found.info["objective"] == pytest.approx(cpu.info["objective"], rel=1e-9)


def _pair(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def test_paths_landscapes_and_ensembles_on_cuda_match_the_cpu():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 6, generator=g), torch.randint(0, 3, (200,), generator=g)
    splits = {"train": (x[:120], y[:120]), "test": (x[120:], y[120:])}
    a, b, c = (_pair(s) for s in range(3))
    path = mc.BezierCurve([a.state_dict(), c.state_dict(), b.state_dict()])
    on = {
        d: mc.evaluate_path(a, path, splits, ts=5, device=d, progress=False)
        for d in ("cpu", "cuda")
    }
    torch.testing.assert_close(on["cuda"].loss, on["cpu"].loss, rtol=1e-4, atol=1e-5)
    states = [m.state_dict() for m in (a, b, c)]
    pl = {
        d: mc.landscape.plane(
            a, states, splits["test"], grid=3, bn_data=splits["train"], device=d, progress=False
        )
        for d in ("cpu", "cuda")
    }
    torch.testing.assert_close(pl["cuda"].loss, pl["cpu"].loss, rtol=1e-4, atol=1e-5)
    ens = {
        d: mc.curve_ensemble(a, path, splits["test"], ts=3, bn_data=splits["train"], device=d)
        for d in ("cpu", "cuda")
    }
    assert ens["cuda"].loss == pytest.approx(ens["cpu"].loss, rel=1e-4)
    run = StateRunner(a, device="cuda", bn_data=splits["train"])
    m = run(b.state_dict(), cache_batches(splits["test"], "cuda"))
    assert m.n == 80 and next(run.net.parameters()).is_cuda


def test_every_aligner_runs_on_cuda_models_with_cpu_data():
    """Models on the GPU, data on the CPU (a user's usual case): the spec is traced where the model
    lives, and every aligner that needs no training loop returns the CPU answer."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 6, generator=g), torch.randint(0, 3, (128,), generator=g)
    a, b = _pair(0), _pair(1)
    spec_cpu = mc.infer_spec(a, x[:4], warn=False)
    spec_gpu = mc.infer_spec(a.cuda(), x[:4], warn=False)  # CPU inputs, GPU model
    assert spec_gpu.groups == spec_cpu.groups
    a, b = a.cpu(), b.cpu()
    for method in ("weight", "activation"):
        on_cpu = mc.align(a, b, method=method, data=(x, y))
        on_gpu = mc.align(a.cuda(), b.cuda(), method=method, data=(x, y))
        a, b = a.cpu(), b.cpu()
        for k, v in on_cpu.state_dict().items():
            torch.testing.assert_close(on_gpu.state_dict()[k].cpu(), v, rtol=1e-4, atol=1e-5)
