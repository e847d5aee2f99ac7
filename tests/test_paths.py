"""Path objects (linear, Bezier, polygonal chain), their save/load, and evaluate_path."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import modeconn as mc
from modeconn._src.errors import CheckpointError, ConfigError, IncompatibleModelsError
from modeconn._src.evaluation import with_state
from modeconn._src.paths import PathEvaluation, bezier_coefficients, polychain_coefficients


def _states(n: int, seed: int = 0, shape=(3, 2)) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "w": torch.randn(shape, generator=g),
            "b": torch.randn(shape[0], generator=g),
            "count": torch.tensor(10 * i),
        }
        for i in range(n)
    ]


def _make(kind: str, points):
    if kind == "linear":
        return mc.LinearPath(points[0], points[-1])
    return {"bezier": mc.BezierCurve, "polychain": mc.PolyChain}[kind](points)


KINDS = {"linear": 2, "bezier": 4, "polychain": 4}  # kind -> number of points used in the tests


# --- coefficients and closed forms -----------------------------------------------------------
def test_bezier_with_one_bend_is_the_closed_form_quadratic():
    a, m, b = _states(3)
    curve = mc.BezierCurve([a, m, b])
    for t in (0.0, 0.1, 1 / 3, 0.5, 0.77, 1.0):
        want = (1 - t) ** 2 * a["w"] + 2 * t * (1 - t) * m["w"] + t**2 * b["w"]
        torch.testing.assert_close(curve.state(t)["w"], want, atol=1e-6, rtol=0)


def test_bezier_coefficients_are_bernstein_polynomials():
    for n in (2, 3, 5):
        for t in (0.0, 0.3, 1.0):
            c = bezier_coefficients(t, n)
            want = [math.comb(n - 1, i) * t**i * (1 - t) ** (n - 1 - i) for i in range(n)]
            assert c.tolist() == pytest.approx(want)
            assert float(c.sum()) == pytest.approx(1.0)


def test_polychain_passes_through_its_points_and_is_linear_between():
    pts = _states(4)
    chain = mc.PolyChain(pts)
    for i, p in enumerate(pts):  # point i sits at t = i / 3
        torch.testing.assert_close(chain.state(i / 3)["w"], p["w"], atol=1e-6, rtol=0)
    mid = chain.state(0.5)["w"]  # halfway between points 1 and 2
    torch.testing.assert_close(mid, 0.5 * (pts[1]["w"] + pts[2]["w"]), atol=1e-6, rtol=0)
    assert polychain_coefficients(0.25, 3).tolist() == [0.5, 0.5, 0.0]


def test_linear_path_is_lerp():
    a, b = _states(2)
    p = mc.LinearPath(a, b)
    torch.testing.assert_close(p.state(0.3)["w"], 0.7 * a["w"] + 0.3 * b["w"], atol=1e-6, rtol=0)
    assert p.coefficients(0.3).tolist() == pytest.approx([0.7, 0.3])


@pytest.mark.parametrize("kind", list(KINDS))
def test_endpoints_exact_and_integer_buffers_from_the_nearest_end(kind):
    pts = _states(KINDS[kind])
    path = _make(kind, pts)
    for t, end in ((0.0, pts[0]), (1.0, pts[-1])):
        s = path.state(t)
        assert all(torch.equal(s[k], end[k]) for k in end)
    assert int(path.state(0.4)["count"]) == 0 and int(path.state(0.6)["count"]) == int(
        pts[-1]["count"]
    )
    assert path.state(0.4)["count"].dtype == torch.int64


def test_paths_copy_their_points_and_never_mutate_inputs():
    pts = _states(3)
    before = [{k: v.clone() for k, v in p.items()} for p in pts]
    curve = mc.BezierCurve(pts)
    curve.state(0.5)["w"].add_(100)
    curve.points[1]["w"].add_(100)
    pts[1]["w"].add_(1)  # a later change to the caller's state does not leak into the path
    assert torch.equal(curve.points[1]["w"], before[1]["w"])
    assert torch.equal(pts[0]["w"], before[0]["w"])


def test_bad_paths_are_refused():
    a, b = _states(2)
    with pytest.raises(IncompatibleModelsError, match="shape"):
        mc.LinearPath(a, {**b, "w": torch.zeros(4, 4)})
    with pytest.raises(IncompatibleModelsError, match="at least 2"):
        mc.BezierCurve([a])
    with pytest.raises(ValueError, match="t must lie"):
        mc.LinearPath(a, b).state(1.5)


@pytest.mark.parametrize("kind", list(KINDS))
def test_save_load_roundtrip_is_exact(kind, tmp_path):
    pts = _states(KINDS[kind])
    path = _make(kind, pts)
    path.meta["model"] = {"name": "mlp", "kwargs": {"width": 8}}
    file = path.save(tmp_path / "run")
    assert file == tmp_path / "run" / "curve.safetensors"
    back = mc.load_path(tmp_path / "run")
    assert type(back) is type(path) and back.meta == path.meta
    for p, q in zip(path.points, back.points, strict=True):
        assert list(p) == list(q) and all(torch.equal(p[k], q[k]) for k in p)
    assert type(path).load(file).num_points == path.num_points


def test_load_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="no path file"):
        mc.load_path(tmp_path)
    mc.save_checkpoint(tmp_path / "m.safetensors", nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match="not a modeconn path"):
        mc.load_path(tmp_path / "m.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable"):
        mc.load_path(tmp_path / "bad.safetensors")


# --- every zoo model: t = 0 and t = 1 reproduce the endpoints' outputs --------------------------
def _zoo(name: str, seed: int) -> nn.Module:
    kwargs = {"norm": "bn"} if name == "mlp" else {}  # the plain mlp is covered by other tests
    return mc.models.create(name, seed=seed, **kwargs)


@pytest.mark.parametrize("name", mc.models.names())
def test_every_path_kind_reproduces_the_endpoints_of_every_zoo_model(name):
    a, b, m1, m2 = (_zoo(name, s) for s in range(4))
    shape = tuple(a.modeconn_config["kwargs"]["input_shape"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, *shape, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    bn = mc.needs_bn_reset(a)
    sa, sb = a.state_dict(), b.state_dict()
    bends = [m1.state_dict(), m2.state_dict()]
    paths = [
        mc.LinearPath(sa, sb),
        mc.BezierCurve([sa, *bends, sb]),
        mc.PolyChain([sa, *bends, sb]),
    ]

    def ready(net: nn.Module) -> nn.Module:
        return mc.reset_bn(net, (x, y)) if bn else net.eval()

    ends = {0.0: ready(a), 1.0: ready(b)}
    with torch.no_grad():
        ref = {t: net(x) for t, net in ends.items()}
    metrics = {t: mc.evaluate(net, (x, y)) for t, net in ends.items()}
    for path in paths:
        for t in (0.0, 1.0):
            with torch.no_grad():
                out = ready(with_state(a, path.state(t)))(x)
            assert float((out - ref[t]).abs().max()) <= 1e-4, (path.kind, t)
        ev = mc.evaluate_path(a, path, (x, y), ts=[0.0, 1.0], progress=False)
        assert ev.endpoint_error is not None and ev.endpoint_error <= 1e-4
        for i, t in enumerate((0.0, 1.0)):
            assert ev.loss[i].item() == pytest.approx(metrics[t].loss, rel=1e-5, abs=1e-6)
            assert ev.accuracy[i].item() == metrics[t].accuracy


# --- evaluate_path --------------------------------------------------------------------------
def _mlp_pair(seed: int = 0):
    torch.manual_seed(seed)
    nets = [nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 3)) for _ in range(2)]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(90, 5, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return nets, (x, y)


def test_evaluate_path_matches_evaluate_at_every_t():
    (a, b), (x, y) = _mlp_pair()
    bend = {
        k: 0.5 * (v + b.state_dict()[k]) + 0.3 * torch.randn_like(v)
        for k, v in a.state_dict().items()
    }
    path = mc.BezierCurve([a.state_dict(), bend, b.state_dict()])
    ev = mc.evaluate_path(a, path, (x, y), ts=7, progress=False, batch_size=16)
    assert ev.ts.tolist() == pytest.approx([i / 6 for i in range(7)])
    for i, t in enumerate(ev.ts.tolist()):
        m = mc.evaluate(a, (x, y), state=path.state(t))
        assert ev.loss[i].item() == pytest.approx(m.loss, rel=1e-5)
        assert ev.accuracy[i].item() == m.accuracy
    assert ev.primary == "data" and ev.splits == ["data"]


def test_barrier_and_summaries_against_a_hand_computation():
    (a, b), (x, y) = _mlp_pair(1)
    path = mc.LinearPath(a.state_dict(), b.state_dict())
    ev = mc.evaluate_path(a, path, (x, y), ts=5, progress=False)
    ts = [0.0, 0.25, 0.5, 0.75, 1.0]
    losses, errors = [], []
    for t in ts:
        net = with_state(
            a, {k: (1 - t) * a.state_dict()[k] + t * b.state_dict()[k] for k in a.state_dict()}
        )
        with torch.no_grad():
            out = net(x)
        losses.append(float(nn.functional.cross_entropy(out, y)))
        errors.append(float((out.argmax(1) != y).float().mean()))
    for values, metric in ((losses, "loss"), (errors, "error")):
        hand = max(
            v - ((1 - t) * values[0] + t * values[-1]) for t, v in zip(ts, values, strict=True)
        )
        assert ev.barrier(metric) == pytest.approx(hand, abs=1e-5)
    s = ev.summary("loss")
    assert s["max"] == pytest.approx(max(losses), rel=1e-5)
    assert s["min"] == pytest.approx(min(losses), rel=1e-5)
    assert s["mean"] == pytest.approx(sum(losses) / 5, rel=1e-5)
    # On a straight path dl is constant, so the arc-length mean is the trapezoid rule.
    trap = sum(0.5 * (losses[i] + losses[i + 1]) for i in range(4)) / 4
    assert s["arc_mean"] == pytest.approx(trap, rel=1e-5)
    dist = math.sqrt(
        sum(float((a.state_dict()[k] - b.state_dict()[k]).pow(2).sum()) for k in a.state_dict())
    )
    assert ev.dl[1:].tolist() == pytest.approx([dist / 4] * 4, rel=1e-5)


def test_arc_length_mean_weights_by_distance():
    ev = PathEvaluation(
        ts=torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64),
        results={
            "s": {
                "loss": torch.tensor([1.0, 3.0, 1.0], dtype=torch.float64),
                "accuracy": torch.tensor([0.9, 0.5, 0.8], dtype=torch.float64),
            }
        },
        primary="s",
        dl=torch.tensor([0.0, 3.0, 1.0], dtype=torch.float64),
    )
    # segments: (1+3)/2 with length 3, (3+1)/2 with length 1 -> 2.0; the barrier is 3 - 1
    assert ev.summary("loss")["arc_mean"] == pytest.approx(2.0)
    assert ev.barrier("loss") == pytest.approx(2.0)
    assert ev.barrier("error") == pytest.approx(0.5 - (0.1 + 0.2) / 2)
    back = PathEvaluation.from_dict(ev.to_dict())
    assert torch.equal(back.loss, ev.loss) and back.barrier("error") == ev.barrier("error")
    with pytest.raises(ConfigError, match="robust"):
        ev.values("robust_accuracy")


def test_named_splits_bn_reset_and_robust_accuracy():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    b = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    (_, _), (x, y) = _mlp_pair(2)
    train, test = (x[:60], y[:60]), (x[60:], y[60:])
    path = mc.LinearPath(a.state_dict(), b.state_dict())
    pgd = {"eps": 0.5, "step": 0.2, "steps": 3}
    ev = mc.evaluate_path(a, path, {"train": train, "test": test}, ts=3, robust=pgd, progress=False)
    assert ev.primary == "test" and set(ev.splits) == {"train", "test"}
    # the midpoint's BN statistics are recomputed on the train split (the default bn_data)
    mid = mc.reset_bn(with_state(a, path.state(0.5)), train)
    for split, d in (("train", train), ("test", test)):
        m = mc.evaluate(mid, d)
        assert ev.values("loss", split)[1].item() == pytest.approx(m.loss, rel=1e-5)
        r = mc.robust_evaluate(mid, d, pgd)
        assert ev.values("robust_accuracy", split)[1].item() == pytest.approx(r.accuracy)
    assert bool((ev.robust_accuracy <= ev.accuracy + 1e-12).all())
    assert ev.split("train").loss.tolist() == ev.values("loss", "train").tolist()
    d = ev.to_dict()
    assert set(d["splits"]["test"]["barrier"]) == {"loss", "error", "robust_loss", "robust_error"}
    # evaluating only the test split still recomputes the statistics on the train split
    only = mc.evaluate_path(a, path, {"train": train, "test": test}, ts=3, splits=["test"],
                            progress=False)
    assert only.splits == ["test"]
    assert only.loss[1].item() == pytest.approx(mc.evaluate(mid, test).loss, rel=1e-5)


def test_unsorted_ts_are_evaluated_in_order():
    (a, b), (x, y) = _mlp_pair(1)
    path = mc.LinearPath(a.state_dict(), b.state_dict())
    ev = mc.evaluate_path(a, path, (x, y), ts=5, progress=False)
    shuffled = mc.evaluate_path(a, path, (x, y), ts=[0.5, 1.0, 0.0, 0.75, 0.25], progress=False)
    assert shuffled.ts.tolist() == ev.ts.tolist()
    assert shuffled.barrier("loss") == pytest.approx(ev.barrier("loss"))
    assert shuffled.summary("loss")["arc_mean"] == pytest.approx(ev.summary("loss")["arc_mean"])


def test_load_rejects_a_damaged_path_file(tmp_path):
    from safetensors.torch import save_file

    file = mc.LinearPath(*_states(2)[:2]).save(tmp_path / "p.safetensors")
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata()
    save_file({"pointX.w": torch.zeros(2)}, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="damaged"):
        mc.load_path(tmp_path / "bad.safetensors")


def test_evaluate_path_checks_endpoints_and_validates_ts():
    (a, b), (x, y) = _mlp_pair()
    path = mc.LinearPath(a.state_dict(), b.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mc.evaluate_path(a, path, (x, y), ts=2, progress=False)  # no warning: endpoints exact
    ev = mc.evaluate_path(b, path, (x, y), ts=[0.5], progress=False)
    assert ev.endpoint_error is None  # not checked when 0 and 1 are not evaluated
    with pytest.raises(ConfigError, match="ts"):
        mc.evaluate_path(a, path, (x, y), ts=[2.0], progress=False)
