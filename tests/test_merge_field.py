"""ZipIt!, Model Stock, Breadcrumbs, DELLA: closed forms, invariants, what the papers promise."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import modeconn as mc
from modeconn._src.errors import ConfigError
from modeconn._src.evaluation import with_state
from modeconn._src.merge import (
    breadcrumbs_mask,
    disjoint_merge,
    magprune,
    model_stock_tensor,
    zip_matching,
)


def _states(n: int, seed: int = 0, shape=(4, 6)):
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(shape, generator=g), "b": torch.randn(shape[0], generator=g)}
    fts = [{k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items()}
           for _ in range(n)]
    return base, fts


# --- Model Stock ------------------------------------------------------------------------------
def test_model_stock_closed_form() -> None:
    """Two task vectors at 60 degrees: cos = 1/2, t = 2c/(1+c) = 2/3 (Jang et al. Eq. 3)."""
    base = {"w": torch.zeros(2, dtype=torch.float64)}
    c = math.cos(math.pi / 3)
    t1 = {"w": torch.tensor([2.0, 0.0], dtype=torch.float64)}
    t2 = {"w": torch.tensor([c, math.sin(math.pi / 3)], dtype=torch.float64)}
    out = mc.merge([t1, t2], method="model_stock", base=base)
    avg = (t1["w"] + t2["w"]) / 2
    torch.testing.assert_close(out["w"], 2 / 3 * avg)


def test_model_stock_many_models_and_filter_wise() -> None:
    base, fts = _states(3)
    out = mc.merge(fts, method="model_stock", base=base)
    taus = [f["w"].flatten() - base["w"].flatten() for f in fts]
    cos = sum(float(torch.nn.functional.cosine_similarity(a, b, dim=0))
              for a, b in itertools.combinations(taus, 2)) / 3
    t = 3 * cos / (1 + 2 * cos)
    want = t * sum(f["w"] for f in fts) / 3 + (1 - t) * base["w"]
    torch.testing.assert_close(out["w"], want, rtol=1e-5, atol=1e-6)
    rows = model_stock_tensor(base["w"], [f["w"] for f in fts], filter_wise=True)
    for r in range(4):  # each row on its own equals the per-tensor formula on that row
        one = model_stock_tensor(base["w"][r], [f["w"][r] for f in fts])
        torch.testing.assert_close(rows[r], one)
    with pytest.raises(ConfigError, match="at least 2 models"):
        mc.merge(fts[:1], method="model_stock", base=base)


def test_model_stock_obtuse_task_vectors() -> None:
    """Obtuse task vectors (mean cosine < 0): the formula gives t < 0 (mergekit); the default
    floor gives the base."""
    base = {"w": torch.zeros(2, dtype=torch.float64)}
    ang = [0.0, math.acos(-0.25), -math.acos(-0.25)]  # pairwise cosines -1/4, -1/4, cos(2a)
    fts = [{"w": torch.tensor([math.cos(a), math.sin(a)], dtype=torch.float64)} for a in ang]
    cos = (-0.25 - 0.25 + math.cos(2 * ang[1])) / 3
    t = 3 * cos / (1 + 2 * cos)
    raw = mc.merge(fts, method="model_stock", base=base, min_cos=None)
    torch.testing.assert_close(raw["w"], t * sum(f["w"] for f in fts) / 3)
    torch.testing.assert_close(mc.merge(fts, method="model_stock", base=base)["w"], base["w"])


# --- Breadcrumbs ------------------------------------------------------------------------------
@pytest.mark.parametrize("density, gamma", [(0.5, 0.1), (0.9, 0.01), (0.2, 0.0), (0.3, 0.7)])
def test_breadcrumbs_mask_keeps_the_middle(density: float, gamma: float) -> None:
    tau = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    mask = breadcrumbs_mask(tau, density, gamma)
    assert int(mask.sum()) == int(density * 1000)
    kept, dropped = tau.abs()[mask], tau.abs()[~mask]
    top = int(gamma * 1000)
    largest = tau.abs().topk(top).values if top else torch.empty(0)
    assert not bool(torch.isin(largest, kept).any())  # the outliers are gone
    small = dropped[~torch.isin(dropped, largest)]
    if len(small):
        assert float(small.max()) <= float(kept.min())  # the rest dropped are the smallest


def test_breadcrumbs_merge_formula_and_task_arithmetic_limit() -> None:
    base, fts = _states(2)
    out = mc.merge(fts, method="breadcrumbs", base=base, density=0.5, gamma=0.1, scale=0.7)
    for k in base:
        taus = [f[k] - base[k] for f in fts]
        masked = [torch.where(breadcrumbs_mask(t, 0.5, 0.1), t, 0.0) for t in taus]
        torch.testing.assert_close(out[k], base[k] + 0.7 * sum(masked))
    ties = mc.merge(fts, method="breadcrumbs", base=base, density=0.5, gamma=0.1, consensus=True)
    masked = [torch.where(breadcrumbs_mask(f["w"] - base["w"], 0.5, 0.1), f["w"] - base["w"], 0.0)
              for f in fts]
    torch.testing.assert_close(ties["w"], base["w"] + disjoint_merge(masked))
    full = mc.merge(fts, method="breadcrumbs", base=base, density=1.0, gamma=0.0)
    ta = mc.merge(fts, method="task_arithmetic", base=base)
    for k in base:
        torch.testing.assert_close(full[k], ta[k])
    with pytest.raises(ConfigError, match="density \\+ gamma"):
        mc.merge(fts, method="breadcrumbs", base=base, density=0.95, gamma=0.1)


# --- DELLA ------------------------------------------------------------------------------------
def test_magprune_keeps_large_entries_more_often_and_is_unbiased() -> None:
    tau = torch.linspace(0.1, 1.0, 10).repeat(2, 1)  # rank = position in each row
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([magprune(tau, 0.5, 0.4, g) for _ in range(4000)])
    freq = (draws != 0).double().mean(0)
    want = 0.1 + 0.8 * torch.arange(10, dtype=torch.float64) / 9  # density - eps + 2 eps r
    torch.testing.assert_close(freq, want.repeat(2, 1), atol=0.03, rtol=0)
    torch.testing.assert_close(draws.double().mean(0), tau.double(), atol=0.04, rtol=0)


def test_della_full_density_is_ties_without_trim_and_validates() -> None:
    base, fts = _states(3)
    out = mc.merge(fts, method="della", base=base, density=1.0, epsilon=0.0, scale=0.8)
    ties = mc.merge(fts, method="ties", base=base, density=1.0, scale=0.8)
    for k in base:
        torch.testing.assert_close(out[k], ties[k])
    a = mc.merge(fts, method="della", base=base, seed=3)
    b = mc.merge(fts, method="della", base=base, seed=3)
    c = mc.merge(fts, method="della", base=base, seed=4)
    assert torch.equal(a["w"], b["w"]) and not torch.equal(a["w"], c["w"])
    with pytest.raises(ConfigError, match="density ± epsilon"):
        mc.merge(fts, method="della", base=base, density=0.5, epsilon=0.5)


# --- ZipIt! -----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_zip_matching_structure(seed: int) -> None:
    """Every feature is in exactly one of n clusters, classes never mix; with two models the
    same-model merges stay within the budget (beta = 0: a one-to-one matching)."""
    g = torch.Generator().manual_seed(seed)
    n, models = 12, 2 + seed % 2
    x = torch.randn(200, models * n, generator=g)
    corr = torch.corrcoef(x.T).double()
    labels = torch.tensor([0] * 6 + [1] * 6)
    beta = [0.5, 0.5, 0.0, 0.25][seed]
    u = zip_matching(corr, models, alpha=0.3, beta=beta, labels=labels)
    assert u.shape == (models * n, n) and torch.equal(u.sum(1), torch.ones(models * n))
    lab = labels.repeat(models)
    for k in range(n):
        assert len(set(lab[u[:, k] > 0].tolist())) == 1  # classes never mix
    if models == 2:
        per_model = u.view(models, n, n).sum(1)
        budget = int((models * n - n) // models * beta)
        assert ((per_model - 1).clamp_min(0).sum(1) <= budget).all()
        if beta == 0:
            assert torch.equal(per_model, torch.ones(models, n))


@pytest.fixture(scope="module")
def mlps(trained, mnist1d_splits):
    return trained("mlp", seed=0), trained("mlp", seed=1), mnist1d_splits


def test_zipit_of_a_permuted_copy_is_the_model(mlps) -> None:
    a, _, splits = mlps
    spec = mc.infer_spec(a, torch.zeros(2, 40))
    b = with_state(a, mc.apply_permutation(spec, mc.random_permutation(spec, seed=2),
                                           a.state_dict()))
    x, y = splits.train.tensors
    out = mc.merge([a, b], method="zipit", model=a, data=(x[:512], y[:512]))
    # the same function (dead units may pair with other dead units: their weights differ)
    xt = splits.test.tensors[0]
    torch.testing.assert_close(torch.func.functional_call(a, dict(out), (xt,)), a(xt),
                               rtol=1e-4, atol=1e-5)
    assert all(r["cross_model"] == 128 for r in out.info["zipit"].values())
    with pytest.raises(ConfigError, match="one data= source"):
        mc.merge([a, b], method="zipit", model=a, data=[(x, y), (x, y)])


@pytest.mark.slow
def test_zipit_clearly_beats_plain_averaging(mlps) -> None:
    """Independently trained MNIST-1D MLPs (measured: average 0.16, ZipIt 0.47-0.50, the
    endpoints 0.53)."""
    a, b, splits = mlps
    acc = {
        name: mc.evaluate(a, splits.test, state=mc.merge([a, b], method=name, model=a,
                                                          data=splits.train)).accuracy
        for name in ("average", "zipit")
    }
    assert acc["zipit"] > acc["average"] + 0.2, acc


def test_zipit_refuses_layers_it_cannot_zip() -> None:
    class Odd(nn.Module):  # a raw parameter matrix: which axis consumes is unknown
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 4))
            self.out = nn.Linear(6, 2)

        def forward(self, x):
            return self.out(torch.relu(nn.functional.linear(x, self.w)))

    net = Odd()
    x = torch.randn(32, 4)
    with pytest.raises(ConfigError, match="zipit"):
        mc.merge([net, net], method="zipit", model=net, data=(x, torch.zeros(32).long()))


@pytest.mark.parametrize("name", ["cnn1d", "cnn", "resnet"])
def test_zipit_of_a_permuted_copy_on_conv_and_residual_nets(name: str) -> None:
    """Conv layers (axis 1 consumes), BatchNorm (produces) and residual streams zip back to the
    model's function."""
    shape = (1, 8, 8) if name in ("cnn", "resnet") else (40,)
    a = mc.models.create(name, input_shape=shape, seed=0).eval()
    spec = mc.infer_spec(a, torch.zeros(2, *shape))
    b = mc.apply_permutation(spec, mc.random_permutation(spec, seed=1), a.state_dict())
    x = torch.randn(128, *shape, generator=torch.Generator().manual_seed(0))
    out = mc.merge([a.state_dict(), b], method="zipit", model=a, data=(x, torch.zeros(128).long()))
    torch.testing.assert_close(torch.func.functional_call(a, dict(out), (x,)), a(x),
                               rtol=1e-4, atol=1e-5)
