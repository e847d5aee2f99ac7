"""Tests of STE matching (Git Re-Basin, 2023) and Sinkhorn re-basin (Peña et al., 2022)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

import modeconn as mc
from modeconn._src.align.sinkhorn import _unit_mask, sinkhorn, soft_apply
from modeconn._src.errors import ConfigError
from modeconn._src.evaluation import evaluate, with_state
from modeconn._src.spec import Heads, PermutationSpec, Slot, check_permutation
from modeconn._src.state import lerp
from test_norm import mlp_spec


# --- helpers ------------------------------------------------------------------------------------
def one_hot(p: torch.Tensor) -> torch.Tensor:
    """Permutation matrix with P[i, p[i]] = 1."""
    return torch.eye(len(p))[p]


def planted(model: nn.Module, seed: int = 3):
    """(spec, q, B) with B = q(A): the answer is inverse(q)."""
    spec = mlp_spec(model)
    q = mc.random_permutation(spec, seed=seed)
    return spec, q, with_state(model, mc.apply_permutation(spec, q, model.state_dict()))


def assert_recovers(spec, perm, q, a, b, x):
    for g in q:
        assert torch.equal(perm[g], torch.argsort(q[g])), g
    back = mc.apply_permutation(spec, perm, b.state_dict())
    assert all(torch.equal(back[k], v) for k, v in a.state_dict().items())
    with torch.no_grad():
        assert torch.equal(with_state(b, back)(x), a(x))


class Holder(nn.Module):
    """A module that only holds named tensors (for weight-only methods)."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for k, v in state.items():
            self.register_parameter(k, nn.Parameter(v.clone()))


def structured_spec() -> tuple[PermutationSpec, dict[str, torch.Tensor]]:
    """Blocks (conv -> flatten), an offset (concatenation), repeats (channel-last flatten),
    two axes on one tensor, and an attention group whose slots carry parts of it."""
    spec = PermutationSpec(
        groups={"a": 4, "c": 3, "r": 2, "h": 8},
        slots={
            "a": (Slot("w1", 0), Slot("b1", 0), Slot("w3", 1, block=3)),
            "c": (Slot("wc", 0), Slot("w3", 1, offset=12), Slot("wr", 0)),
            "r": (Slot("wr", 1, repeats=3),),
            "h": (Slot("q", 0, length=4), Slot("v", 0, unit_start=4), Slot("o", 1, unit_start=4)),
        },
        heads={"h": Heads(2, ((0, 2), (4, 2)))},
    )
    g = torch.Generator().manual_seed(0)
    shapes = {
        "w1": (4, 5), "b1": (4,), "w3": (2, 15), "wc": (3, 2), "wr": (3, 6),
        "q": (4, 3), "v": (4, 3), "o": (3, 4), "untouched": (2, 2),
    }
    return spec, {k: torch.randn(*s, generator=g) for k, s in shapes.items()}


