"""The aligner contract, run over every registered aligner; OT fusion and annealing specifics."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import modeconn as mc
from modeconn._src.align import Aligner, AlignInputs, FunctionAligner, Params
from modeconn._src.align.annealing import annealing_matching
from modeconn._src.align.api import resolve_spec
from modeconn._src.align.base import INPUTS
from modeconn._src.align.ot import ot_fusion, ot_matching, ot_transport
from modeconn._src.errors import ConfigError, IncompatibleModelsError, SpecError
from modeconn._src.evaluation import with_state

pytest.importorskip("ot")

# Small settings per aligner, so the contract runs in seconds. A new built-in aligner must add
# an entry (test_every_builtin_has_fast_options).
FAST: dict[str, dict] = {
    "weight": {},
    "activation": {},
    "ste": {"max_steps": 20},
    "sinkhorn": {"steps": 100},
    "pam": {"epochs": 4, "batch_size": 64, "samples": 4, "eval_examples": 512, "progress": False},
    "ot": {},
    "annealing": {"steps": 800, "eval_examples": 512},
}
# How far each aligner brings the test-loss barrier of a trained MNIST-1D MLP pair down, as a
# fraction of the naive barrier (measured: naive 1.40; weight/activation/ste 0.10-0.16, sinkhorn
# 0.19, ot 0.16-0.21, annealing (800 moves) 0.40; PAM from the identity, 4 short epochs: 1.29).
LOWERS = {"pam": 0.97, "annealing": 0.5}


def _spec(model: nn.Module) -> mc.PermutationSpec:
    return resolve_spec(model, None, example_inputs=torch.zeros(2, 40))


@pytest.fixture(scope="module")
def planted(trained, mnist1d_splits):
    a = trained("mlp", seed=0)
    spec = _spec(a)
    q = mc.random_permutation(spec, seed=5)
    b = with_state(a, mc.apply_permutation(spec, q, a.state_dict()))
    x, y = mnist1d_splits.train.tensors
    return a, b, spec, mc.inverse_permutation(q), (x[:1024], y[:1024])


@pytest.fixture(scope="module")
def pair(trained, mnist1d_splits):
    a, b = trained("mlp", seed=0), trained("mlp", seed=1)
    x, y = mnist1d_splits.train.tensors
    return a, b, _spec(a), (x[:1024], y[:1024])


def _barrier(a: nn.Module, state_b: dict, data) -> float:
    ev = mc.evaluate_path(a, mc.LinearPath(a.state_dict(), state_b), data, ts=5, progress=False)
    return ev.barrier("loss")


def test_every_builtin_has_fast_options_and_a_reference() -> None:
    builtin = {n for n in mc.aligner_names()
               if not isinstance(mc.get_aligner(n), FunctionAligner)}  # not user functions
    assert builtin == set(FAST), "a new aligner needs FAST options (the contract runs over FAST)"
    for name in FAST:
        al = mc.get_aligner(name)
        assert isinstance(al, Aligner) and al.name == name
        assert al.reference.year >= 2016 and al.reference.url.startswith("https://")
        assert issubclass(al.Params, Params) and al.needs <= set(INPUTS)
        assert {"spec", "states"} <= al.needs
        assert al.accepts("seed") or name == "ot"
        assert al.summary


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAST))
def test_planted_permutation(planted, name: str) -> None:
    """B = a permutation of A: exact aligners recover it; every aligner returns a valid
    permutation that keeps B's function and leaves the inputs alone."""
    a, b, spec, true, data = planted
    before = {k: v.clone() for k, v in b.state_dict().items()}
    aligned, perm = mc.align(a, b, method=name, data=data, spec=spec, return_permutation=True,
                             **FAST[name])
    mc.check_permutation(spec, perm)
    assert perm.info["method"] == name
    x = data[0][:64]
    torch.testing.assert_close(aligned.eval()(x), b.eval()(x), rtol=1e-4, atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in b.state_dict().items())
    if mc.get_aligner(name).exact:
        assert all(torch.equal(perm[g], true[g]) for g in spec.groups), name
        for k, v in a.state_dict().items():
            torch.testing.assert_close(aligned.state_dict()[k], v)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAST))
def test_barrier_lowered_on_a_trained_pair(pair, mnist1d_splits, name: str) -> None:
    a, b, spec, data = pair
    perm = mc.align(a, b, method=name, data=data, spec=spec, return_permutation=True,
                    **FAST[name])[1]
    naive = _barrier(a, b.state_dict(), mnist1d_splits.test)
    after = _barrier(a, mc.apply_permutation(spec, perm, b.state_dict()), mnist1d_splits.test)
    assert naive > 1.0, naive
    assert after < LOWERS.get(name, 0.3) * naive, (name, naive, after)


