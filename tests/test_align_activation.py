"""Tests of activation matching (neuron alignment; Li et al. 2016, Tatro et al. 2020)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import modeconn as mc
from modeconn._src.align import StreamingCorrelation, activation_matching
from modeconn._src.errors import ConfigError, IncompatibleModelsError, SpecError
from modeconn._src.evaluation import with_state
from modeconn._src.spec import PermutationSpec


# --- streaming statistics -------------------------------------------------------------------------
def test_streaming_correlation_equals_corrcoef_on_one_big_batch():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(6, 5, generator=g, dtype=torch.float64)
    a = 3.0 + torch.randn(1000, 6, generator=g, dtype=torch.float64) * 2  # offset and scale
    b = a @ mix + 0.5 * torch.randn(1000, 5, generator=g, dtype=torch.float64) - 7.0
    s = StreamingCorrelation(6, 5)
    for lo in range(0, 1000, 128):  # uneven batches, the last one short
        s.update(a[lo : lo + 128].float(), b[lo : lo + 128].float())
    oracle = np.corrcoef(a.float().double().numpy().T, b.float().double().numpy().T)[:6, 6:]
    np.testing.assert_allclose(s.correlation(eps=0).numpy(), oracle, atol=1e-9)
    # with the seed code's guard: Z_A Z_B^T / n, z = (x - mean) / (np.std(x) + eps)
    an, bn = a.float().double().numpy(), b.float().double().numpy()
    za = (an - an.mean(0)) / (an.std(0) + 1e-5)
    zb = (bn - bn.mean(0)) / (bn.std(0) + 1e-5)
    np.testing.assert_allclose(s.correlation().numpy(), za.T @ zb / len(an), atol=1e-9)


def test_streaming_correlation_of_a_constant_unit_is_zero_not_nan():
    s = StreamingCorrelation(2, 2)
    x = torch.randn(50, 2)
    x[:, 1] = 4.0  # a dead unit
    s.update(x, x)
    c = s.correlation()
    assert torch.isfinite(c).all()
    assert c[1].abs().max() < 1e-6
    assert c[0, 0] == pytest.approx(1.0, abs=1e-4)


# --- planted permutations on every zoo model ------------------------------------------------------
def _data_for(name: str, mnist1d_splits, digits_splits):
    return digits_splits if name == "cnn" else mnist1d_splits


def _planted_pair(name, splits, seed=0):
    a = mc.models.create(
        name, input_shape=splits.input_shape, num_classes=splits.num_classes, seed=seed
    )
    x = splits.train.tensors[0]
    spec = mc.infer_spec(a, x[:4], warn=False)
    planted = mc.random_permutation(spec, seed=seed + 1)
    b = with_state(a, mc.apply_permutation(spec, planted, a.state_dict()))
    return a, b, spec, planted


@pytest.mark.parametrize("name", mc.models.names())
def test_planted_permutation_is_recovered_on_every_zoo_model(name, mnist1d_splits, digits_splits):
    splits = _data_for(name, mnist1d_splits, digits_splits)
    a, b, spec, planted = _planted_pair(name, splits)
    x = splits.train.tensors[0][:1000]  # real inputs: few dead units, no ties
    y = splits.train.tensors[1][:1000]
    before_b = {k: v.clone() for k, v in b.state_dict().items()}
    perm = activation_matching(a, b, (x, y), spec=spec)
    for g in spec.groups:
        assert torch.equal(perm[g], torch.argsort(planted[g])), g
    aligned = mc.apply_permutation(spec, perm, b.state_dict())
    assert all(torch.equal(aligned[k], v) for k, v in a.state_dict().items())
    assert all(torch.equal(b.state_dict()[k], v) for k, v in before_b.items())  # B untouched
    assert perm.info["weight_groups"] == []
    if name == "mlp":  # two dead ReLUs in the last layer on these inputs: tie broken by weights
        assert sum(perm.info["constant_units_rematched"].values()) >= 2
    # identical units correlate 1 at each site (dead units 0; several sites are summed)
    after, before = perm.info["mean_corr_after"], perm.info["mean_corr_before"]
    for g, size in spec.groups.items():
        cover = torch.zeros(size)  # sites carrying each unit
        for site in spec.sites[g]:
            n = size - site.unit_start if site.length is None else site.length
            cover[site.unit_start : site.unit_start + n] += 1
        assert after[g] > max(before[g], 0.9 * float(cover.mean())), g


def test_layerwise_equals_joint_and_streaming_is_batch_size_independent(mnist1d_splits):
    s = mnist1d_splits
    a = mc.models.create("resnet", input_shape=s.input_shape, seed=0)
    b = mc.models.create("resnet", input_shape=s.input_shape, seed=1)
    x, y = s.train.tensors[0][:600], s.train.tensors[1][:600]
    spec = mc.infer_spec(a, x[:4], warn=False)
    joint = activation_matching(a, b, (x, y), spec=spec)
    layer = activation_matching(a, b, (x, y), spec=spec, layerwise=True)
    big = activation_matching(a, b, DataLoader(TensorDataset(x, y), batch_size=600), spec=spec)
    for g in spec.groups:
        assert torch.equal(joint[g], layer[g]), g
        assert torch.equal(joint[g], big[g]), g
    # B really was not the identity-aligned model: matching changed something
    assert any(not torch.equal(joint[g], torch.arange(n)) for g, n in spec.groups.items())


def test_max_batches_uses_only_the_first_batches(mnist1d_splits):
    s = mnist1d_splits
    a = mc.models.create("mlp", input_shape=s.input_shape, width=32, seed=0)
    b = mc.models.create("mlp", input_shape=s.input_shape, width=32, seed=1)
    x, y = s.train.tensors[0][:512], s.train.tensors[1][:512]
    spec = mc.infer_spec(a, x[:4], warn=False)
    first = activation_matching(a, b, DataLoader(TensorDataset(x, y), batch_size=128),
                                spec=spec, max_batches=1)
    direct = activation_matching(a, b, (x[:128], y[:128]), spec=spec)
    assert all(torch.equal(first[g], direct[g]) for g in spec.groups)


def test_groups_without_sites_fall_back_to_weight_matching(mnist1d_splits):
    s = mnist1d_splits
    a, b, spec, planted = _planted_pair("mlp", s)
    no_site = "layers.1" if "layers.1" in spec.groups else list(spec.groups)[1]
    partial = PermutationSpec(
        groups=spec.groups,
        slots=spec.slots,
        sites={g: v for g, v in spec.sites.items() if g != no_site},
        heads=spec.heads,
    )
    x, y = s.train.tensors[0][:500], s.train.tensors[1][:500]
    perm = activation_matching(a, b, (x, y), spec=partial)
    assert perm.info["weight_groups"] == [no_site]
    assert all(torch.equal(perm[g], torch.argsort(planted[g])) for g in spec.groups)
    bare = PermutationSpec(groups=spec.groups, slots=spec.slots)
    with pytest.raises(SpecError, match="no sites"):
        activation_matching(a, b, (x, y), spec=bare)


@pytest.mark.parametrize("against", ["each", "a"])
def test_adversarial_alignment_recovers_planted(against, mnist1d_splits):
    s = mnist1d_splits
    a, b, spec, planted = _planted_pair("mlp", s)
    x, y = s.train.tensors[0][:256], s.train.tensors[1][:256]
    pgd = {"eps": 0.1, "step": 0.05, "steps": 2}
    perm = activation_matching(
        a, b, (x, y), spec=spec, adversarial=pgd, adversarial_against=against
    )
    assert all(torch.equal(perm[g], torch.argsort(planted[g])) for g in spec.groups)
    assert perm.info["adversarial"]["eps"] == 0.1
    with pytest.raises(ConfigError, match="adversarial"):
        activation_matching(a, b, (x, y), spec=spec, adversarial={"eps": -1, "step": 1, "steps": 1})


def test_mismatched_architectures_and_nan_are_refused(mnist1d_splits):
    s = mnist1d_splits
    x, y = s.train.tensors[0][:64], s.train.tensors[1][:64]
    a = mc.models.create("mlp", input_shape=s.input_shape, width=16, seed=0)
    wide = mc.models.create("mlp", input_shape=s.input_shape, width=17, seed=0)
    deep = mc.models.create("mlp", input_shape=s.input_shape, width=16, depth=4, seed=0)
    with pytest.raises(IncompatibleModelsError, match="layers.0.weight"):
        activation_matching(a, wide, (x, y))
    with pytest.raises(IncompatibleModelsError, match="layers.3"):
        activation_matching(a, deep, (x, y))
    bad = mc.models.create("mlp", input_shape=s.input_shape, width=16, seed=1)
    with torch.no_grad():
        bad.layers[1].bias[0] = float("nan")
    with pytest.raises(IncompatibleModelsError, match="NaN"):
        activation_matching(a, bad, (x, y))


def test_align_activation_needs_data():
    a = mc.models.create("mlp", input_shape=(40,), width=8, seed=0)
    with pytest.raises(ConfigError, match="needs data"):
        mc.align(a, a, method="activation", example_inputs=torch.randn(2, 40))


# --- trained pairs: alignment removes most of the linear-path barrier -----------------------------
def _loss_barrier(a, state_b, splits) -> float:
    # 11 points, test split; BatchNorm statistics recomputed on the train split at every point
    ev = mc.evaluate_path(a, mc.LinearPath(a.state_dict(), state_b), splits, ts=11, progress=False)
    return ev.barrier("loss")


# measured (11 points, test loss): naive / weight / activation
#   mlp on MNIST-1D (seeds 0, 1; 10 epochs):              1.40 / 0.10-0.14 / 0.10
#   resnet on digits (seeds 0, 1; 10 epochs; BN reset):   1.59-1.62 / 0.29-0.37 / 0.08
CASES = {
    "mlp": ("mnist1d", 1.0, 0.35, 0.30),
    "resnet": ("digits", 1.0, 0.60, 0.25),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_alignment_lowers_the_linear_path_loss_barrier(
    name, trained, mnist1d_splits, digits_splits
):
    data_name, naive_min, weight_max, act_max = CASES[name]
    splits = mnist1d_splits if data_name == "mnist1d" else digits_splits
    a, b = trained(name, data_name, seed=0), trained(name, data_name, seed=1)
    spec = mc.infer_spec(a, splits.train.tensors[0][:4], warn=False)
    sb = b.state_dict()
    naive = _loss_barrier(a, sb, splits)
    pw = mc.weight_matching(spec, a.state_dict(), sb)
    pa = activation_matching(a, b, splits.train, spec=spec)
    weight = _loss_barrier(a, mc.apply_permutation(spec, pw, sb), splits)
    act = _loss_barrier(a, mc.apply_permutation(spec, pa, sb), splits)
    assert naive > naive_min, naive
    assert weight < min(weight_max, 0.4 * naive), (naive, weight)
    assert act < min(act_max, 0.3 * naive), (naive, act)


def test_multihead_attention_groups_are_weight_matched_around_activation_matched_streams():
    """nn.MultiheadAttention hides q/k/v inside one module: its heads group has no site and is
    aligned by the (heads-structured) weight fallback; the stream and MLP groups by activations."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    a = torch.nn.Sequential(
        torch.nn.Linear(6, 16),
        torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 5, 3),
    )
    x, y = torch.randn(128, 5, 6), torch.randint(0, 3, (128,))
    spec = mc.infer_spec(a, x[:4])
    attn = sorted(spec.heads)
    assert len(attn) == 2 and not any(spec.sites.get(g) for g in attn)
    planted = mc.random_permutation(spec, seed=3)
    b = with_state(a, mc.apply_permutation(spec, planted, a.state_dict()))
    perm = activation_matching(a, b, (x, y), spec=spec)
    assert sorted(perm.info["weight_groups"]) == attn
    assert set(perm.info["mean_corr_after"]) == set(spec.groups) - set(attn)
    for g in spec.groups:
        assert torch.equal(perm[g], torch.argsort(planted[g])), g
    mc.check_permutation(spec, perm)


def test_non_finite_activations_are_a_clear_error():
    a = mc.models.create("mlp", input_shape=(40,), width=8, seed=0)
    b = mc.models.create("mlp", input_shape=(40,), width=8, seed=1)
    x, y = torch.randn(32, 40), torch.zeros(32, dtype=torch.long)
    x[3, 5] = float("inf")
    with pytest.raises(mc.DataError, match="not finite"):
        activation_matching(a, b, (x, y), spec=mc.infer_spec(a, x[:2].nan_to_num()))
