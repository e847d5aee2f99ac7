"""Sweeps on a local Ray with 2 workers: rows, endpoint sharing, kill -9 + rerun, failures, CLI."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import modeconn as mc

TINY = {
    "data": "digits",
    "model": "mlp",
    "model_args": {"depth": 1},
    "grid": {"width": [8, 16, 24, 32]},  # 8 cells: enough that a kill lands mid-run
    "seeds": [[0, 1], [0, 2]],  # endpoint seed 0 is shared by the two pairs of a width
    "train": {"epochs": 1},
    "align": ["none", "weight", "activation"],
    "paths": ["linear"],
    "points": 5,
}
TIMINGS = ("time_align_s", "time_path_s", "time_cell_s")


def _comparable(rows):
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]


@pytest.fixture(scope="module")
def ray_cluster(_isolated_cache):
    """A local Ray with 2 CPUs, started once for this module; yields its GCS address."""
    ray = pytest.importorskip("ray")
    import logging

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR)  # fmt: skip
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def tiny_sweep(ray_cluster, tmp_path_factory):
    """The tiny grid run once, uninterrupted: ``(folder, rows)``."""
    out = tmp_path_factory.mktemp("sweep") / "tiny"
    return out, mc.sweep.run(TINY, out, workers=2, progress=False)


# --- grid validation: before any work, one line -------------------------------------------------
@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"align": ["none", "telepathy"]}, "unknown alignment method 'telepathy'"),
        ({"model": "nosuchnet"}, "unknown model 'nosuchnet'"),
        ({"model": "os:system"}, "pass --allow-code os:system"),
        ({"data": "evil.mod:load"}, "pass --allow-code evil.mod:load"),
        ({"paths": ["zigzag"]}, "unknown path kind 'zigzag'"),
        ({"seeds": [[3, 3]]}, "trains the same model twice"),
        ({"seeds": []}, "seeds"),
        ({"grid": {"width": []}}, "has no values"),
        ({"grid": {"align": [1, 2]}}, "clashes with the results column"),
        ({"grid": {"width; drop": [1]}}, "must be a name"),
        ({"train": {"epochz": 1}}, "unknown training option 'epochz'"),
        ({"train": {"epochs": 1, "optimizer": "magic"}}, "unknown optimizer 'magic'"),
        ({"grid": {"width": [8, -1]}}, "cell width=-1"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_grid_is_one_clear_error_before_any_work(tmp_path, change, needle):
    grid = {**TINY, **change}
    with pytest.raises(mc.ConfigError, match=None) as info:
        mc.sweep.run(grid, tmp_path / "out", progress=False)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg
    assert not (tmp_path / "out").exists()  # nothing was started


def tiny_net(input_shape=(1, 8, 8), num_classes=10, width=8, depth=1):
    """A model factory named by import path (used only when the user allows it)."""
    return mc.models.create("mlp", input_shape=input_shape, num_classes=num_classes, width=width,
                            depth=depth)  # fmt: skip


def test_an_import_path_model_is_used_only_when_the_user_names_it():
    grid = mc.sweep.load_grid({**TINY, "model": f"{__name__}:tiny_net"})
    with pytest.raises(mc.ConfigError, match="does not run code named in a file"):
        mc.sweep.check_grid(grid)
    splits = mc.sweep.check_grid(grid, allow_code=[f"{__name__}:tiny_net"])
    assert splits.input_shape == (1, 8, 8)


def test_cli_bad_grid_file_exits_2_with_one_line(run_cli, tmp_path):
    bad = tmp_path / "grid.yaml"
    bad.write_text("data: digits\nmodel: [unclosed\n")
    code, _, err = run_cli("sweep", bad, "--out", tmp_path / "out")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "YAML" in err
    bad.write_text(yaml.safe_dump({**TINY, "align": ["none", "nope"]}))
    code, _, err = run_cli("sweep", bad, "--out", tmp_path / "out")
    assert code == 2 and "unknown alignment method 'nope'" in err and err.count("\n") == 1
    code, _, err = run_cli("sweep", bad)
    assert code == 2 and "--out" in err


def test_without_ray_the_sweep_says_how_to_install(monkeypatch, run_cli, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(TINY))
    code, _, err = run_cli("sweep", grid, "--out", tmp_path / "out")
    assert code == 2 and "pip install 'modeconn[sweep]'" in err


# --- a tiny grid on Ray ---------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_sweep_rows_match_a_direct_evaluation(tiny_sweep):
    out, rows = tiny_sweep
    assert len(rows) == 4 * 2 * 3  # widths x seed pairs x alignment methods (x 1 path)
    assert {(r["width"], r["seed_a"], r["seed_b"]) for r in rows} == {
        (w, 0, s) for w in (8, 16, 24, 32) for s in (1, 2)
    }
    # shared endpoints are trained once: 3 seeds x 4 widths in the store
    assert len(list((out / "endpoints").glob("*.safetensors"))) == 12
    # oracle: the unaligned row equals evaluate_path on the stored endpoints, test split
    row = next(r for r in rows if r["width"] == 16 and r["seed_b"] == 2 and r["align"] == "none")
    spec = {"model": "mlp", "model_args": {"depth": 1, "width": 16}, "data": "digits",
            "data_args": {}, "train": {"epochs": 1}}  # fmt: skip
    a = mc.load_checkpoint(out / "endpoints" / f"{mc.sweep.endpoint_key({**spec, 'seed': 0})}"
                           ".safetensors")  # fmt: skip
    b = mc.load_checkpoint(out / "endpoints" / f"{mc.sweep.endpoint_key({**spec, 'seed': 2})}"
                           ".safetensors")  # fmt: skip
    splits = mc.data.load("digits")
    ev = mc.evaluate_path(a.build(), mc.LinearPath(a.state, b.state), splits, ts=5, progress=False)
    assert row["loss_barrier"] == pytest.approx(ev.barrier("loss", "test"), abs=1e-6)
    assert row["error_barrier"] == pytest.approx(ev.barrier("error", "test"), abs=1e-9)
    assert row["barrier_split"] == "test"
    assert row["a_test_accuracy"] == pytest.approx(a.meta["metrics"]["test_accuracy"])
    # aligning B changes neither endpoint's function: every row of a cell starts and ends alike
    per_t = json.loads((out / row["artifact"]).read_text())["splits"]["test"]["values"]
    assert per_t["accuracy"][0] == pytest.approx(row["a_test_accuracy"])
    assert per_t["accuracy"][-1] == pytest.approx(row["b_test_accuracy"])
    st = mc.sweep.status(out)
    assert (st["cells"], st["done"], st["failed"], st["missing"]) == (8, 8, 0, 0)
    # a rerun has nothing to do: the very same rows, timings included
    again = mc.sweep.run(TINY, out, workers=2, progress=False)
    assert again == rows


def _cells_done(out: Path) -> int:
    try:
        with sqlite3.connect(out / "results.sqlite", timeout=1) as con:
            return con.execute("SELECT count(*) FROM cells").fetchone()[0]
    except sqlite3.Error:
        return 0


def _run_then_stop(cmd: list[str], out: Path, sig: int) -> tuple[int, str]:
    """Start the sweep command, send ``sig`` once it has recorded one more cell, wait for it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # SIGINT as a terminal would send it (a background shell ignores it otherwise)
    def default_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, preexec_fn=default_sigint)  # fmt: skip
    before, deadline = _cells_done(out), time.monotonic() + 120
    while _cells_done(out) <= before and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1]
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.slow
def test_ctrl_c_then_kill_9_mid_run_then_rerun_gives_the_same_rows(
    ray_cluster, tiny_sweep, tmp_path
):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "modeconn.cli.main", "sweep", str(grid), "--out", str(out),
           "--address", ray_cluster, "--workers", "1", "--no-progress"]  # fmt: skip
    code, err = _run_then_stop(cmd, out, signal.SIGINT)
    assert code == 130 and "interrupted: " in err and "run the same command" in err, err
    assert "Traceback" not in err
    first = mc.sweep.status(out)["done"]
    code, _ = _run_then_stop(cmd, out, signal.SIGKILL)  # the same command, killed in turn
    assert code == -signal.SIGKILL
    st = mc.sweep.status(out)
    assert first < st["done"] < 8  # each run added cells; some are still missing
    rows = mc.sweep.run(grid, out, workers=2, progress=False)
    assert _comparable(rows) == _comparable(tiny_sweep[1])
    assert mc.sweep.status(out)["missing"] == 0


