"""SAM, SWA, instability analysis, AutoNEB, simplexes and subspaces (issue 12)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import modeconn as mc
from modeconn._src.paths.autoneb import neb_tangent, redistribute
from modeconn._src.paths.simplex import cayley_menger_volume
from modeconn._src.paths.spro import mean_squared_cosine
from modeconn._src.state import combine


def _mlp(splits, seed=0, width=32, depth=2):
    return mc.models.create(
        "mlp", input_shape=splits.input_shape, num_classes=splits.num_classes,
        width=width, depth=depth, seed=seed,
    )  # fmt: skip


def _train_loss(model, state, data) -> float:
    return mc.evaluate(model, data, state=state).loss


# --- SAM ---------------------------------------------------------------------------------------
def _ce_grad(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    """Closed-form gradient of mean softmax cross-entropy of a linear layer (float64)."""
    p = torch.softmax(x @ w.T + b, dim=1)
    g = (p - torch.nn.functional.one_hot(y, p.shape[1]).double()) / len(y)
    return g.T @ x, g.sum(0)


def test_sam_step_matches_two_step_closed_form():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, generator=gen)
    y = torch.tensor([0, 1, 2, 1, 0, 2])
    net = nn.Linear(3, 3)
    lr, rho = 0.5, 0.3
    out = mc.train(net, (x, y), epochs=1, lr=lr, optimizer="sam", sam_rho=rho, momentum=0.0,
                   weight_decay=0.0, batch_size=6, schedule="constant", progress=False)  # fmt: skip
    w, b, xd = net.weight.detach().double(), net.bias.detach().double(), x.double()
    gw, gb = _ce_grad(w, b, xd, y)  # step 1: g at θ, ε = ρ g / ‖g‖
    norm = torch.sqrt(gw.pow(2).sum() + gb.pow(2).sum())
    gw2, gb2 = _ce_grad(w + rho * gw / norm, b + rho * gb / norm, xd, y)  # step 2: g at θ + ε
    assert torch.allclose(out.model.weight.double(), w - lr * gw2, atol=1e-6)
    assert torch.allclose(out.model.bias.double(), b - lr * gb2, atol=1e-6)
    plain = mc.train(net, (x, y), epochs=1, lr=lr, momentum=0.0, weight_decay=0.0, batch_size=6,
                     schedule="constant", progress=False)  # fmt: skip
    assert not torch.allclose(plain.model.weight, out.model.weight, atol=1e-4)  # SAM ≠ SGD


def test_sam_second_pass_leaves_batchnorm_statistics_alone():
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    kw = {"epochs": 1, "batch_size": 32, "momentum": 0.0, "progress": False}
    sam = mc.train(net, (x, y), optimizer="sam", **kw).model
    sgd = mc.train(net, (x, y), **kw).model
    # one batch: BN saw exactly one forward pass (at θ) in both runs
    assert torch.allclose(sam[1].running_mean, sgd[1].running_mean)
    assert int(sam[1].num_batches_tracked) == 1


def test_sam_bad_rho():
    with pytest.raises(mc.ConfigError, match="sam_rho"):
        mc.train(nn.Linear(2, 2), (torch.ones(2, 2), torch.zeros(2, dtype=torch.long)),
                 optimizer="sam", sam_rho=0.0, progress=False)  # fmt: skip


# --- SWA ---------------------------------------------------------------------------------------
def test_swa_is_the_mean_of_the_epoch_snapshots(mnist1d_splits):
    x, y = mnist1d_splits.tensors("train")
    data = (x[:600], y[:600])
    net = _mlp(mnist1d_splits, width=16)
    avg = mc.swa(net, data, epochs=3, lr=0.05, seed=3, progress=False)
    snaps = [
        mc.train(net, data, epochs=j, lr=0.05, schedule="constant", seed=3,
                 progress=False).model.state_dict()
        for j in (1, 2, 3)
    ]  # fmt: skip
    mean = combine(snaps, [1 / 3] * 3)
    got = avg.state_dict()
    assert all(torch.allclose(got[k], mean[k], atol=1e-6) for k in mean)
    assert not torch.allclose(got["head.weight"], snaps[-1]["head.weight"])


def test_swa_resets_batchnorm_statistics():
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    avg = mc.swa(net, (x, y), epochs=2, lr=0.05, progress=False)
    h = avg[0](x).detach()
    assert torch.allclose(avg[1].running_mean, h.mean(0), atol=1e-5)


@pytest.mark.slow
def test_swa_at_least_as_accurate_as_the_model_it_averages(trained, mnist1d_splits):
    base = trained("mlp", seed=0, epochs=10)
    avg = mc.swa(base, mnist1d_splits, epochs=5, lr=0.05, progress=False)
    before = mc.evaluate(base, mnist1d_splits.test).accuracy
    after = mc.evaluate(avg, mnist1d_splits.test).accuracy
    assert after >= before - 0.005, (before, after)


# --- instability --------------------------------------------------------------------------------
@pytest.mark.slow
def test_instability_barrier_does_not_grow_with_the_spawn_epoch(mnist1d_splits):
    r = mc.instability(_mlp(mnist1d_splits), mnist1d_splits, spawn=[0, 2, 5], epochs=6,
                       lr=0.2, ts=11, progress=False)  # fmt: skip
    assert r.spawn == [0, 2, 5] and len(r.barrier) == len(r.error_barrier) == 3
    assert r.barrier[-1] <= r.barrier[0] + 1e-3
    assert r.barrier[-1] <= min(r.barrier) + 1e-3 and r.barrier[-1] < 0.01
    assert all(e < 0.05 for e in r.error_barrier[1:])
    a, b = r.child_accuracy[0]
    assert a != b or r.barrier[0] > 0  # the children differ


def test_instability_children_are_plain_training_runs(mnist1d_splits):
    """Spawned at k = 0, a child is mc.train from the init with the child's seed (an MLP has no
    dropout: data order is the only noise); spawned at k, both children share the parent's first
    k epochs and differ after."""
    x, y = mnist1d_splits.tensors("train")
    data = (x[:512], y[:512])
    net = _mlp(mnist1d_splits, width=16)
    r = mc.instability(net, data, spawn=[0, 2], epochs=3, seeds=(7, 8), ts=3, keep_states=True,
                       progress=False)  # fmt: skip
    for s, child in zip((7, 8), r.states[0], strict=True):
        plain = mc.train(net, data, epochs=3, seed=s, progress=False).model.state_dict()
        assert all(torch.equal(child[k], plain[k]) for k in plain)
    a, b = r.states[1]
    assert not torch.equal(a["head.weight"], b["head.weight"])
    assert r.splits == {"loss": "data", "error": "data"}


def test_instability_bad_spawn(mnist1d_splits):
    with pytest.raises(mc.ConfigError, match="spawn"):
        mc.instability(_mlp(mnist1d_splits), mnist1d_splits, spawn=[3], epochs=3, progress=False)


# --- AutoNEB -----------------------------------------------------------------------------------
def test_redistribute_and_tangent():
    chain = torch.tensor([[0.0, 0.0], [0.1, 0.0], [3.0, 0.0], [3.0, 1.0]])
    out = redistribute(chain)  # arc length 4: pivots at arc positions 4/3 and 8/3
    assert torch.allclose(out[1:3], torch.tensor([[4 / 3, 0.0], [8 / 3, 0.0]]), atol=1e-6)
    assert torch.equal(out[0], chain[0]) and torch.equal(out[-1], chain[-1])
    here, prev, nxt = torch.tensor([1.0, 0.0]), torch.zeros(2), torch.tensor([1.0, 1.0])
    assert torch.allclose(neb_tangent(prev, here, nxt, [0.0, 1.0, 2.0]), torch.tensor([0.0, 1.0]))
    assert torch.allclose(neb_tangent(prev, here, nxt, [2.0, 1.0, 0.0]), torch.tensor([1.0, 0.0]))


@pytest.mark.slow
def test_autoneb_chain_is_low_loss_with_fixed_endpoints(trained, mnist1d_splits):
    a, b = trained("mlp", seed=0, epochs=10), trained("mlp", seed=1, epochs=10)
    chain = mc.autoneb(a, b, mnist1d_splits, cycles=3, steps=60, progress=False)
    assert isinstance(chain, mc.PolyChain) and chain.num_points >= 5
    for got, want in ((chain.points[0], a.state_dict()), (chain.points[-1], b.state_dict())):
        assert all(torch.equal(got[k], want[k]) for k in want)
    named = {"train": mnist1d_splits.train}
    lin = mc.evaluate_path(a, mc.LinearPath(a.state_dict(), b.state_dict()), named, ts=11,
                           progress=False).summary("loss")["max"]  # fmt: skip
    ev = mc.evaluate_path(a, chain, named, ts=4 * chain.num_points, progress=False)
    ends = float(max(ev.loss[0], ev.loss[-1]))
    assert ev.summary("loss")["max"] < ends + 0.25 * (lin - ends), (lin, ev.loss.tolist())


# --- simplexes ---------------------------------------------------------------------------------
def test_cayley_menger_volume_matches_gram_determinant():
    gen = torch.Generator().manual_seed(1)
    for k in (1, 2, 3):
        pts = [torch.randn(6, generator=gen, dtype=torch.float64) for _ in range(k + 1)]
        e = torch.stack([p - pts[0] for p in pts[1:]])
        gram = torch.linalg.det(e @ e.T).sqrt() / torch.tensor(range(1, k + 1)).prod()
        assert torch.allclose(cayley_menger_volume(pts), gram, rtol=1e-8)
    assert float(mean_squared_cosine([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])])) == 0.0


def test_simplex_state_sample_and_save(tmp_path):
    pts = [{"w": torch.tensor([float(i), 1.0]), "n": torch.tensor(i)} for i in range(4)]
    s = mc.Simplex(pts)
    assert s.simplices == [(0, 1, 2), (1, 2, 3)]
    for i in range(4):
        corner = torch.zeros(4, dtype=torch.float64)
        corner[i] = 1
        assert torch.equal(s.state(corner)["w"], pts[i]["w"])
    for c in s.sample(20, seed=3):
        assert abs(float(c.sum()) - 1) < 1e-12 and bool((c >= 0).all())
        assert not (c[0] > 0 and c[3] > 0)  # never off the complex
    assert torch.equal(s.state(0.0)["w"], pts[0]["w"])
    assert torch.equal(s.state(1.0)["w"], pts[3]["w"])
    with pytest.raises(mc.ConfigError):
        s.state([0.5, 0.6, 0.0, 0.0])
    back = mc.load_path(s.save(tmp_path / "s"))
    assert isinstance(back, mc.Simplex) and back.simplices == s.simplices
    assert torch.equal(back.state([0.2, 0.3, 0.5, 0.0])["w"], s.state([0.2, 0.3, 0.5, 0.0])["w"])


@pytest.mark.slow
def test_fit_simplex_points_are_low_loss(trained, mnist1d_splits):
    a, b = trained("mlp", seed=0, epochs=10), trained("mlp", seed=1, epochs=10)
    s = mc.fit_simplex(a, b, mnist1d_splits, extra_vertices=2, epochs=6, progress=False)
    assert s.num_points == 4
    assert all(torch.equal(s.points[0][k], v) for k, v in a.state_dict().items())
    assert all(torch.equal(s.points[-1][k], v) for k, v in b.state_dict().items())
    train = mnist1d_splits.train
    lin = mc.evaluate_path(a, mc.LinearPath(a.state_dict(), b.state_dict()), {"train": train},
                           ts=11, progress=False).summary("loss")["max"]  # fmt: skip
    ends = max(_train_loss(a, None, train), _train_loss(b, None, train))
    worst = max(_train_loss(a, s.state(c), train) for c in s.sample(10, seed=1))
    assert worst < ends + 0.5 * (lin - ends), (lin, ends, worst)
    ens = mc.simplex_ensemble(a, s, mnist1d_splits.test, samples=4)
    assert ens.accuracy >= min(ens.member_accuracies)


# --- subspaces ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_subspace_line_points_are_as_accurate_as_a_single_model(mnist1d_splits):
    net = _mlp(mnist1d_splits, seed=5)
    single = mc.train(net, mnist1d_splits, epochs=10, seed=5, progress=False)
    line = mc.fit_subspace(net, mnist1d_splits, kind="line", epochs=20, lr=0.2, progress=False)
    assert isinstance(line, mc.LinearPath)
    ev = mc.evaluate_path(net, line, mnist1d_splits, ts=3, progress=False)
    acc = single.metrics["test_accuracy"]
    assert all(a >= acc - 0.04 for a in ev.accuracy.tolist()), (acc, ev.accuracy.tolist())
    flat = [torch.cat([v.flatten() for v in p.values()]) for p in line.points]
    assert float(mean_squared_cosine(flat)) < 0.1  # the cos² term kept the endpoints apart


def test_fit_subspace_kinds_and_errors(mnist1d_splits):
    x, y = mnist1d_splits.tensors("train")
    net = _mlp(mnist1d_splits, width=8, depth=1)
    curve = mc.fit_subspace(net, (x[:256], y[:256]), kind="curve", epochs=1, progress=False)
    assert isinstance(curve, mc.BezierCurve) and curve.num_points == 3
    simp = mc.fit_subspace(net, (x[:256], y[:256]), kind="simplex", vertices=3, epochs=1,
                           progress=False)  # fmt: skip
    assert isinstance(simp, mc.Simplex) and simp.simplices == [(0, 1, 2)]
    w = [p["head.weight"] for p in simp.points]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])  # independent inits
    with pytest.raises(mc.ConfigError, match="kind"):
        mc.fit_subspace(net, (x, y), kind="plane")


# --- CLI ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_sam_swa_instability_autoneb(run_cli, tmp_path):
    common = ["--data", "mnist1d", "--model-arg", "width=16", "--no-progress"]
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    r = run_cli("train", "--optimizer", "sam", "--epochs", "3", "--swa-epochs", "2", "--seed",
                "0", "--out", a, *common)  # fmt: skip
    assert r.code == 0, r.err
    assert mc.load_checkpoint(a).meta["train"]["swa"] == {"epochs": 2, "lr": 0.05}
    assert run_cli("train", "--epochs", "3", "--seed", "1", "--out", b, *common).code == 0
    r = run_cli("autoneb", a, b, "--out", tmp_path / "neb", "--cycles", "2", "--steps", "20",
                "--points", "5", "--no-progress")  # fmt: skip
    assert r.code == 0, r.err
    assert isinstance(mc.load_path(tmp_path / "neb"), mc.PolyChain)
    assert (tmp_path / "neb" / mc.PATH_FILENAME).is_file()
    assert (tmp_path / "neb" / "evaluation.json").is_file()
    # the output checks of every command: an input as --out, a missing folder without --mkdir
    before = a.read_bytes()
    r = run_cli("autoneb", a, b, "--out", a, "--no-progress")
    assert r.code == 2 and "is also an input" in r.err and a.read_bytes() == before, r.err
    r = run_cli("autoneb", a, b, "--out", tmp_path / "no" / "neb", "--no-progress")
    assert r.code == 2 and "--mkdir" in r.err and not (tmp_path / "no").exists(), r.err
    j = tmp_path / "inst.json"
    r = run_cli("instability", "--spawn", "0,2", "--epochs", "3", "--points", "5", "--json", j,
                *common)  # fmt: skip
    assert r.code == 0, r.err
    assert "spawn epoch" in r.out and j.is_file()
    r = run_cli("instability", "--spawn", "5", "--epochs", "3", *common)
    assert r.code == 2 and r.err.startswith("error:") and "spawn" in r.err
    bad = tmp_path / "bad.safetensors"
    r = run_cli("train", "--swa-epochs", "-1", "--out", bad, *common)
    assert r.code == 2 and "--swa-epochs" in r.err and not bad.exists()


# --- every path kind (the registry's contract) ---------------------------------------------------
def _kinds() -> list[str]:
    from modeconn._src.paths.base import REGISTRY

    return sorted(REGISTRY)


@pytest.mark.parametrize("kind", _kinds())
def test_every_path_kind_has_its_endpoints_and_round_trips(kind, tmp_path):
    from modeconn._src.paths.base import REGISTRY

    n = 2 if kind == "linear" else 4
    gen = torch.Generator().manual_seed(0)
    pts = [{"w": torch.randn(3, generator=gen), "k": torch.tensor(i)} for i in range(n)]
    path = REGISTRY[kind].from_points(pts)
    assert torch.equal(path.state(0.0)["w"], pts[0]["w"])
    assert torch.equal(path.state(1.0)["w"], pts[-1]["w"])
    assert abs(float(path.coefficients(0.37).sum()) - 1.0) < 1e-12
    back = mc.load_path(path.save(tmp_path / kind))
    assert type(back) is type(path)
    assert torch.equal(back.state(0.37)["w"], path.state(0.37)["w"])


@pytest.mark.slow
def test_cli_simplex_and_subspace(run_cli, tmp_path):
    common = ["--model-arg", "width=16", "--no-progress"]
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for seed, out in ((0, a), (1, b)):
        r = run_cli("train", "--epochs", "2", "--seed", seed, "--out", out, "--data", "mnist1d",
                    *common)  # fmt: skip
        assert r.code == 0, r.err
    j = tmp_path / "s.json"
    r = run_cli("simplex", a, b, "--out", tmp_path / "sx", "--extra-vertices", "2", "--epochs",
                "1", "--samples", "3", "--points", "5", "--json", j, "--no-progress")  # fmt: skip
    assert r.code == 0, r.err
    assert "random points" in r.out and isinstance(mc.load_path(tmp_path / "sx"), mc.Simplex)
    r = run_cli("evaluate", tmp_path / "sx", "--points", "3", "--no-progress")
    assert r.code == 0, r.err
    r = run_cli("subspace", "--kind", "curve", "--epochs", "1", "--points", "3", "--out",
                tmp_path / "sub", "--data", "mnist1d", *common)  # fmt: skip
    assert r.code == 0, r.err
    assert isinstance(mc.load_path(tmp_path / "sub"), mc.BezierCurve)
    r = run_cli("subspace", "--kind", "plane", "--out", tmp_path / "bad", *common)
    assert r.code == 2 and "kind" in r.err


def test_redistribute_keeps_target_weights():
    chain = torch.tensor([[0.0], [3.0], [3.5], [4.0]])
    out = redistribute(chain, torch.tensor([0.5, 0.25, 0.25]))  # targets: 2.0, 3.0 along 4.0
    assert torch.allclose(out[:, 0], torch.tensor([0.0, 2.0, 3.0, 4.0]))


def test_fit_simplex_resumes_to_the_uninterrupted_result(mnist1d_splits, tmp_path):
    x, y = mnist1d_splits.tensors("train")
    data = (x[:300], y[:300])
    a, b = _mlp(mnist1d_splits, seed=0, width=8), _mlp(mnist1d_splits, seed=1, width=8)
    kw = {"extra_vertices": 2, "epochs": 3, "progress": False}
    full = mc.fit_simplex(a, b, data, checkpoint_dir=tmp_path / "full", **kw)

    class Stop(Exception):
        pass

    def stop(epoch, record):
        if epoch == 0:
            raise Stop

    with pytest.raises(Stop):
        mc.fit_simplex(a, b, data, checkpoint_dir=tmp_path / "cut", callback=stop, **kw)
    seen: list[int] = []
    again = mc.fit_simplex(a, b, data, checkpoint_dir=tmp_path / "cut", resume=True,
                           callback=lambda e, r: seen.append(e), **kw)  # fmt: skip
    assert seen == [1, 2]  # epoch 0 came from the checkpoint
    assert all(torch.equal(p[k], q[k]) for p, q in zip(full.points, again.points, strict=True)
               for k in p)


def test_volume_bonus_widens_the_simplex(mnist1d_splits):
    x, y = mnist1d_splits.tensors("train")
    data = (x[:512], y[:512])
    a, b = _mlp(mnist1d_splits, seed=0, width=8), _mlp(mnist1d_splits, seed=1, width=8)

    def volume(lam: float) -> float:
        s = mc.fit_simplex(a, b, data, extra_vertices=2, volume_weight=lam, epochs=2,
                           progress=False)  # fmt: skip
        flat = [torch.cat([v.flatten() for k, v in p.items() if "weight" in k or "bias" in k])
                for p in s.points[:3]]  # fmt: skip
        return float(cayley_menger_volume(flat))

    assert volume(0.3) > 1.5 * volume(0.0)
