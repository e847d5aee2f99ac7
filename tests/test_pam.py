"""PAM (Tatro et al. 2020): doubly stochastic projection, BvN rounding, planted permutations."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import modeconn as mc
from modeconn._src.align.api import resolve_spec
from modeconn._src.align.pam import (
    birkhoff_decomposition,
    pam_align,
    pam_objective,
    pam_round,
    project_doubly_stochastic,
)
from modeconn._src.errors import ConfigError
from modeconn._src.evaluation import with_state


def _spec(model: nn.Module) -> mc.PermutationSpec:
    return resolve_spec(model, None, example_inputs=torch.zeros(2, 40))


def _perm_matrix(p: torch.Tensor) -> torch.Tensor:
    m = torch.zeros(len(p), len(p), dtype=torch.float64)
    m[torch.arange(len(p)), p] = 1.0
    return m


def _agreement(p: dict, q: dict) -> float:
    return sum(int((p[g] == q[g]).sum()) for g in p) / sum(len(v) for v in p.values())


@pytest.mark.parametrize("method", ["alternating", "sinkhorn"])
def test_projection_is_doubly_stochastic(method: str) -> None:
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 5, 30):
        m = torch.randn(n, n, generator=g, dtype=torch.float64) + 0.3 * torch.eye(n)
        p = project_doubly_stochastic(m, method=method)
        assert (p >= 0).all()
        torch.testing.assert_close(p.sum(0), torch.ones(n, dtype=torch.float64), atol=1e-5, rtol=0)
        torch.testing.assert_close(p.sum(1), torch.ones(n, dtype=torch.float64), atol=1e-5, rtol=0)
    perm = _perm_matrix(torch.randperm(6, generator=g))
    tol = 1e-9 if method == "alternating" else 1e-5  # sinkhorn lifts zeros to its floor
    got = project_doubly_stochastic(perm, method=method)
    torch.testing.assert_close(got, perm, atol=tol, rtol=0)
    ds = 0.5 * perm + 0.5 * torch.full((6, 6), 1 / 6, dtype=torch.float64)
    torch.testing.assert_close(project_doubly_stochastic(ds, method=method), ds, atol=tol, rtol=0)
    with pytest.raises(ValueError):
        project_doubly_stochastic(torch.ones(2, 3))


def test_alternating_projection_keeps_a_near_vertex_sparse() -> None:
    # the property PAM relies on: a small step away from a permutation stays near it
    g = torch.Generator().manual_seed(1)
    n = 8
    step = _perm_matrix(torch.randperm(n, generator=g)) + 0.01 * torch.randn(n, n, generator=g,
                                                                             dtype=torch.float64)
    alt = project_doubly_stochastic(step, method="alternating")
    sk = project_doubly_stochastic(step, method="sinkhorn")
    assert int((alt > 1e-6).sum()) < int((sk > 1e-6).sum())


def test_birkhoff_decomposition_returns_valid_permutations_and_reconstructs() -> None:
    g = torch.Generator().manual_seed(2)
    for n in (1, 3, 7):
        k = min(4, math.factorial(n))
        perms = [torch.randperm(n, generator=g) for _ in range(k)]
        w = torch.rand(k, generator=g, dtype=torch.float64) + 0.1
        w = w / w.sum()
        d = sum(wi * _perm_matrix(p) for wi, p in zip(w, perms, strict=True))
        terms = birkhoff_decomposition(d, max_terms=100)
        coefs = [c for c, _ in terms]
        assert coefs == sorted(coefs, reverse=True)
        assert math.isclose(sum(coefs), 1.0, abs_tol=1e-6)
        for _, p in terms:
            assert sorted(p.tolist()) == list(range(n))
        rebuilt = sum(c * _perm_matrix(p) for c, p in terms)
        torch.testing.assert_close(rebuilt, d, atol=1e-6, rtol=0)
    # brute force on 3x3: a 0.7/0.3 mixture decomposes into exactly those two permutations
    a, b = torch.tensor([2, 0, 1]), torch.tensor([0, 2, 1])
    terms = birkhoff_decomposition(0.7 * _perm_matrix(a) + 0.3 * _perm_matrix(b))
    assert [(round(c, 6), p.tolist()) for c, p in terms] == [(0.7, a.tolist()), (0.3, b.tolist())]
    all3 = {p for p in itertools.permutations(range(3))}
    assert {tuple(p.tolist()) for _, p in terms} <= all3


@pytest.fixture(scope="module")
def planted(trained, mnist1d_splits):
    a = trained("mlp", seed=0)
    spec = _spec(a)
    q = mc.random_permutation(spec, seed=5)
    b = with_state(a, mc.apply_permutation(spec, q, a.state_dict()))
    x, y = mnist1d_splits.train.tensors
    return a, b, spec, mc.inverse_permutation(q), (x[:1024], y[:1024])


def test_pam_keeps_a_planted_permutation(planted) -> None:
    a, b, spec, true, data = planted
    before = {k: v.clone() for k, v in b.state_dict().items()}
    perm = pam_align(a, b, data, spec=spec, init=true, epochs=2, batch_size=128, samples=4,
                     eval_examples=512, progress=False)
    mc.check_permutation(spec, perm)
    assert _agreement(perm, true) == 1.0 and perm.info["changed"] == 0.0
    # the aligned path is flat: the objective equals the endpoint's loss (no BN, train mode)
    x, y = data
    assert math.isclose(perm.info["objective"], mc.evaluate(a, (x[:512], y[:512])).loss,
                        rel_tol=1e-4)
    assert len(perm.info["history"]) == 2
    assert all(torch.equal(v, before[k]) for k, v in b.state_dict().items())


def test_pam_rounding_recovers_the_planted_permutation_from_a_mixture(planted) -> None:
    a, b, spec, true, data = planted
    g = torch.Generator().manual_seed(0)
    mixed = next(iter(true))  # one group relaxed: a mixture of a worse permutation and the truth
    w = true[mixed].clone()
    idx = torch.randperm(len(w), generator=g)[:20]
    w[idx] = w[idx.roll(1)]  # a cyclic shift of 20 units
    wrong = {**true, mixed: w}
    soft = {k: _perm_matrix(true[k]) for k in true}
    soft[mixed] = 0.55 * _perm_matrix(w) + 0.45 * _perm_matrix(true[mixed])
    perm = pam_round(a, spec, a.state_dict(), b.state_dict(), soft, data, previous=wrong,
                     samples=16, eval_examples=512)
    # Hungarian alone would return the heavier (wrong) term; the objective picks the planted one
    assert perm.info["chosen"] == "bvn" and _agreement(perm, true) == 1.0
    assert perm.info["objectives"]["hungarian"] > perm.info["objective"]
    sub = (data[0][:512], data[1][:512])
    ref = pam_objective(a, spec, a.state_dict(), b.state_dict(), true, sub)
    assert math.isclose(perm.info["objective"], ref, rel_tol=1e-9)


def test_pam_stays_close_to_activation_matching(trained, mnist1d_splits) -> None:
    # the seed paper's claim: the neuron-alignment permutation is (nearly) locally optimal
    a, b = trained("mlp", seed=0), trained("mlp", seed=1)
    spec = _spec(a)
    x, y = mnist1d_splits.train.tensors
    data = (x[:1024], y[:1024])
    act = mc.activation_matching(a, b, data, spec=spec)
    perm = pam_align(a, b, data, spec=spec, init=act, epochs=2, samples=4, eval_examples=512,
                     progress=False)
    agree = _agreement(perm, act)
    assert agree >= 0.9, agree
    # PAM never returns something worse than where it started (the previous P is a candidate)
    start = pam_objective(a, spec, a.state_dict(), b.state_dict(), act, (x[:512], y[:512]))
    assert perm.info["objective"] <= start + 1e-12
    # and the aligned segment beats the unaligned one
    ident = mc.identity_permutation(spec)
    assert start < pam_objective(a, spec, a.state_dict(), b.state_dict(), ident, (x[:512], y[:512]))


def test_pam_is_a_registered_aligner_and_validates(planted) -> None:
    a, b, spec, true, data = planted
    assert "pam" in mc.aligner_names()
    aligned = mc.align(a, b, method="pam", data=data, spec=spec, init=true, epochs=1, samples=2,
                       eval_examples=256, progress=False)
    x = data[0][:64]
    with torch.no_grad():
        torch.testing.assert_close(aligned(x), b(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(aligned(x), a(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError):
        pam_align(a, b, None, spec=spec, progress=False)
    with pytest.raises(ConfigError):
        pam_align(a, b, data, spec=spec, lr=0.0, progress=False)


def test_pam_input_transform_is_used() -> None:
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    b = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    spec = mc.PermutationSpec.from_axes(
        {"h": 6}, {"0.weight": ("h", None), "0.bias": ("h",), "2.weight": (None, "h")}
    )
    data = (torch.randn(64, 4), torch.randint(0, 3, (64,)))
    calls = []

    def attack(forward, x, y):
        calls.append(forward(x).shape)
        return x + 0.01

    perm = pam_align(a, b, data, spec=spec, epochs=1, batch_size=32, samples=2,
                     input_transform=attack, progress=False)
    mc.check_permutation(spec, perm)
    assert len(calls) >= 2 and calls[0] == (32, 3)


def test_fit_curve_with_pam_permutes_endpoint_b(planted) -> None:
    a, b, spec, true, data = planted
    curve = mc.fit_curve(a, b, data, align="pam", epochs=1, progress=False,
                         align_options={"init": true, "epochs": 1, "samples": 2,
                                        "eval_examples": 256})
    end = curve.state(1.0)
    for k, v in a.state_dict().items():  # B permuted by the planted inverse is A itself
        torch.testing.assert_close(end[k], v)
    assert mc.pam_align is pam_align


def test_pam_handles_batchnorm_buffers() -> None:
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    spec = mc.PermutationSpec.from_axes({"h": 6}, {
        "0.weight": ("h", None), "0.bias": ("h",), "1.weight": ("h",), "1.bias": ("h",),
        "1.running_mean": ("h",), "1.running_var": ("h",), "3.weight": (None, "h"),
    })
    q = mc.random_permutation(spec, seed=1)
    b = with_state(a, mc.apply_permutation(spec, q, a.state_dict()))
    data = (torch.randn(64, 4), torch.randint(0, 3, (64,)))
    perm = pam_align(a, b, data, spec=spec, init=mc.inverse_permutation(q), epochs=2,
                     batch_size=16, samples=2, progress=False)
    assert torch.equal(perm["h"], mc.inverse_permutation(q)["h"])
