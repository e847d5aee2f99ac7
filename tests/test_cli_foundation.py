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


def _one_clean_line(err):
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err


def test_help_lists_commands(run_cli):
    code, out, _ = run_cli("--help")
    assert code == 0 and "train" in out and "demo" in out


TRAIN = ["train", "--data", "digits", "--epochs", "2", "--model-arg", "width=32", "--no-progress"]


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


def test_train_writes_checkpoint_with_metadata(run_cli, ckpt_dir):
    a, b = ckpt_dir / "a.safetensors", ckpt_dir / "b.safetensors"
    code, out, err = run_cli(*TRAIN, "--seed", "3", "--out", a, "--json", ckpt_dir / "a.json")
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
    assert run_cli(*TRAIN, "--seed", "3", "--out", b)[0] == 0
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
def test_train_bad_input_one_line_exit_2_no_file(run_cli, tmp_path, args, match):
    bad = _bad_npz(tmp_path)
    args = [a.format(tmp=tmp_path, bad_npz=bad) for a in args]
    out_file = tmp_path / "out.safetensors"
    code, _, err = run_cli(
        "train", "--data", "digits", "--epochs", "1", "--no-progress", "--out", out_file, *args
    )
    assert code == 2
    _one_clean_line(err)
    assert match in err
    assert not out_file.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz"]  # no temp files either


def test_commands_refuse_malicious_pickle(run_cli, tmp_path, ckpt_dir):
    # `align` loads checkpoints through cli.common.load_model_arg like every command
    import pickle

    target = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(target), "w"))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"w": Evil()}, protocol=2))
    out_file = tmp_path / "o.safetensors"
    code, _, err = run_cli(
        "align", evil, ckpt_dir / "a.safetensors", "--data", "digits", "--out", out_file
    )
    assert code == 2
    _one_clean_line(err)
    assert "evil.pt" in err and "safetensors" in err
    assert not target.exists() and not out_file.exists()


def test_commands_refuse_mismatched_model(run_cli, tmp_path, ckpt_dir):
    a = ckpt_dir / "a.safetensors"
    out_file = tmp_path / "o.safetensors"
    code, _, err = run_cli(
        "align", a, a, "--model", "mlp", "--model-arg", "width=64", "--data", "digits",
        "--out", out_file,
    )  # fmt: skip
    assert code == 2
    _one_clean_line(err)
    assert "does not fit model 'mlp'" in err and "layers.0" in err
    assert not out_file.exists()