@pytest.mark.parametrize("name", list(FAST))
def test_bad_input_errors(pair, name: str) -> None:
    a, b, spec, data = pair
    al = mc.get_aligner(name)
    with pytest.raises(ConfigError, match=f"alignment method '{name}': bogus: unknown option"):
        mc.align(a, b, method=name, data=data, spec=spec, bogus=1)
    if al.needs_data:
        with pytest.raises(ConfigError, match=f"'{name}' needs data"):
            mc.align(a, b, method=name, spec=spec)
    other = mc.models.create("mlp", input_shape=(40,), width=16)
    with pytest.raises(IncompatibleModelsError):
        mc.align(a, other, method=name, data=data, spec=spec)
    with pytest.raises(SpecError):
        mc.align(other, with_state(other, other.state_dict()), method=name, data=data, spec=spec)
    if al.needs_models:
        with pytest.raises(ConfigError, match="runs the networks: give model="):
            mc.align_states(spec, a.state_dict(), b.state_dict(), method=name, data=data)


def test_unknown_aligner_lists_the_names() -> None:
    with pytest.raises(ConfigError, match="unknown alignment method 'magic'; choose one of: w"):
        mc.get_aligner("magic")


def test_user_function_aligner_through_align_and_merge(planted) -> None:
    a, b, spec, true, data = planted
    calls = []

    def oracle(model_a, model_b, data_, spec_, **options):
        calls.append(options)
        return dict(true)  # a plain dict is accepted and wrapped

    mc.register_aligner("oracle_test")(oracle)
    aligned = mc.align(a, b, method="oracle_test", spec=spec, scale=2)
    assert calls == [{"scale": 2}]
    torch.testing.assert_close(aligned.state_dict(), a.state_dict())
    merged = mc.merge([a, b], align="oracle_test", spec=spec, model=a)
    torch.testing.assert_close(dict(merged), a.state_dict())
    with pytest.raises(ConfigError, match="already registered"):
        mc.register_aligner("oracle_test")


def test_merge_many_models_with_an_aligner_without_a_joint_method(planted) -> None:
    a, b, spec, _, _ = planted
    c = with_state(a, mc.apply_permutation(spec, mc.random_permutation(spec, seed=9),
                                           a.state_dict()))
    merged = mc.merge([a, b, c], align="ot", spec=spec, model=a)
    torch.testing.assert_close(dict(merged), a.state_dict())


# --- OT fusion --------------------------------------------------------------------------------
def _one_layer(seed: int, width: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, width), nn.ReLU(), nn.Linear(width, 2))


def test_ot_exact_equals_brute_force_weight_matching_on_one_group() -> None:
    """One hidden group: every slot is "incoming", and exact OT on squared distances between
    uniform marginals is argmax_p sum <W_A, p(W_B)> (norms are constant), found by brute force."""
    a, b = _one_layer(0), _one_layer(1)
    spec = mc.infer_spec(a, torch.zeros(2, 3))
    (g,) = spec.groups
    perm = ot_matching(spec, a.state_dict(), b.state_dict())
    best = max(
        itertools.permutations(range(5)),
        key=lambda p: mc.weight_objective(spec, a.state_dict(), b.state_dict(),
                                          {g: torch.tensor(p)}),
    )
    assert perm[g].tolist() == list(best)
    assert perm.info["mass_kept"] == pytest.approx(1.0)


def test_ot_activation_exact_equals_activation_matching(pair) -> None:
    """Exact OT on the cost -corr is the Hungarian solution on corr: activation matching."""
    a, b, spec, data = pair
    ot_p = mc.align(a, b, method="ot", cost="activation", data=data, spec=spec,
                    return_permutation=True)[1]
    act = mc.activation_matching(a, b, data, spec=spec)
    agree = sum(int((ot_p[g] == act[g]).sum()) for g in spec.groups) / sum(spec.groups.values())
    assert agree > 0.97, agree  # activation matching also rematches dead units


def test_ot_soft_maps_are_doubly_stochastic_and_sharpen(pair) -> None:
    a, b, spec, _ = pair
    sa, sb = a.state_dict(), b.state_dict()
    soft = ot_transport(spec, sa, sb, reg=0.05)
    sharp = ot_matching(spec, sa, sb, reg=0.01)
    for g, p in soft.items():
        ones = torch.ones(spec.groups[g], dtype=torch.float64)
        torch.testing.assert_close(p.sum(0), ones, atol=1e-3, rtol=0)
        torch.testing.assert_close(p.sum(1), ones, atol=1e-3, rtol=0)
        assert float(p.max()) < 0.99  # soft: some mass is spread
    kept_soft = ot_matching(spec, sa, sb, reg=0.05).info["mass_kept"]
    assert sharp.info["mass_kept"] > kept_soft


def test_ot_fusion_of_a_permuted_copy_is_the_model(planted) -> None:
    a, b, spec, _, _ = planted
    fused = ot_fusion(spec, a.state_dict(), b.state_dict())
    torch.testing.assert_close(fused, a.state_dict())
    with pytest.raises(ConfigError, match="cost must be one of"):
        ot_transport(spec, a.state_dict(), b.state_dict(), cost="euclid")
    with pytest.raises(ConfigError, match="needs model= and data="):
        ot_transport(spec, a.state_dict(), b.state_dict(), cost="activation")


