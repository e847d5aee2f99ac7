"""Tests of ``modeconn align``: aligned checkpoint, barrier table/JSON, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

import modeconn as mc


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, trained):
    d = tmp_path_factory.mktemp("align-cli")
    paths = []
    for seed in (0, 1):
        p = d / f"mlp{seed}.safetensors"
        mc.save_checkpoint(p, trained("mlp", seed=seed), meta={"data": "mnist1d", "seed": seed})
        paths.append(p)
    small = d / "narrow.safetensors"
    net = mc.models.create("mlp", input_shape=(40,), width=64, seed=0)
    mc.save_checkpoint(small, net, meta={"data": "mnist1d"})
    return d, paths[0], paths[1], small


@pytest.mark.slow
def test_align_weight_writes_aligned_checkpoint_and_barrier_json(
    checkpoints, run_cli, mnist1d_splits
):
    d, a, b, _ = checkpoints
    out, js = d / "b_aligned.safetensors", d / "align.json"
    code, printed, err = run_cli(
        "align", a, b, "--method", "weight", "--out", out, "--json", js,
        "--points", "5", "--no-progress",
    )
    assert code == 0, err
    assert "naive" in printed and "aligned" in printed
    ck = mc.load_checkpoint(out)
    assert ck.meta["data"] == "mnist1d" and ck.meta["seed"] == 1  # B's metadata preserved
    assert ck.meta["alignment"]["method"] == "weight"
    net_b, net_al = mc.load_model(b), ck.build()
    x = mnist1d_splits.test.tensors[0][:64]
    assert torch.allclose(net_b(x), net_al(x), atol=1e-5)  # same function, permuted units
    w = "layers.0.weight"
    assert not torch.equal(net_b.state_dict()[w], net_al.state_dict()[w])
    res = json.loads(js.read_text())
    assert res["after"]["loss_barrier"] < 0.5 * res["before"]["loss_barrier"]
    assert len(res["before"]["ts"]) == 5


def test_unknown_method_is_one_line_and_writes_nothing(checkpoints, run_cli):
    d, a, b, _ = checkpoints
    out = d / "never.safetensors"
    code, _, err = run_cli("align", a, b, "--method", "magic", "--out", out, "--no-barrier")
    assert code == 2
    assert "unknown alignment method 'magic'" in err and "weight" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_mismatched_architectures_name_the_tensor(checkpoints, run_cli):
    d, a, _, narrow = checkpoints
    out = d / "never2.safetensors"
    code, _, err = run_cli("align", a, narrow, "--out", out, "--no-barrier")
    assert code == 2
    assert "layers.0.weight" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.slow
def test_align_activation_uses_recorded_data(checkpoints, run_cli):
    d, a, b, _ = checkpoints
    out, js = d / "b_act.safetensors", d / "act.json"
    code, _, err = run_cli(
        "align", a, b, "--method", "activation", "--out", out, "--json", js,
        "--points", "3", "--no-progress",
    )
    assert code == 0, err
    res = json.loads(js.read_text())
    assert res["alignment"]["method"] == "activation"
    assert res["after"]["loss_barrier"] < 0.5 * res["before"]["loss_barrier"]
    assert mc.load_checkpoint(out).meta["alignment"]["info"]["mean_corr_after"]


def test_align_with_a_spec_file(tmp_path, run_cli):
    """--spec: a hand-written (or saved) spec instead of inference, e.g. for untraceable models;
    a spec of another architecture is one clear line."""
    nets = [mc.models.create("mlp", input_shape=(40,), width=16, seed=s) for s in (0, 1)]
    paths = [tmp_path / f"m{s}.safetensors" for s in (0, 1)]
    for p, n in zip(paths, nets, strict=True):
        mc.save_checkpoint(p, n, meta={"data": "mnist1d"})
    spec = mc.infer_spec(nets[0], torch.randn(2, 40))
    (tmp_path / "spec.json").write_text(spec.to_json())
    out = tmp_path / "aligned.safetensors"
    code, _, err = run_cli(
        "align", *paths, "--spec", tmp_path / "spec.json", "--out", out,
        "--no-barrier", "--no-progress",
    )
    assert code == 0, err
    expected = mc.apply_permutation(
        spec, mc.weight_matching(spec, nets[0].state_dict(), nets[1].state_dict()),
        nets[1].state_dict(),
    )
    got = mc.load_checkpoint(out).state
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    wrong = mc.PermutationSpec.from_axes({"h": 16}, {"nope.weight": ("h", None)})
    (tmp_path / "wrong.json").write_text(wrong.to_json())
    code, _, err = run_cli(
        "align", *paths, "--spec", tmp_path / "wrong.json", "--out",
        tmp_path / "never.safetensors", "--no-barrier",
    )
    assert code == 2 and "nope.weight" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_align_ot_through_the_registry(checkpoints, run_cli):
    pytest.importorskip("ot")
    d, a, b, _ = checkpoints
    method = "ot"
    out, js = d / f"b_{method}.safetensors", d / f"{method}.json"
    code, _, err = run_cli("align", a, b, "--method", method, "--out", out, "--json", js,
                           "--points", "5", "--no-progress")
    assert code == 0, err
    res = json.loads(js.read_text())
    assert res["alignment"]["method"] == method and "transport" not in res["alignment"]
    assert res["after"]["loss_barrier"] < 0.8 * res["before"]["loss_barrier"]
    assert mc.load_checkpoint(out).meta["alignment"]["method"] == method


def test_restarts_only_for_aligners_that_take_them(checkpoints, run_cli):
    d, a, b, _ = checkpoints
    code, _, err = run_cli("align", a, b, "--method", "ot", "--restarts", "3", "--no-barrier",
                           "--out", d / "x.safetensors")
    assert code == 2 and "--restarts applies to weight matching" in err
