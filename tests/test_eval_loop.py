"""One evaluation loop (evaluation.evaluate) and one interpolation (state.combine), used by all."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modeconn as mc
from modeconn._src.evaluation import Batches, StateRunner, cache_batches, evaluate, with_state
from modeconn._src.norm import reset_bn
from modeconn._src.paths.evaluate import _segment_lengths
from modeconn._src.state import combine, lerp


def _data(n: int = 50, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, 3, (n,), generator=g)


def _bn_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _direct(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Oracle: the whole set in one forward pass, float64 loss."""
    net.eval()
    with torch.no_grad():
        out = net(x).double()
    return float(F.cross_entropy(out, y)), float((out.argmax(-1) == y).double().mean())


def test_cached_batches_give_the_metrics_of_the_raw_data():
    x, y = _data()
    net = nn.Linear(6, 3)
    batches = cache_batches((x, y), batch_size=16)
    assert isinstance(batches, Batches) and [len(b[1]) for b in batches] == [16, 16, 16, 2]
    assert cache_batches(batches) is batches  # already on the device: not copied
    loss, acc = _direct(net, x, y)
    for data in ((x, y), batches, torch.utils.data.TensorDataset(x, y)):
        m = evaluate(net, data, batch_size=16)
        assert m.loss == pytest.approx(loss, rel=1e-6) and m.accuracy == pytest.approx(acc)
        assert m.n == 50


def test_on_output_sees_every_batch_once():
    x, y = _data()
    seen: list[tuple[int, int]] = []
    evaluate(
        nn.Linear(6, 3), (x, y), batch_size=20, on_output=lambda i, o, t: seen.append((i, len(t)))
    )
    assert seen == [(0, 20), (1, 20), (2, 10)]


def test_state_runner_equals_a_fresh_model_per_state_with_and_without_bn():
    x, y = _data()
    bn_x = _data(64, seed=1)
    template = _bn_net(0)
    states = [_bn_net(s).state_dict() for s in (1, 2)]
    run = StateRunner(template, bn_data=bn_x, batch_size=16)
    batches = cache_batches((x, y), batch_size=16)
    for st in states:
        fresh = reset_bn(with_state(template, st), bn_x)
        loss, acc = _direct(fresh, x, y)
        m = run(st, batches)
        assert m.loss == pytest.approx(loss, rel=1e-5) and m.accuracy == pytest.approx(acc)
    # without bn_data: the states' own statistics, through functional_call
    plain = StateRunner(template)
    for st in states:
        loss, acc = _direct(with_state(template, st), x, y)
        assert plain(st, (x, y)).loss == pytest.approx(loss, rel=1e-5)
    assert all(torch.equal(v, _bn_net(0).state_dict()[k]) for k, v in template.state_dict().items())


# --- the one interpolation ----------------------------------------------------------------------
def _states(k: int, dtype=torch.float32) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(k)
    return [{"w": torch.randn(4, 5, generator=g).to(dtype), "n": torch.tensor(i)} for i in range(k)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_combine_is_the_float64_weighted_sum_up_to_rounding(dtype):
    for k, w in ((2, [0.3, 0.7]), (3, [0.25, 0.5, 0.25]), (3, [1.0, -0.4, 2.5])):
        states = _states(k, dtype)
        out = combine(states, w)
        want = sum(c * s["w"].double() for c, s in zip(w, states, strict=True))
        tol = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 2e-2}[dtype]
        assert out["w"].dtype == dtype
        torch.testing.assert_close(out["w"].double(), want, rtol=tol, atol=tol)
        assert int(out["n"]) == 0  # non-float tensors from state 0


def test_combine_reproduces_a_state_bit_for_bit_and_skips_zero_weights():
    a, b, c = _states(3)
    b["w"][0, 0] = float("inf")  # weight 0: never touched (0 * inf would be NaN)
    for w, src in (([1.0, 0.0, 0.0], a), ([0.0, 0.0, 1.0], c)):
        assert torch.equal(combine([a, b, c], w)["w"], src["w"])
    assert torch.equal(lerp(a, c, 0.0)["w"], a["w"]) and torch.equal(lerp(a, c, 1.0)["w"], c["w"])
    assert int(lerp(a, c, 0.75)["n"]) == 2  # integer tensors from the nearer end


def test_combine_is_differentiable_for_curve_objectives():
    a, b, c = _states(3)
    for st in (a, b, c):
        st["w"].requires_grad_(True)
    for w in ([0.5, 0.5, 0.0], [0.2, 0.3, 0.5]):
        out = combine([a, b, c], w)["w"].sum()
        grads = torch.autograd.grad(out, [a["w"], b["w"], c["w"]], allow_unused=True)
        for g, c_i in zip(grads, w, strict=True):
            if c_i == 0.0:
                assert g is None
            else:
                torch.testing.assert_close(g, torch.full((4, 5), c_i))


@pytest.mark.parametrize("kind", ["linear", "bezier", "polychain"])
def test_segment_lengths_equal_the_distances_between_built_states(kind):
    n = 2 if kind == "linear" else 4
    pts = [{"w": torch.randn(30).double(), "b": torch.randn(3).double()} for _ in range(n)]
    path = (
        mc.LinearPath(*pts)
        if kind == "linear"
        else (mc.BezierCurve(pts) if kind == "bezier" else mc.PolyChain(pts))
    )
    ts = torch.tensor([0.0, 0.1, 0.45, 0.5, 0.9, 1.0], dtype=torch.float64)
    got = _segment_lengths(path, ts, ["w", "b"])
    st = [path.state(float(t)) for t in ts]
    want = [0.0] + [
        float(sum((st[i][k].double() - st[i - 1][k].double()).pow(2).sum() for k in ("w", "b")))
        ** 0.5
        for i in range(1, len(ts))
    ]
    assert got.tolist() == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_curve_ensemble_streams_members_and_equals_the_listed_ensemble():
    x, y = _data()
    net = nn.Linear(6, 3)
    pts = [{k: v + i for k, v in net.state_dict().items()} for i in range(3)]
    path = mc.BezierCurve(pts)
    ts = [0.0, 0.3, 1.0]
    listed = mc.evaluate_ensemble(net, [path.state(t) for t in ts], (x, y), batch_size=16)
    streamed = mc.evaluate_ensemble(net, (path.state(t) for t in ts), (x, y), batch_size=16)
    curve = mc.curve_ensemble(net, path, (x, y), ts=ts, batch_size=16)
    assert listed.to_dict() == streamed.to_dict()
    assert curve.accuracy == listed.accuracy and curve.loss == pytest.approx(listed.loss)
    # oracle: average of the members' softmax, computed directly
    probs = torch.stack(
        [torch.func.functional_call(net, path.state(t), (x,)).double().softmax(-1) for t in ts]
    ).mean(0)
    assert listed.loss == pytest.approx(float(-probs[torch.arange(50), y].log().mean()), rel=1e-6)
    with pytest.raises(mc.ConfigError):
        mc.evaluate_ensemble(net, iter([]), (x, y))
