"""The `modeconn` CLI foundation: train, demo, shared options and bad-input behaviour."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import modeconn as mc
from modeconn.cli.common import parse_model_args
from modeconn.cli.main import main


def run_cli(monkeypatch, capsys, *args):
    """Run the console entry point in-process; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["modeconn", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_clean_line(err):
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err


def test_help_lists_commands(monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "--help")
    assert code == 0 and "train" in out and "demo" in out


TRAIN = ["train", "--data", "digits", "--epochs", "2", "--model-arg", "width=32", "--no-progress"]


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


def test_train_writes_checkpoint_with_metadata(monkeypatch, capsys, ckpt_dir):
    a, b = ckpt_dir / "a.safetensors", ckpt_dir / "b.safetensors"
    code, out, err = run_cli(monkeypatch, capsys, *TRAIN, "--seed", "3", "--out", a,
                             "--json", ckpt_dir / "a.json")  # fmt: skip
    assert code == 0, err
    assert "test" in out and "saved" in out
    ck = mc.load_checkpoint(a)
    assert ck.meta["model"]["name"] == "mlp"
    assert ck.meta["model"]["kwargs"]["width"] == 32
    assert ck.meta["model"]["kwargs"]["input_shape"] == [1, 8, 8]
    assert ck.meta["data"] == "digits" and ck.meta["seed"] == 3
    assert ck.meta["train"]["epochs"] == 2
    report = json.loads((ckpt_dir / "a.json").read_text())
    assert report["metrics"]["test_accuracy"] == ck.meta["metrics"]["test_accuracy"]
    # the recorded metrics are those of the saved weights
    net = ck.build()
    acc = mc.evaluate(net, mc.data.load("digits").test).accuracy
    assert acc == pytest.approx(ck.meta["metrics"]["test_accuracy"])
    # same seed -> bit-identical checkpoint tensors
    assert run_cli(monkeypatch, capsys, *TRAIN, "--seed", "3", "--out", b)[0] == 0
    sb = mc.load_checkpoint(b).state
    assert all(torch.equal(v, sb[k]) for k, v in ck.state.items())


def _bad_npz(tmp_path):
    p = tmp_path / "bad.npz"
    np.savez(p, x_train=np.zeros((4, 2)), y_train=np.zeros(4, dtype=int), x_test=np.zeros((2, 2)))
    return p


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--model", "vgg99"], "unknown model 'vgg99'"),
        (["--data", "cifar5"], "unknown data source 'cifar5'"),
        (["--data", "{tmp}/missing.npz"], "does not exist"),
        (["--data", "{bad_npz}"], "has no array 'y_test'"),
        (["--model-arg", "widht=3"], "no option 'widht'"),
        (["--model-arg", "width"], "KEY=VALUE"),
        (["--optimizer", "rmsprop"], "unknown optimizer"),
    ],
)
def test_train_bad_input_one_line_exit_2_no_file(monkeypatch, capsys, tmp_path, args, match):
    bad = _bad_npz(tmp_path)
    args = [a.format(tmp=tmp_path, bad_npz=bad) for a in args]
    out_file = tmp_path / "out.safetensors"
    code, _, err = run_cli(monkeypatch, capsys, "train", "--data", "digits", "--epochs", "1",
                           "--no-progress", "--out", out_file, *args)  # fmt: skip
    assert code == 2
    _one_clean_line(err)
    assert match in err
    assert not out_file.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz"]  # no temp files either


def test_commands_refuse_malicious_pickle(monkeypatch, capsys, tmp_path, ckpt_dir):
    # `align` loads checkpoints through cli.common.load_model_arg like every command
    import pickle

    target = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(target), "w"))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"w": Evil()}, protocol=2))
    out_file = tmp_path / "o.safetensors"
    code, _, err = run_cli(monkeypatch, capsys, "align", evil, ckpt_dir / "a.safetensors",
                           "--data", "digits", "--out", out_file)  # fmt: skip
    assert code == 2
    _one_clean_line(err)
    assert "evil.pt" in err and "safetensors" in err
    assert not target.exists() and not out_file.exists()


