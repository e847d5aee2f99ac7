"""CLI ``interpolate | curve | evaluate`` and plot_paths: files, JSON, resume, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

import modeconn as mc
from modeconn._src.paths import PathEvaluation


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, trained):
    d = tmp_path_factory.mktemp("paths-cli")
    out = []
    for seed in (0, 1):
        p = d / f"mlp{seed}.safetensors"
        mc.save_checkpoint(p, trained("mlp", seed=seed), meta={"data": "mnist1d", "seed": seed})
        out.append(p)
    return d, out[0], out[1]


def test_interpolate_prints_table_and_writes_json_and_plot(checkpoints, run_cli, mnist1d_splits):
    d, a, b = checkpoints
    js, png = d / "interp.json", d / "interp.png"
    code, printed, err = run_cli(
        "interpolate",
        a,
        b,
        "--points",
        "5",
        "--json",
        js,
        "--plot",
        png,
        "--no-progress",
    )
    assert code == 0, err
    assert "barrier" in printed and "0.500" in printed
    res = json.loads(js.read_text())
    ev = PathEvaluation.from_dict(res["evaluation"])
    assert ev.ts.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0] and set(ev.splits) == {"train", "test"}
    # the endpoints' values are those of the checkpoints themselves (data recorded in them)
    assert ev.accuracy[0].item() == mc.evaluate(mc.load_model(a), mnist1d_splits.test).accuracy
    assert ev.barrier("loss") > 0.3
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curve_writes_its_folder_resumes_and_evaluates(checkpoints, run_cli):
    d, a, b = checkpoints
    out = d / "curve"
    args = [
        "curve",
        a,
        b,
        "--out",
        out,
        "--kind",
        "polychain",
        "--bends",
        "2",
        "--epochs",
        "2",
        "--points",
        "5",
        "--no-progress",
    ]
    code, _, err = run_cli(*args)
    assert code == 0, err
    assert {p.name for p in out.iterdir()} >= {
        "curve.safetensors",
        "evaluation.json",
        "curve.png",
        "fit_state.pt",
    }
    path = mc.load_path(out)
    assert isinstance(path, mc.PolyChain) and path.num_points == 4
    assert path.meta["data"] == "mnist1d" and path.meta["model"]["name"] == "mlp"
    res = json.loads((out / "evaluation.json").read_text())
    curve_ev = PathEvaluation.from_dict(res["curve"])
    line_ev = PathEvaluation.from_dict(res["linear"])
    assert curve_ev.summary("loss", "train")["max"] < line_ev.summary("loss", "train")["max"]
    # --resume on a finished run trains nothing more and gives the same curve
    assert run_cli(*args, "--resume").code == 0
    again = mc.load_path(out)
    assert all(
        torch.equal(p[k], q[k]) for p, q in zip(path.points, again.points, strict=True) for k in p
    )
    js = d / "eval.json"
    assert run_cli("evaluate", out, "--points", "5", "--json", js, "--no-progress").code == 0
    ev = PathEvaluation.from_dict(json.loads(js.read_text())["evaluation"])
    torch.testing.assert_close(ev.values("loss", "test"), curve_ev.values("loss", "test"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["curve", "{a}", "{b}", "--kind", "spline"], "--kind 'spline'"),
        (["curve", "{a}", "{b}", "--align", "magic"], "--align 'magic'"),
        (["interpolate", "{a}", "{b}", "--align", "pam2"], "--align 'pam2'"),
        (["interpolate", "{a}", "{missing}"], "does not exist"),
        (["evaluate", "{missing}"], "no path file"),
        (["interpolate", "{a}", "{b}", "--points", "1"], "--points"),
        # found in review (tracebacks or silently accepted before)
        (["interpolate", "{a}", "{b}", "--eps", "-1"], "--eps must be >= 0"),
        (["interpolate", "{a}", "{b}", "--data", "digits"], "does not fit the model"),
        (["curve", "{a}", "{b}", "--batch-size", "0"], "--batch-size >= 1"),
        (["curve", "{a}", "{b}", "--points", "1"], "--points"),
        (["curve", "{a}", "{b}", "--device", "gpu0"], "--device 'gpu0' is not a device"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(checkpoints, run_cli, args, message):
    d, a, b = checkpoints
    subst = {"a": a, "b": b, "missing": d / "missing.safetensors"}
    code, _, err = run_cli(*(x.format(**subst) for x in args), "--no-progress")
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_plot_paths_several_paths_one_file(tmp_path):
    ts = torch.linspace(0, 1, 3, dtype=torch.float64)

    def ev(scale: float, robust: bool) -> PathEvaluation:
        res = {"loss": ts * scale, "accuracy": 1 - ts * scale / 4}
        if robust:
            res["robust_accuracy"] = res["accuracy"] / 2
        return PathEvaluation(ts, {"test": res}, "test", torch.zeros(3, dtype=torch.float64))

    out = mc.plot_paths({"linear": ev(2.0, False), "curve": ev(1.0, True)}, tmp_path / "p.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]  # no temporary left behind
    with pytest.raises(mc.ConfigError):
        mc.plot_paths({}, tmp_path / "q.png")