@pytest.mark.slow
def test_a_failing_cell_is_recorded_and_retried(ray_cluster, run_cli, tmp_path):
    grid = {**TINY, "grid": {"train.lr": [0.05, 1e8]}, "seeds": [[0, 1]], "align": ["none"]}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    out = tmp_path / "out"
    code, stdout, err = run_cli("sweep", path, "--out", out, "--no-progress")
    assert code == 0, err
    assert "1/2 cells done, 1 failed" in " ".join(stdout.split())
    rows = mc.sweep.load(out)
    assert [r["train_lr"] for r in rows] == [0.05]  # the other cell went on
    (fail,) = mc.sweep.status(out)["failures"]
    assert "DivergedError" in fail["error"] and fail["attempts"] == 1
    code, stdout, _ = run_cli("sweep", "status", out)
    assert code == 0 and "DivergedError" in stdout
    mc.sweep.run(path, out, progress=False)  # without --retry-failed: left alone
    assert mc.sweep.status(out)["failures"][0]["attempts"] == 1
    code, _, err = run_cli("sweep", path, "--out", out, "--retry-failed", "--no-progress")
    assert code == 0, err
    (fail,) = mc.sweep.status(out)["failures"]
    assert fail["attempts"] == 2 and mc.sweep.load(out) == rows