# --- simulated annealing ----------------------------------------------------------------------
def _midpoint_loss(a: nn.Module, spec, perm, b: nn.Module, data) -> float:
    pb = mc.apply_permutation(spec, perm, b.state_dict())
    mid = {k: (v + pb[k]) / 2 for k, v in a.state_dict().items()}
    return mc.evaluate(a, data, state=mid).loss


def test_annealing_objective_is_the_midpoint_loss_and_never_rises(pair) -> None:
    a, b, spec, data = pair
    sub = (data[0][:256], data[1][:256])
    perm = annealing_matching(a, b, sub, spec=spec, steps=300, eval_examples=256, seed=3)
    info = perm.info
    assert info["objective"] == pytest.approx(_midpoint_loss(a, spec, perm, b, sub), rel=1e-5)
    ident = mc.identity_permutation(spec)
    assert info["start"] == pytest.approx(_midpoint_loss(a, spec, ident, b, sub), rel=1e-5)
    assert info["objective"] < info["start"] and info["accepted"] > 0
    assert all(x >= y for x, y in itertools.pairwise(info["history"]))
    # zero steps: the start itself; same seed: the same result
    assert annealing_matching(a, b, sub, spec=spec, steps=0).info["objective"] == info["start"]
    again = annealing_matching(a, b, sub, spec=spec, steps=300, eval_examples=256, seed=3)
    assert all(torch.equal(again[g], perm[g]) for g in spec.groups)


def test_annealing_refines_a_start_and_validates(planted) -> None:
    a, b, spec, true, data = planted
    perm = annealing_matching(a, b, data, spec=spec, init=true, steps=50,
                              objective="barrier", eval_examples=256)
    assert perm.info["objective"] <= perm.info["start"]
    assert perm.info["start"] == pytest.approx(0.0, abs=1e-5)  # the true one: a flat path
    for kw, msg in [({"objective": "max"}, "objective must be"),
                    ({"t0": 1e-3, "t_end": 1e-2}, "t_end <= t0"),
                    ({"steps": -1}, "steps >= 0")]:
        with pytest.raises(ConfigError, match=msg):
            annealing_matching(a, b, data, spec=spec, **kw)


def test_align_inputs_are_what_run_gets(planted) -> None:
    a, b, spec, _, data = planted
    seen: list[AlignInputs] = []

    class Probe(Aligner):
        exact = False

        def run(self, inputs, params):
            seen.append(inputs)
            return mc.identity_permutation(inputs.spec)

    al = Probe("probe", mc.get_aligner("weight").reference)
    from modeconn._src.align.api import run_aligner

    run_aligner(al, al.parameters(), AlignInputs(spec, a.state_dict(), b.state_dict()))
    assert seen[0].model_a is None and seen[0].data is None


def test_ot_barycenter_of_permuted_copies_is_the_model(planted) -> None:
    a, b, spec, _, _ = planted
    c = mc.apply_permutation(spec, mc.random_permutation(spec, seed=3), a.state_dict())
    bary = mc.ot_barycenter(spec, [a.state_dict(), b.state_dict(), c], iters=2)
    torch.testing.assert_close(bary, a.state_dict())
    with pytest.raises(ConfigError, match=">= 2 models"):
        mc.ot_barycenter(spec, [a.state_dict()])


@pytest.mark.slow
def test_ot_barycenter_fuses_three_trained_models(trained, mnist1d_splits) -> None:
    """Akash et al. 2023: far better than plain averaging (measured: 0.51 vs 0.12; endpoints
    0.64, 20 epochs)."""
    ms = [trained("mlp", seed=s) for s in (0, 1, 2)]
    spec = _spec(ms[0])
    bary = mc.ot_barycenter(spec, [m.state_dict() for m in ms])
    acc = mc.evaluate(ms[0], mnist1d_splits.test, state=bary).accuracy
    avg = mc.evaluate(ms[0], mnist1d_splits.test, state=mc.merge(ms)).accuracy
    assert acc > avg + 0.15, (acc, avg)


@pytest.mark.parametrize("name", ["mlp", "cnn1d", "cnn", "resnet", "transformer"])
def test_ot_recovers_planted_permutations_on_every_zoo_model(name: str) -> None:
    """Exact OT on a permuted copy: the planted permutation (attention heads, residual streams,
    q/k vs v dims included), and the barycenter of the two is the model."""
    shape = (1, 8, 8) if name in ("cnn", "resnet") else (40,)
    a = mc.models.create(name, input_shape=shape, seed=0)
    spec = mc.infer_spec(a, torch.zeros(2, *shape))
    q = mc.random_permutation(spec, seed=1)
    b = mc.apply_permutation(spec, q, a.state_dict())
    perm = mc.ot_matching(spec, a.state_dict(), b)
    true = mc.inverse_permutation(q)
    assert all(torch.equal(perm[g], true[g]) for g in spec.groups)
    torch.testing.assert_close(mc.ot_barycenter(spec, [a.state_dict(), b]), a.state_dict())
