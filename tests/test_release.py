"""Release safety (issue 13): no file runs code, no input overwritten, one line for bad input,
one named rule for non-finite values. Each test here failed on the code before the fix."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import modeconn as mc

SRC = Path(__file__).resolve().parents[1] / "src"


def _one_line(err: str, prefix: str = "error: ") -> str:
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    assert "Traceback" not in err
    return lines[0]


def _mlp(seed: int, width: int = 16) -> torch.nn.Module:
    return mc.models.create("mlp", input_shape=(1, 8, 8), num_classes=10, width=width, seed=seed)


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    """Two untrained digits MLPs saved as modeconn checkpoints (recording data: digits)."""
    d = tmp_path_factory.mktemp("release")
    for name, seed in (("a", 0), ("b", 1)):
        mc.save_checkpoint(d / f"{name}.safetensors", _mlp(seed), meta={"data": "digits"})
    return d


def _bytes(p: Path) -> bytes:
    return p.read_bytes()


# --- no file runs code ----------------------------------------------------------------------


def _recipe(tmp_path: Path, ck: Path, **extra: str) -> Path:
    lines = [f"models: [{ck / 'a.safetensors'}, {ck / 'b.safetensors'}]", "data: digits",
             f"out: {tmp_path / 'm.safetensors'}"]  # fmt: skip
    lines += [f"{k}: {v}" for k, v in extra.items()]
    r = tmp_path / "recipe.yaml"
    r.write_text("\n".join(lines) + "\n")
    return r


def test_recipe_naming_code_is_refused_and_the_marker_never_appears(run_cli, tmp_path, ck):
    marker = tmp_path / "MARKER"
    r = _recipe(tmp_path, ck, model="os:system", model_kwargs=f'{{command: "touch {marker}"}}')
    code, out, err = run_cli("merge", "--config", r, "--no-progress")
    assert code == 2 and not marker.exists()
    line = _one_line(err)
    assert "os:system" in line and "--allow-code os:system" in line
    with pytest.raises(mc.ConfigError, match="allow_code"):
        mc.MergeRecipe.from_yaml(r)
    assert not marker.exists() and not (tmp_path / "m.safetensors").exists()


def test_recipe_data_naming_code_is_refused(run_cli, tmp_path, ck):
    r = _recipe(tmp_path, ck)
    r.write_text(r.read_text().replace("data: digits", "data: os:getcwd"))
    code, _, err = run_cli("merge", "--config", r, "--no-progress")
    assert code == 2 and "data: os:getcwd" in _one_line(err)


def test_allow_code_is_the_explicit_consent(run_cli, tmp_path, ck):
    # the user names the factory: it is imported and called (here it returns no module)
    marker = tmp_path / "MARKER"
    r = _recipe(tmp_path, ck, model="os:system", model_kwargs=f'{{command: "touch {marker}"}}')
    code, _, err = run_cli("merge", "--config", r, "--allow-code", "os:system", "--no-progress")
    assert marker.exists() and code == 2 and "not nn.Module" in _one_line(err)


def test_zoo_names_in_a_recipe_need_no_consent(tmp_path, ck):
    r = _recipe(tmp_path, ck, model="mlp")
    assert mc.MergeRecipe.from_yaml(r).model == "mlp"


# --- no input is ever overwritten -----------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["align", "{a}", "{b}", "--out", "{a}"],
        ["align", "{a}", "{b}", "--out", "{b}"],
        ["align", "{a}", "{b}", "--out", "{link}"],  # a symlink to A: the same file
        ["merge", "{a}", "{b}", "--out", "{a}"],
        ["interpolate", "{a}", "{b}", "--json", "{a}"],
        ["spec", "{a}", "--json", "{a}"],
    ],
)
def test_output_that_is_an_input_is_refused_and_the_input_unchanged(run_cli, tmp_path, ck, args):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(_bytes(ck / "a.safetensors"))
    b.write_bytes(_bytes(ck / "b.safetensors"))
    (tmp_path / "link.safetensors").symlink_to(a)
    before = {p: _bytes(p) for p in (a, b)}
    names = {"a": a, "b": b, "link": tmp_path / "link.safetensors"}
    argv = [x.format(**names) for x in args]
    code, out, err = run_cli(*argv, *(["--no-progress"] if args[0] != "spec" else []))
    assert code == 2, err
    assert "is also an input" in _one_line(err) and out == ""
    assert {p: _bytes(p) for p in (a, b)} == before


def test_recipe_out_that_is_an_input_is_refused(run_cli, tmp_path, ck):
    r = _recipe(tmp_path, ck)
    r.write_text(r.read_text().replace(str(tmp_path / "m.safetensors"), str(ck / "a.safetensors")))
    before = _bytes(ck / "a.safetensors")
    code, _, err = run_cli("merge", "--config", r, "--no-progress")
    assert code == 2 and "is also an input" in _one_line(err)
    assert _bytes(ck / "a.safetensors") == before
    with pytest.raises(mc.ConfigError, match="is also an input"):
        mc.run_recipe(mc.MergeRecipe.from_yaml(r))


def test_train_out_and_json_the_same_file_is_refused(run_cli, tmp_path, monkeypatch):
    monkeypatch.setattr(mc, "train", lambda *a, **k: pytest.fail("trained before refusing"))
    o = tmp_path / "o.safetensors"
    code, _, err = run_cli("train", "--data", "digits", "--out", o, "--json", o, "--no-progress")
    assert code == 2 and "same file" in _one_line(err) and not o.exists()
    code, _, err = run_cli("train", "--data", "digits", "--out", tmp_path / "p.safetensors",
                           "--json", o, "--no-progress")  # fmt: skip
    assert code == 2 and "give a .json file" in _one_line(err) and not o.exists()


def test_missing_output_folder_needs_mkdir(run_cli, tmp_path):
    js = tmp_path / "new" / "deeper" / "spec.json"
    code, _, err = run_cli("spec", "mlp", "--zoo", "--input-shape", "40", "--json", js)
    assert code == 2 and "--mkdir" in _one_line(err) and not (tmp_path / "new").exists()
    code, _, err = run_cli("spec", "mlp", "--zoo", "--input-shape", "40", "--json", js, "--mkdir")
    assert code == 0, err
    assert json.loads(js.read_text())["groups"]


# --- one validation layer: each former traceback is one line, exit 2 -------------------------


def test_nan_weights_are_refused_at_load(run_cli, tmp_path, ck):
    net = _mlp(0)
    with torch.no_grad():
        next(iter(net.parameters()))[0, 0] = float("nan")
    bad = mc.save_checkpoint(tmp_path / "nan.safetensors", net, meta={"data": "digits"})
    a = ck / "a.safetensors"
    for args in (["spec", bad], ["interpolate", bad, a, "--no-progress"],
                 ["align", a, bad, "--out", tmp_path / "x.safetensors"],
                 ["merge", a, bad, "--out", tmp_path / "m.safetensors"]):  # fmt: skip
        code, out, err = run_cli(*args)
        assert code == 2, (args, err)
        assert "non-finite weights" in _one_line(err)
    with pytest.raises(mc.CheckpointError, match="non-finite"):
        mc.load_checkpoint(bad)
    assert mc.load_checkpoint(bad, finite=False).state  # inspecting a diverged run stays possible


def test_nan_data_is_refused_at_load(run_cli, tmp_path, monkeypatch):
    monkeypatch.setattr(mc, "train", lambda *a, **k: pytest.fail("trained on NaN data"))
    x = np.zeros((20, 1, 8, 8), dtype=np.float32)
    x[3, 0, 0, 0] = np.nan
    npz = tmp_path / "nan.npz"
    np.savez(npz, x_train=x, y_train=np.arange(20) % 10, x_test=x[:5], y_test=np.arange(5))
    code, _, err = run_cli("train", "--data", npz, "--out", tmp_path / "o.safetensors")
    assert code == 2 and "NaN or inf" in _one_line(err)


def test_data_that_does_not_fit_a_users_model_is_one_line(run_cli, tmp_path, ck, monkeypatch):
    monkeypatch.setattr(mc, "train", lambda *a, **k: pytest.fail("trained before refusing"))
    code, _, err = run_cli("train", "--model", "torch.nn:Linear", "--model-arg", "in_features=40",
                           "--model-arg", "out_features=10", "--data", "digits",
                           "--out", tmp_path / "o.safetensors", "--no-progress")  # fmt: skip
    assert code == 2 and "does not fit the model" in _one_line(err)
    m = tmp_path / "m.safetensors"
    code, _, err = run_cli("merge", ck / "a.safetensors", ck / "b.safetensors", "--data",
                           "mnist1d", "--out", m, "--no-progress")  # fmt: skip
    assert code == 2 and "does not fit the model" in _one_line(err)
    assert not (tmp_path / "m.safetensors").exists()


def test_unsupported_plot_extension_is_refused_before_work(run_cli, tmp_path, ck):
    a = ck / "a.safetensors"
    code, out, err = run_cli("interpolate", a, a, "--plot", tmp_path / "p.xyz", "--no-progress")
    assert code == 2 and "--plot" in _one_line(err) and ".png" in err and out == ""


def test_binary_config_and_spec_are_one_line(run_cli, tmp_path, ck):
    blob = tmp_path / "blob.yaml"
    blob.write_bytes(bytes(range(256)) * 4)
    code, _, err = run_cli("merge", "--config", blob, "--no-progress")
    assert code == 2 and "not a text file" in _one_line(err)
    code, _, err = run_cli("align", ck / "a.safetensors", ck / "b.safetensors", "--spec", blob,
                           "--out", tmp_path / "x.safetensors", "--no-progress")  # fmt: skip
    assert code == 2 and "not a text file" in _one_line(err)


def test_absurd_size_in_metadata_is_refused_before_allocating(run_cli, tmp_path, ck):
    src = mc.load_checkpoint(ck / "a.safetensors")
    meta = json.loads(json.dumps(src.meta))
    meta["model"]["kwargs"]["width"] = 1_000_000_000  # 64e9 floats: would need 256 GB
    huge = mc.save_checkpoint(tmp_path / "huge.safetensors", src.state, meta=meta)
    t0 = time.perf_counter()
    code, _, err = run_cli("spec", huge)
    assert code == 2 and "does not fit model" in _one_line(err) and "1000000000" in err
    assert time.perf_counter() - t0 < 30


def test_absurd_model_options_are_refused_before_allocating(run_cli, tmp_path, monkeypatch):
    monkeypatch.setattr(mc, "train", lambda *a, **k: pytest.fail("built and trained"))
    for args in (["spec", "mlp", "--zoo", "--input-shape", "40"],
                 ["train", "--data", "digits", "--out", tmp_path / "o.safetensors"]):  # fmt: skip
        code, _, err = run_cli(*args, "--model-arg", "width=1000000000")
        assert code == 2 and "more than this machine's" in _one_line(err), args


def test_spec_file_group_without_slots_is_refused(run_cli, tmp_path, ck):
    spec = {"groups": {"h": 16, "ghost": 4}, "slots": {"h": [{"param": "layers.0.weight",
                                                               "axis": 0}]}}  # fmt: skip
    f = tmp_path / "spec.json"
    f.write_text(json.dumps(spec))
    code, _, err = run_cli("align", ck / "a.safetensors", ck / "b.safetensors", "--spec", f,
                           "--out", tmp_path / "x.safetensors", "--no-progress")  # fmt: skip
    assert code == 2 and "'ghost' has no slots" in _one_line(err)
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    code = ("import sys, _modeconn_cli; sys.argv = ['modeconn', '--help']\n"
            "print('go', flush=True); _modeconn_cli.main()")

    def default_sigint() -> None:  # a shell's background job would start with SIGINT ignored
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, preexec_fn=default_sigint)
    assert p.stdout is not None and p.stdout.readline() == "go\n"  # Python runs: now importing
    time.sleep(0.2)  # importing torch and modeconn takes longer than this
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert "Traceback" not in err
    if p.returncode == 0:  # an imported library swallowed the interrupt (seen with torch 2.2)
        return
    assert p.returncode == 130, err
    _one_line(err, prefix="interrupted")


# --- the non-finite rule: inputs refused (exit 2), results reported as NaN (exit 1) -----------


def test_path_whose_loss_overflows_is_reported_and_exits_1(run_cli, tmp_path, ck):
    net = _mlp(0)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(3e37)  # finite weights whose products overflow float32
    big = mc.save_checkpoint(tmp_path / "big.safetensors", net, meta={"data": "digits"})
    js = tmp_path / "i.json"
    code, out, err = run_cli("interpolate", ck / "a.safetensors", big, "--points", "3",
                             "--json", js, "--no-progress")  # fmt: skip
    assert code == 1
    assert "NaN or inf" in _one_line(err) and "t =" in err
    assert "linear path" in out  # the table was printed
    loss = json.loads(js.read_text())["evaluation"]["splits"]["train"]["values"]["loss"]
    assert loss[-1] is None and loss[0] is not None  # NaN is null in JSON


def test_align_and_merge_with_overflowing_results_exit_1(run_cli, tmp_path, ck):
    net = _mlp(1)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(3e37)
    big = mc.save_checkpoint(tmp_path / "big.safetensors", net, meta={"data": "digits"})
    out = tmp_path / "x.safetensors"
    code, _, err = run_cli("align", ck / "a.safetensors", big, "--out", out, "--points", "3",
                           "--no-progress")  # fmt: skip
    assert code == 1 and "NaN or inf" in _one_line(err) and out.is_file()
    m = tmp_path / "m.safetensors"
    code, _, err = run_cli("merge", ck / "a.safetensors", big, "--out", m, "--no-progress")
    assert code == 1 and "NaN or inf" in _one_line(err) and m.is_file()


def test_training_that_diverges_exits_1(run_cli, tmp_path):
    code, _, err = run_cli("train", "--data", "digits", "--epochs", "1", "--lr", "1e30",
                           "--model-arg", "width=16", "--out", tmp_path / "o.safetensors",
                           "--no-progress")  # fmt: skip
    assert code == 1 and "diverged" in _one_line(err)
    assert not (tmp_path / "o.safetensors").exists()


def test_version(run_cli):
    code, out, _ = run_cli("--version")
    assert code == 0 and out.strip() == f"modeconn {mc.__version__}"