def test_commands_refuse_mismatched_model(monkeypatch, capsys, tmp_path, ckpt_dir):
    a = ckpt_dir / "a.safetensors"
    out_file = tmp_path / "o.safetensors"
    code, _, err = run_cli(monkeypatch, capsys, "align", a, a, "--model", "mlp", "--model-arg",
                           "width=64", "--data", "digits", "--out", out_file)  # fmt: skip
    assert code == 2
    _one_clean_line(err)
    assert "does not fit model 'mlp'" in err and "layers.0" in err
    assert not out_file.exists()


def test_demo_fast_writes_report_and_reuses_cache(monkeypatch, capsys, tmp_path):
    out = tmp_path / "report"
    args = ["demo", "--fast", "--out", out, "--no-progress", "--json", tmp_path / "demo.json"]
    code, stdout, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    assert "linear path" in stdout and "barrier" in stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "endpoint_a.safetensors", "endpoint_b.safetensors", "path.png", "report.json",
    ]  # fmt: skip
    assert (out / "path.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    lin = report["paths"]["linear"]
    assert len(lin["ts"]) == 25 and lin["ts"][0] == 0 and lin["ts"][-1] == 1
    assert report["barriers"]["linear"]["loss_test"] >= 0
    assert [e["seed"] for e in report["endpoints"]] == [0, 1]
    # the two endpoints differ only in seed, and t=0/1 reproduce their own test accuracy
    a = mc.load_checkpoint(out / "endpoint_a.safetensors")
    b = mc.load_checkpoint(out / "endpoint_b.safetensors")
    assert a.meta["model"] == b.meta["model"] and (a.meta["seed"], b.meta["seed"]) == (0, 1)
    test_acc = lin["splits"]["test"]["values"]["accuracy"]
    assert test_acc[0] == pytest.approx(a.meta["metrics"]["test_accuracy"])
    assert test_acc[-1] == pytest.approx(b.meta["metrics"]["test_accuracy"])
    assert json.loads((tmp_path / "demo.json").read_text())["barriers"] == report["barriers"]
    # the grown pipeline: aligned lines and learned curves, all starting at A and ending at
    # (a permuted copy of) B, which computes B's function, so the ends keep their accuracies
    assert set(report["paths"]) == {"linear", "linear/act", "linear/weight", "bezier", "bezier/act"}
    for label, ev in report["paths"].items():
        acc = ev["splits"]["test"]["values"]["accuracy"]
        assert acc[0] == pytest.approx(a.meta["metrics"]["test_accuracy"]), label
        assert acc[-1] == pytest.approx(b.meta["metrics"]["test_accuracy"]), label
    naive = report["barriers"]["linear"]["loss_train"]
    for label in ("linear/act", "linear/weight", "bezier", "bezier/act"):
        assert report["barriers"][label]["loss_train"] < 0.6 * naive, label
    # a second run reuses the cached endpoints and reproduces the numbers
    code, stdout, _ = run_cli(monkeypatch, capsys, "demo", "--fast", "--out", out, "--no-progress")
    assert code == 0 and "reusing endpoint" in stdout
    again = json.loads((out / "report.json").read_text())
    assert again["barriers"] == report["barriers"]


def test_demo_refuses_file_as_out(monkeypatch, capsys, tmp_path):
    f = tmp_path / "report"
    f.write_text("x")
    code, _, err = run_cli(monkeypatch, capsys, "demo", "--fast", "--out", f)
    assert code == 2
    _one_clean_line(err)


def test_parse_model_args_yaml_values():
    assert parse_model_args(["width=8", "norm=bn", "input_shape=[1, 8, 8]", "x="]) == {
        "width": 8, "norm": "bn", "input_shape": [1, 8, 8], "x": None,
    }  # fmt: skip


def test_console_script_subprocess(tmp_path):
    # end to end through a real process: no traceback, one line on stderr, exit code 2
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "modeconn.cli.main", "train", "--model", "nope", "--out",
         str(tmp_path / "x.safetensors")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    _one_clean_line(proc.stderr)
    assert "unknown model 'nope'" in proc.stderr
    assert not (tmp_path / "x.safetensors").exists()