def test_demo_fast_writes_report_and_reuses_cache(run_cli, tmp_path):
    out = tmp_path / "report"
    args = ["demo", "--fast", "--out", out, "--no-progress", "--json", tmp_path / "demo.json"]
    code, stdout, err = run_cli(*args)
    assert code == 0, err
    assert "linear path" in stdout and "barrier" in stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "endpoint_a.safetensors", "endpoint_b.safetensors", "path.png", "plane_bezier.png",
        "plane_bezier_act.png", "report.html", "report.json",
    ]  # fmt: skip
    page = (out / "report.html").read_text()  # self-contained: every figure is inline SVG
    assert page.count("<svg") == 3 and "<img" not in page and "test loss barrier" in page
    for png in ("path.png", "plane_bezier.png", "plane_bezier_act.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
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
    # the planes contain the curves: A and B at (0, 0) and (|B - A|, 0), the bend off the line
    for label in ("bezier", "bezier/act"):
        pts = report["planes"][label]["points"]
        assert pts[0] == pytest.approx([0.0, 0.0], abs=1e-6) and pts[1][1] == pytest.approx(0.0)
        assert pts[2][1] > 0
    naive = report["barriers"]["linear"]["loss_train"]
    for label in ("linear/act", "linear/weight", "bezier", "bezier/act"):
        assert report["barriers"][label]["loss_train"] < 0.6 * naive, label
    # a second run reuses the cached endpoints and reproduces the numbers
    code, stdout, _ = run_cli("demo", "--fast", "--out", out, "--no-progress")
    assert code == 0 and "reusing endpoint" in stdout
    again = json.loads((out / "report.json").read_text())
    assert again["barriers"] == report["barriers"]


def test_demo_refuses_file_as_out(run_cli, tmp_path):
    f = tmp_path / "report"
    f.write_text("x")
    code, _, err = run_cli("demo", "--fast", "--out", f)
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


# --- bad input found in review: each was a traceback, a late failure or a partial output --------


def test_usage_errors_are_one_line(run_cli):
    for args in (["train", "--bogus"], ["train", "--epochs", "abc"], ["nonexistent"]):
        code, _, err = run_cli(*args)
        assert code == 2, args
        _one_clean_line(err)
        assert "--help" in err


@pytest.mark.parametrize("device", ["foo", "cuda:99"])
def test_bad_device_is_one_line(run_cli, tmp_path, device):
    code, _, err = run_cli("train", "--data", "digits", "--epochs", "1", "--no-progress",
                           "--device", device, "--out", tmp_path / "x.safetensors")  # fmt: skip
    assert code == 2
    _one_clean_line(err)
    assert "--device" in err and not list(tmp_path.iterdir())


def test_device_cuda_without_gpu_is_one_line(run_cli, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, _, err = run_cli("train", "--data", "digits", "--epochs", "1", "--no-progress",
                           "--device", "cuda", "--out", tmp_path / "x.safetensors")  # fmt: skip
    assert code == 2
    _one_clean_line(err)
    assert "no CUDA GPU" in err and not list(tmp_path.iterdir())


def _unwritable(tmp_path):
    """A path whose parent is a file: no one, root included, can write there."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    return blocker / "sub"


@pytest.mark.parametrize("which", ["--out", "--json"])
def test_train_unwritable_output_fails_before_training_and_writes_nothing(
    run_cli, tmp_path, monkeypatch, which
):
    # before the fix: trained for all epochs, wrote the checkpoint, then a traceback on --json
    monkeypatch.setattr(mc, "train", lambda *a, **k: pytest.fail("trained before failing"))
    bad = _unwritable(tmp_path)
    files = {"--out": tmp_path / "a.safetensors", "--json": tmp_path / "a.json"}
    files[which] = bad / files[which].name
    code, _, err = run_cli("train", "--data", "digits", "--no-progress",
                           "--out", files["--out"], "--json", files["--json"])  # fmt: skip
    assert code == 2
    _one_clean_line(err)
    assert "cannot write" in err and str(bad.parent) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes anywhere")
def test_train_read_only_folder_is_one_line(run_cli, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, _, err = run_cli("train", "--data", "digits", "--epochs", "1", "--no-progress",
                               "--out", ro / "a.safetensors")  # fmt: skip
    finally:
        ro.chmod(0o700)
    assert code == 2
    _one_clean_line(err)
    assert "not writable" in err and not list(ro.iterdir())


def test_other_commands_check_outputs_before_work(run_cli, tmp_path, ckpt_dir):
    a = ckpt_dir / "a.safetensors"
    bad = _unwritable(tmp_path)
    for args in (
        ["interpolate", a, a, "--json", bad / "x.json"],
        ["interpolate", a, a, "--plot", bad / "x.png"],
        ["curve", a, a, "--out", bad / "curve"],
        ["merge", a, a, "--out", bad / "m.safetensors"],
        ["align", a, a, "--out", bad / "b.safetensors"],
        ["spec", a, "--json", bad / "spec.json"],
    ):
        code, out, err = run_cli(*args, "--no-progress" if args[0] != "spec" else "--no-sites")
        assert code == 2, (args, err)
        _one_clean_line(err)
        assert "cannot write" in err and out == "", args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


def test_data_that_does_not_fit_the_checkpoint_is_one_line(run_cli, tmp_path, ckpt_dir):
    # a digits (1, 8, 8) MLP evaluated on MNIST-1D (40,): was a matmul traceback
    a = ckpt_dir / "a.safetensors"
    code, _, err = run_cli("interpolate", a, a, "--data", "mnist1d", "--points", "2",
                           "--no-progress")  # fmt: skip
    assert code == 2
    _one_clean_line(err)
    assert "does not fit the model" in err and "--data" in err
    npz = tmp_path / "many_classes.npz"
    x = np.zeros((30, 1, 8, 8), dtype=np.float32)
    np.savez(npz, x_train=x, y_train=np.arange(30) % 12, x_test=x[:5], y_test=np.arange(5))
    code, _, err = run_cli("interpolate", a, a, "--data", npz, "--points", "2", "--no-progress")
    assert code == 2
    _one_clean_line(err)
    assert "12 classes but the model has 10 outputs" in err


def _crafted_checkpoint(path, meta):
    from safetensors.torch import save_file

    net = mc.models.create("mlp", input_shape=(1, 8, 8), width=8, seed=0)
    save_file(net.state_dict(), str(path), metadata={"modeconn": json.dumps(meta)})


def test_checkpoint_metadata_never_runs_code(run_cli, tmp_path):
    # before the fix, a safetensors file recording model "os:system" ran its command
    target = tmp_path / "pwned"
    evil = tmp_path / "evil.safetensors"
    _crafted_checkpoint(evil, {"model": {"name": "os:system",
                                         "kwargs": {"command": f"touch {target}"}}})  # fmt: skip
    for args in (["spec", evil], ["interpolate", evil, evil, "--data", "digits"]):
        code, _, err = run_cli(*args)
        assert code == 2, args
        _one_clean_line(err)
        assert "os:system" in err and "--model" in err
    assert not target.exists()
    # the data source a checkpoint records is not imported either
    sneaky = tmp_path / "sneaky.safetensors"
    _crafted_checkpoint(sneaky, {"model": {"name": "mlp", "kwargs": {"input_shape": [1, 8, 8],
                                 "width": 8}}, "data": "os:getcwd"})  # fmt: skip
    for args in (["interpolate", sneaky, sneaky, "--points", "2", "--no-progress"],
                 ["merge", sneaky, sneaky, "--out", tmp_path / "m.safetensors"]):  # fmt: skip
        code, _, err = run_cli(*args)
        assert code == 2, args
        _one_clean_line(err)
        assert "os:getcwd" in err and "--data" in err
    assert not (tmp_path / "m.safetensors").exists()


def test_outputs_get_ordinary_file_permissions(run_cli, tmp_path):
    old = os.umask(0o022)
    try:
        code, _, err = run_cli(*TRAIN, "--epochs", "1", "--out", tmp_path / "a.safetensors",
                               "--json", tmp_path / "a.json")  # fmt: skip
    finally:
        os.umask(old)
    assert code == 0, err
    for name in ("a.safetensors", "a.json"):  # mkstemp alone made them 0o600
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


# --- Ctrl-C ------------------------------------------------------------------------------------


def test_ctrl_c_during_train_exits_130_and_writes_nothing(run_cli, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mc, "train", interrupted)
    code, _, err = run_cli(*TRAIN, "--out", tmp_path / "a.safetensors",
                           "--json", tmp_path / "a.json")  # fmt: skip
    assert code == 130
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted: nothing was written"), err
    assert not list(tmp_path.iterdir())


def test_ctrl_c_during_curve_keeps_the_epochs_and_says_how_to_resume(
    run_cli, tmp_path, monkeypatch, ckpt_dir
):
    a, b = ckpt_dir / "a.safetensors", ckpt_dir / "b.safetensors"
    out = tmp_path / "curve"
    args = ["curve", a, b, "--out", out, "--epochs", "3", "--points", "3", "--no-progress"]
    fit_curve = mc.fit_curve

    def stop_after_first_epoch(*a, **k):
        def callback(epoch, record):
            raise KeyboardInterrupt

        return fit_curve(*a, **k, callback=callback)

    monkeypatch.setattr(mc, "fit_curve", stop_after_first_epoch)
    code, _, err = run_cli(*args)
    assert code == 130
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and "interrupted:" in lines[0] and "--resume" in lines[0], err
    assert sorted(p.name for p in out.iterdir()) == ["fit_state.pt"]  # no partial results
    monkeypatch.setattr(mc, "fit_curve", fit_curve)
    code, out_text, err = run_cli(*args, "--resume")
    assert code == 0, err
    assert "resuming from" in out_text
    assert {"curve.safetensors", "evaluation.json"} <= {p.name for p in out.iterdir()}


def test_progress_bars_leave_nothing_on_a_non_terminal_stderr(run_cli, tmp_path):
    # rich's transient bar left a blank line in logs and pipes (stderr is not a terminal here)
    code, _, err = run_cli("train", "--data", "digits", "--epochs", "1", "--model-arg", "width=8",
                           "--out", tmp_path / "a.safetensors")  # fmt: skip
    assert code == 0 and err == "", repr(err)


def test_write_json_is_strict_json_even_for_a_diverged_run(tmp_path):
    import math

    from modeconn.cli.common import write_json

    result = {"loss": [1.0, math.nan, math.inf], "t": torch.tensor(0.5)}
    dest = write_json(tmp_path / "r.json", result)
    text = dest.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"loss": [1.0, None, None], "t": 0.5}
