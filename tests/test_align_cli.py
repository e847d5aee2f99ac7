"""Tests of ``modeconn align``: aligned checkpoint, barrier table/JSON, one-line errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import modeconn as mc
from modeconn.cli.main import main


def run_cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["modeconn", *map(str, args)])
    try:
        main()
    except SystemExit as e:
        return int(e.code or 0)
    return 0


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
    checkpoints, monkeypatch, capsys, mnist1d_splits
):
    d, a, b, _ = checkpoints
    out, js = d / "b_aligned.safetensors", d / "align.json"
    code = run_cli(
        monkeypatch, "align", a, b, "--method", "weight", "--out", out, "--json", js,
        "--points", "5", "--no-progress",
    )
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
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


def test_unknown_method_is_one_line_and_writes_nothing(checkpoints, monkeypatch, capsys):
    d, a, b, _ = checkpoints
    out = d / "never.safetensors"
    code = run_cli(monkeypatch, "align", a, b, "--method", "magic", "--out", out, "--no-barrier")
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown alignment method 'magic'" in err and "weight" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_mismatched_architectures_name_the_tensor(checkpoints, monkeypatch, capsys):
    d, a, _, narrow = checkpoints
    out = d / "never2.safetensors"
    code = run_cli(monkeypatch, "align", a, narrow, "--out", out, "--no-barrier")
    err = capsys.readouterr().err
    assert code == 2
    assert "layers.0.weight" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.slow
def test_align_activation_uses_recorded_data(checkpoints, monkeypatch, capsys):
    d, a, b, _ = checkpoints
    out, js = d / "b_act.safetensors", d / "act.json"
    code = run_cli(
        monkeypatch, "align", a, b, "--method", "activation", "--out", out, "--json", js,
        "--points", "3", "--no-progress",
    )
    assert code == 0, capsys.readouterr().err
    res = json.loads(js.read_text())
    assert res["alignment"]["method"] == "activation"
    assert res["after"]["loss_barrier"] < 0.5 * res["before"]["loss_barrier"]
    assert mc.load_checkpoint(out).meta["alignment"]["info"]["mean_corr_after"]