# --- the report ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_report_renders_in_headless_chromium(tiny_sweep, run_cli, tmp_path):
    out, _ = tiny_sweep
    code, stdout, err = run_cli("report", out)
    assert code == 0, err
    page = (out / "report.html").read_text()
    assert page.count("<svg") == 2 and "<img" not in page and "http" not in page.split("<svg")[0]
    assert "test loss barrier (nats)" in page and "width (hidden units per layer)" in page
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip("chromium is not installed (apt-get install chromium)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
    dom = subprocess.run([str(chromium), *flags, "--dump-dom", (out / "report.html").as_uri()],
                         capture_output=True, text=True, timeout=120).stdout  # fmt: skip
    assert "Barrier against width" in dom and dom.count("<svg") == 2
    shot = tmp_path / "shot.png"
    subprocess.run([str(chromium), *flags, "--window-size=1200,1600", f"--screenshot={shot}",
                    (out / "report.html").as_uri()], capture_output=True, timeout=120)  # fmt: skip
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_report_of_a_folder_that_is_neither_is_one_line(run_cli, tmp_path):
    code, _, err = run_cli("report", tmp_path)
    assert code == 2 and "neither a sweep folder" in err


def test_summarize_mean_and_sample_std():
    rows = [{"k": 1, "loss_barrier": v} for v in (1.0, 2.0, 6.0)] + [{"k": 2, "loss_barrier": None}]
    s = mc.sweep.summarize(rows, ["k"], ["loss_barrier"])
    assert s[0]["loss_barrier_mean"] == 3.0 and s[0]["loss_barrier_std"] == pytest.approx(
        (((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2) ** 0.5
    )
    assert s[1]["n"] == 1


@pytest.mark.slow
def test_a_shared_store_reuses_endpoints_across_sweeps(tiny_sweep, run_cli, tmp_path):
    store = tiny_sweep[0] / "endpoints"
    before = {p.name: p.stat().st_mtime_ns for p in store.glob("*.safetensors")}
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({**TINY, "grid": {"width": [8]}, "seeds": [[0, 1]],
                                    "align": ["none"]}))  # fmt: skip
    out = tmp_path / "other"
    code, _, err = run_cli("sweep", grid, "--out", out, "--store", store, "--no-progress")
    assert code == 0, err
    assert {p.name: p.stat().st_mtime_ns for p in store.glob("*.safetensors")} == before
    assert not (out / "endpoints").exists()  # nothing trained: both endpoints were in the store
    (row,) = mc.sweep.load(out)
    same = next(r for r in tiny_sweep[1] if (r["width"], r["seed_b"], r["align"]) == (8, 1, "none"))
    ids = ("cell", "config_hash", "artifact")  # the cell differs (another grid): its id too
    assert _comparable([row])[0] | {k: same[k] for k in ids} == _comparable([same])[0]
