"""One loss-barrier convention: unqualified barriers are on the test split, everywhere."""

from __future__ import annotations

import json

import modeconn as mc


def test_interpolate_and_align_report_test_split_barriers(run_cli, tmp_path, digits_splits):
    paths = []
    for seed in (0, 1):
        net = mc.models.create("mlp", input_shape=(1, 8, 8), width=16, depth=1, seed=seed)
        res = mc.train(net, digits_splits, epochs=2, seed=seed, progress=False)
        paths.append(tmp_path / f"{seed}.safetensors")
        mc.save_checkpoint(paths[-1], res.model, meta={"data": "digits", "seed": seed})
    js = tmp_path / "line.json"
    code, out, err = run_cli("interpolate", *paths, "--points", "5", "--json", js, "--no-progress")
    assert code == 0, err
    assert "barrier" in out and "test" in out  # narrow tables wrap the headers
    res = json.loads(js.read_text())
    ev = mc.PathEvaluation.from_dict(res["evaluation"])
    assert res["barrier_split"] == "test"
    assert res["loss_barrier"] == ev.barrier("loss", "test") == ev.barrier("loss")
    assert res["train_loss_barrier"] == ev.barrier("loss", "train") != res["loss_barrier"]
    js2 = tmp_path / "align.json"
    args = ["align", *paths, "--out", tmp_path / "b2.safetensors", "--points", "5", "--json", js2]
    code, out, err = run_cli(*args, "--no-progress")
    assert code == 0, err
    before = json.loads(js2.read_text())["before"]
    assert before["barrier_split"] == "test"
    assert before["loss_barrier"] == ev.barrier("loss", "test")