# --- Sinkhorn and soft permutations -------------------------------------------------------------
def test_sinkhorn_is_doubly_stochastic_and_keeps_masked_zeros():
    m = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    s = sinkhorn(m, n_iter=50)
    torch.testing.assert_close(s.sum(0), torch.ones(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(s.sum(1), torch.ones(6), atol=1e-5, rtol=0)
    mask = torch.ones(6, 6, dtype=torch.bool)
    mask[:3, 3:] = mask[3:, :3] = False
    s = sinkhorn(m.masked_fill(~mask, float("-inf")), n_iter=50)
    assert torch.equal(s[~mask], torch.zeros(18))
    torch.testing.assert_close(s.sum(1), torch.ones(6), atol=1e-5, rtol=0)


@pytest.mark.parametrize("n", [1, 2, 5, 9])
def test_sinkhorn_at_low_temperature_is_the_hungarian_solution(n):
    # oracle: scipy's assignment on the same matrix
    m = torch.randn(n, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64) * 3
    rows, cols = linear_sum_assignment(m.numpy(), maximize=True)
    s = sinkhorn(m, n_iter=500, tau=0.02)
    assert torch.equal(s.argmax(1), torch.from_numpy(cols))
    assert (s[rows, cols] > 0.99).all()


def test_soft_apply_with_hard_permutations_equals_apply_permutation():
    spec, state = structured_spec()
    spec.check(state)
    for seed in range(5):
        perm = mc.random_permutation(spec, seed=seed)
        soft = soft_apply(spec, {g: one_hot(p) for g, p in perm.items()}, state)
        hard = mc.apply_permutation(spec, perm, state)
        assert soft.keys() == hard.keys()
        for k in hard:
            torch.testing.assert_close(soft[k], hard[k], atol=1e-6, rtol=0)
        assert soft["untouched"] is state["untouched"]


def test_soft_apply_gradient_matches_closed_form():
    # d/dP <T, P W Q^T> = T Q W^T  (for the row group; Q the column group's matrix)
    spec = PermutationSpec.from_axes({"r": 3, "c": 4}, {"w": ("r", "c")})
    g = torch.Generator().manual_seed(1)
    w, t = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    p = torch.rand(3, 3, generator=g).requires_grad_(True)
    q = torch.rand(4, 4, generator=g)
    out = soft_apply(spec, {"r": p, "c": q}, {"w": w})["w"]
    torch.testing.assert_close(out, p @ w @ q.T)
    (out * t).sum().backward()
    torch.testing.assert_close(p.grad, t @ q @ w.T)


def test_unit_mask_separates_units_carried_by_different_slots():
    spec, _ = structured_spec()
    mask = _unit_mask(spec, "h")
    assert mask is not None and _unit_mask(spec, "a") is None
    assert mask[:4, :4].all() and mask[4:, 4:].all() and not mask[:4, 4:].any()


def test_sinkhorn_recovers_a_planted_heads_permutation():
    spec, state = structured_spec()
    a = Holder(state)
    q = mc.random_permutation(spec, seed=7)
    b = Holder(mc.apply_permutation(spec, q, state))
    perm = mc.sinkhorn_matching(a, b, spec=spec, steps=150)
    check_permutation(spec, perm)
    for g in q:
        assert torch.equal(perm[g], torch.argsort(q[g])), g
    assert perm.info["weight_distance"] == 0.0


@pytest.mark.parametrize("width, depth", [(16, 2), (32, 3)])
def test_sinkhorn_weight_loss_recovers_a_planted_permutation(width, depth):
    a = mc.models.create("mlp", input_shape=(40,), width=width, depth=depth, seed=width)
    spec, q, b = planted(a)
    perm = mc.sinkhorn_matching(a, b, spec=spec, steps=100, seed=1)
    assert_recovers(spec, perm, q, a, b, torch.randn(16, 40))
    assert perm.info["losses"][-1] < perm.info["losses"][0]


@pytest.mark.slow
def test_sinkhorn_weight_loss_recovers_planted_trained_mlp(trained):
    a = trained("mlp", seed=0)
    spec, q, b = planted(a, seed=11)
    perm = mc.sinkhorn_matching(a, b, spec=spec, steps=100)
    assert_recovers(spec, perm, q, a, b, torch.randn(16, 40))


@pytest.mark.slow
def test_sinkhorn_task_loss_finds_a_low_loss_midpoint(trained, mnist1d_splits):
    a, b = trained("mlp", seed=0), trained("mlp", seed=1)
    spec = mlp_spec(a)
    sa, sb = a.state_dict(), b.state_dict()

    def mid_loss(perm):
        state = lerp(sa, mc.apply_permutation(spec, perm, sb), 0.5)
        return evaluate(a, mnist1d_splits.test, state=state).loss

    perm = mc.sinkhorn_matching(a, b, mnist1d_splits.train, spec=spec, loss="task", steps=100)
    check_permutation(spec, perm)
    # measured: identity midpoint 2.56, task-loss Sinkhorn ~1.45, weight matching 1.26
    assert mid_loss(perm) < mid_loss(mc.identity_permutation(spec)) - 0.5
    rnd = mc.sinkhorn_matching(
        a, b, mnist1d_splits.train, spec=spec, loss="task", lam="random", steps=5
    )
    check_permutation(spec, rnd)


# --- STE ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ste_recovers_a_planted_permutation(trained, mnist1d_splits):
    a = trained("mlp", seed=0)
    spec, q, b = planted(a, seed=5)
    perm = mc.ste_matching(a, b, mnist1d_splits.train, spec=spec, max_steps=10)
    assert perm.info["steps"] == 10 and len(perm.info["train_losses"]) == 10
    assert_recovers(spec, perm, q, a, b, mnist1d_splits.test.tensors[0][:64])
    x, y = mnist1d_splits.train.tensors
    assert perm.info["loss"] == pytest.approx(evaluate(a, (x[:512], y[:512])).loss, rel=1e-5)


@pytest.mark.slow
def test_ste_keeps_the_best_scored_permutation(trained, mnist1d_splits):
    a, b = trained("mlp", seed=0), trained("mlp", seed=1)
    spec = mlp_spec(a)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    perm = mc.ste_matching(a, b, mnist1d_splits.train, spec=spec, max_steps=40, eval_batches=4)
    assert all(torch.equal(b.state_dict()[k], v) for k, v in before.items())
    check_permutation(spec, perm)
    x, y = mnist1d_splits.train.tensors
    sub = (x[:512], y[:512])  # the scoring set: eval_batches x batch_size, unshuffled

    def mid_loss(p):
        state = lerp(a.state_dict(), mc.apply_permutation(spec, p, b.state_dict()), 0.5)
        return evaluate(a, sub, state=state).loss

    wm = mc.weight_matching(spec, a.state_dict(), b.state_dict())
    assert perm.info["loss_weight_matching"] == pytest.approx(mid_loss(wm), rel=1e-5)
    assert perm.info["loss"] == pytest.approx(mid_loss(perm), rel=1e-5)
    assert perm.info["loss"] <= perm.info["loss_weight_matching"]
    assert mid_loss(perm) < mid_loss(mc.identity_permutation(spec)) - 0.5


@pytest.mark.slow
def test_ste_and_sinkhorn_run_on_batchnorm_models(trained, mnist1d_splits):
    a, b = trained("mlp", seed=0, norm="bn"), trained("mlp", seed=1, norm="bn")
    spec = mlp_spec(a)
    ste = mc.ste_matching(a, b, mnist1d_splits.train, spec=spec, max_steps=5)
    sk = mc.sinkhorn_matching(a, b, mnist1d_splits.train, spec=spec, loss="task", steps=5)
    for perm in (ste, sk):
        check_permutation(spec, perm)
        aligned = with_state(b, mc.apply_permutation(spec, perm, b.state_dict()))
        x = mnist1d_splits.test.tensors[0][:64]
        with torch.no_grad():
            torch.testing.assert_close(aligned.eval()(x), b.eval()(x), atol=1e-5, rtol=1e-5)


# --- registry and errors --------------------------------------------------------------------------
def test_registered_in_align():
    assert {"ste", "sinkhorn"} <= set(mc.aligner_names())
    a = mc.models.create("mlp", input_shape=(40,), width=16, depth=2, seed=0)
    spec, q, b = planted(a)
    x = torch.randn(32, 40)
    data = (x, torch.randint(0, 10, (32,)))
    for method, kw in (("sinkhorn", {"steps": 60}), ("ste", {"max_steps": 2})):
        aligned = mc.align(a, b, method=method, spec=spec, data=data, **kw)
        with torch.no_grad():
            torch.testing.assert_close(aligned(x), a(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError):
        mc.align(a, b, method="ste", spec=spec)


def test_bad_arguments_raise_config_errors():
    a = mc.models.create("mlp", input_shape=(40,), width=8, depth=1, seed=0)
    spec = mlp_spec(a)
    data = (torch.randn(8, 40), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ConfigError):
        mc.sinkhorn_matching(a, a, spec=spec, loss="nope")
    with pytest.raises(ConfigError):
        mc.sinkhorn_matching(a, a, spec=spec, loss="task")  # task loss needs data
    with pytest.raises(ConfigError):
        mc.sinkhorn_matching(a, a, data, spec=spec, loss="task", lam=2.0)
    with pytest.raises(ConfigError):
        mc.ste_matching(a, a, data, spec=spec, lr=-1.0)
    other = mc.models.create("mlp", input_shape=(40,), width=9, depth=1, seed=0)
    with pytest.raises(mc.IncompatibleModelsError):
        mc.ste_matching(a, other, data, spec=spec)
    assert np.isfinite(mc.sinkhorn_matching(a, a, spec=spec, steps=0).info["weight_distance"])
