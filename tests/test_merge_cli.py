"""Tests of `modeconn merge`: options and YAML recipes, the table, JSON, and one-line errors."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import modeconn as mc


@pytest.fixture
def _run(run_cli):
    """``_run(args) -> (code, out, err)`` of ``modeconn merge *args``."""
    return lambda args: run_cli("merge", *args)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """An .npz data set, a pretrained MLP and two fine-tunes of it, as modeconn checkpoints."""
    root = tmp_path_factory.mktemp("merge_cli")
    g = np.random.default_rng(0)
    W = g.normal(size=(6, 3))
    x = g.normal(size=(500, 6)).astype(np.float32)
    y = (x @ W).argmax(1).astype(np.int64)
    npz = root / "toy.npz"
    np.savez(npz, x_train=x[:400], y_train=y[:400], x_test=x[400:], y_test=y[400:])
    splits = mc.data.load(str(npz))
    net = mc.models.create("mlp", input_shape=(6,), num_classes=3, width=16, depth=1, seed=0)
    x_t, y_t = splits.tensors("train")
    pre = mc.train(net, (x_t[:100], y_t[:100]), epochs=2, lr=0.05, progress=False).model
    paths = {"pre": root / "pre.safetensors"}
    mc.save_checkpoint(paths["pre"], pre, meta={"data": str(npz)})
    for i in range(2):
        part = slice(100 + 150 * i, 250 + 150 * i)
        ft = mc.train(pre, (x_t[part], y_t[part]), epochs=3, lr=0.05, seed=i, progress=False).model
        paths[f"ft{i}"] = root / f"ft{i}.safetensors"
        mc.save_checkpoint(paths[f"ft{i}"], ft, meta={"data": str(npz)})
    other = mc.models.create("mlp", input_shape=(6,), num_classes=3, width=8, depth=1, seed=0)
    paths["narrow"] = root / "narrow.safetensors"
    mc.save_checkpoint(paths["narrow"], other, meta={"data": str(npz)})
    paths["npz"] = npz
    return paths


def test_merge_average_writes_checkpoint_table_and_json(ckpts, tmp_path, _run):
    out, js = tmp_path / "m.safetensors", tmp_path / "m.json"
    code, stdout, err = _run(
        [str(ckpts["ft0"]), str(ckpts["ft1"]), "--out", str(out), "--json", str(js),
         "--no-progress"])
    assert code == 0, err
    assert "merged" in stdout and "accuracy" in stdout
    ck = mc.load_checkpoint(out)
    a, b = mc.load_checkpoint(ckpts["ft0"]).state, mc.load_checkpoint(ckpts["ft1"]).state
    assert all(torch.allclose(ck.state[k], (a[k] + b[k]) / 2, atol=1e-6) for k in a)
    assert ck.build() is not None  # the merged checkpoint records its model
    res = json.loads(js.read_text())
    assert [r["model"] for r in res["evaluation"]][-1] == "merged"
    assert len(res["evaluation"]) == 3 and res["info"]["method"] == "average"
    net = ck.build()
    acc = mc.evaluate(net, mc.data.load(str(ckpts["npz"])).test).accuracy
    assert res["evaluation"][-1]["accuracy"] == pytest.approx(acc)


def test_merge_ties_with_base_and_params(ckpts, tmp_path, _run):
    out = tmp_path / "t.safetensors"
    code, stdout, err = _run(
        [str(ckpts["ft0"]), str(ckpts["ft1"]), "--method", "ties", "--base", str(ckpts["pre"]),
         "--param", "density=0.5", "--param", "scale=1.0", "--weights", "1,2", "--out", str(out),
         "--no-progress"])
    assert code == 0, err
    states = [mc.load_checkpoint(ckpts[k]).state for k in ("ft0", "ft1")]
    want = mc.merge(states, method="ties", base=mc.load_checkpoint(ckpts["pre"]).state,
                    density=0.5, weights=[1, 2])
    got = mc.load_checkpoint(out).state
    assert all(torch.allclose(got[k], want[k]) for k in want)
    assert "(base)" in stdout


def test_merge_from_a_yaml_recipe(ckpts, tmp_path, _run):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"models:\n  - path: {ckpts['ft0']}\n  - path: {ckpts['ft1']}\n"
        f"method: regmean\nparameters: {{alpha: 0.5}}\ndata: {ckpts['npz']}\n"
        "out: merged/r.safetensors\n"
    )
    code, _, err = _run(["--config", str(recipe), "--no-progress"])
    assert code == 2 and "--mkdir" in err  # a missing folder is created only when asked
    code, stdout, err = _run(["--config", str(recipe), "--mkdir", "--no-progress"])
    assert code == 0, err
    assert (tmp_path / "merged" / "r.safetensors").is_file()  # relative to the recipe
    assert "regmean" in stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "nope"], "unknown merge method 'nope'; choose one of: average, soup"),
        (["--method", "ties"], "needs base"),
        (["--param", "density"], "must look like KEY=VALUE"),
        (["--method", "ties", "--base", "{pre}", "--param", "density=2"], "density"),
        (["--weights", "1,x"], "comma-separated numbers"),
        (["--weights", "1,2,3"], "3 numbers for 2 checkpoints"),
        (["--method", "slerp", "--param", "t=0.5", "{narrow}"], "exactly 2 models, got 3"),
        (["--param", "x=["], "--param 'x=[': cannot read the value"),  # was a traceback
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(ckpts, tmp_path, _run, args,
                                                  message):
    out = tmp_path / "never.safetensors"
    args = [a.format(pre=ckpts["pre"], narrow=ckpts["narrow"]) for a in args]
    code, _, err = _run([str(ckpts["ft0"]), str(ckpts["ft1"]), *args, "--out", str(out),
                         "--no-progress"])
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_incompatible_checkpoints_refused_naming_the_tensor(ckpts, tmp_path, _run):
    out = tmp_path / "never.safetensors"
    code, _, err = _run([str(ckpts["ft0"]), str(ckpts["narrow"]), "--out", str(out),
                         "--no-progress"])
    assert code == 2 and re.search(r"tensor '[\w.]+weight' has shape \(.*\) in model 0", err)
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.iterdir())  # no temporary left behind


def test_config_and_positional_models_clash(ckpts, tmp_path, _run):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models: [{ckpts['ft0']}, {ckpts['ft1']}]\nout: x.safetensors\n")
    code, _, err = _run([str(ckpts["ft0"]), "--config", str(recipe)])
    assert code == 2 and "drop checkpoints" in err
    recipe.write_text("models: [a.pt]\nmethod: average\nunknown_key: 1\n")
    code, _, err = _run(["--config", str(recipe)])
    assert code == 2 and "unknown_key: unknown parameter" in err


def test_a_single_checkpoint_is_refused(ckpts, tmp_path, _run):
    out = tmp_path / "never.safetensors"
    code, _, err = _run([str(ckpts["ft0"]), "--out", str(out), "--no-progress"])
    assert code == 2 and "at least two checkpoints" in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()
