"""Landscapes: the plane through three models, filter-normalised slices, monotonic interpolation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import modeconn as mc
from modeconn._src.errors import ConfigError, IncompatibleModelsError
from modeconn._src.evaluation import with_state
from modeconn._src.landscape import (
    PlaneBasis,
    evaluate_state,
    filter_normalized_direction,
    largest_bump,
    monotonic_interpolation,
    plane,
    plot_plane,
    random_slice,
)


def _net(seed: int, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    norm = [nn.BatchNorm1d(12)] if bn else []
    layers = [nn.Linear(5, 12), *norm, nn.ReLU(), nn.Linear(12, 3)]
    return nn.Sequential(*layers)


def _data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def _vec(state, names):
    return torch.cat([state[n].reshape(-1).double() for n in names])


def test_plane_points_sit_at_their_coordinates_and_losses_match() -> None:
    nets = [_net(s) for s in range(3)]
    states = [n.state_dict() for n in nets]
    before = [{k: v.clone() for k, v in s.items()} for s in states]
    data = _data()
    res = plane(nets[0], states, data, grid=(4, 3), margin=0.25, progress=False)
    assert res.loss.shape == (3, 4) and res.accuracy.shape == (3, 4)
    names = [n for n, _ in nets[0].named_parameters()]
    # oracle: Gram-Schmidt with plain vector algebra
    v0, v1, v2 = (_vec(s, names) for s in states)
    e1 = (v1 - v0) / (v1 - v0).norm()
    w = v2 - v0 - ((v2 - v0) @ e1) * e1
    e2 = w / w.norm()
    expect = torch.stack([torch.stack([(v - v0) @ e1, (v - v0) @ e2]) for v in (v0, v1, v2)])
    assert torch.allclose(res.points, expect, atol=1e-9)
    assert abs(float(res.basis.e1 @ res.basis.e2)) < 1e-12
    for i, (net, s) in enumerate(zip(nets, states, strict=True)):
        x, y, dist = res.basis.coordinates(s)
        assert math.isclose(x, float(expect[i, 0]), abs_tol=1e-9)
        assert math.isclose(y, float(expect[i, 1]), abs_tol=1e-9)
        assert dist < 1e-9
        at = res.basis.state(x, y)
        for k in s:
            torch.testing.assert_close(at[k], s[k], atol=1e-6, rtol=0)
        got = mc.evaluate(nets[0], data, state=at)
        ref = mc.evaluate(net, data)
        assert math.isclose(got.loss, ref.loss, rel_tol=1e-5) and got.accuracy == ref.accuracy
    # a grid cell equals the model at theta0 + x e1 + y e2 built independently
    j, i = 2, 3
    theta = v0 + res.xs[i] * e1 + res.ys[j] * e2
    sd, off = {}, 0
    for n in names:
        sd[n] = theta[off : off + states[0][n].numel()].view_as(states[0][n]).float()
        off += states[0][n].numel()
    ref = mc.evaluate(nets[0], data, state=sd)
    assert math.isclose(float(res.loss[j, i]), ref.loss, rel_tol=1e-5)
    # the grid covers the three points with the margin
    assert res.xs[0] < res.points[:, 0].min() and res.xs[-1] > res.points[:, 0].max()
    assert res.ys[0] < 0 and res.ys[-1] > res.points[:, 1].max()
    for s, b in zip(states, before, strict=True):
        assert all(torch.equal(s[k], b[k]) for k in s)


def test_plane_projects_a_curve_and_bn_points_match_after_reset() -> None:
    nets = [_net(s, bn=True) for s in range(3)]
    data = _data(96)
    for n in nets:  # give each net its own BN statistics
        n.train()
        with torch.no_grad():
            n(data[0] + 0.3 * n[0].bias.sum())
    states = [n.state_dict() for n in nets]
    curve = mc.BezierCurve(states)
    res = plane(nets[0], states, data, grid=3, bn_data=data, curve=curve, curve_points=5,
                progress=False)
    assert res.curve is not None and res.curve.shape == (5, 2)
    # a Bezier curve over the three points lies in their plane
    assert float(res.curve_distance.max()) < 1e-4
    torch.testing.assert_close(res.curve[0], res.points[0])
    torch.testing.assert_close(res.curve[-1], res.points[2])
    # with bn_data every grid point is evaluated after an exact BN reset
    j, i = 1, 2
    ref = mc.evaluate(mc.reset_bn(with_state(nets[0], res.basis.state(res.xs[i], res.ys[j])), data),
                      data)
    assert math.isclose(float(res.loss[j, i]), ref.loss, rel_tol=1e-5)
    # and at model 1's coordinates that is model 1 with recomputed statistics
    x1, y1 = res.points[1].tolist()
    got = evaluate_state(nets[0], res.basis.state(x1, y1), data, bn_data=data)
    want = mc.evaluate(mc.reset_bn(nets[1], data), data)
    assert math.isclose(got.loss, want.loss, rel_tol=1e-4) and got.accuracy == want.accuracy
    assert not math.isclose(got.loss, mc.evaluate(nets[1], data).loss, rel_tol=1e-3)


def test_plane_rejects_collinear_and_wrong_counts() -> None:
    net = _net(0)
    s0 = net.state_dict()
    s1 = {k: v * 2 for k, v in s0.items()}
    s2 = {k: v * 3 for k, v in s0.items()}
    with pytest.raises(IncompatibleModelsError, match="collinear"):
        PlaneBasis([s0, s1, s2], [n for n, _ in net.named_parameters()])
    with pytest.raises(ConfigError, match="three"):
        plane(net, [s0, s1], _data(), progress=False)


def test_filter_normalisation_norms_match() -> None:
    conv = nn.Conv2d(3, 6, 3)
    lin = nn.Linear(7, 4)
    state = {"c.weight": conv.weight.detach(), "c.bias": conv.bias.detach(),
             "l.weight": lin.weight.detach(), "l.bias": lin.bias.detach()}
    d = filter_normalized_direction(state, seed=3)
    for k in ("c.weight", "l.weight"):
        want = state[k].reshape(state[k].shape[0], -1).norm(dim=1)
        got = d[k].reshape(d[k].shape[0], -1).norm(dim=1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        assert not torch.allclose(d[k], state[k])  # random, not a copy
    assert float(d["c.bias"].abs().sum()) == 0.0 and float(d["l.bias"].abs().sum()) == 0.0
    d2 = filter_normalized_direction(state, seed=3, ignore_bias_bn=False)
    torch.testing.assert_close(d2["l.bias"], state["l.bias"])
    assert torch.equal(d2["c.weight"], d["c.weight"])  # same seed, same direction


def test_random_slice_centre_is_the_model_and_directions_are_used() -> None:
    net = _net(1)
    data = _data()
    ref = mc.evaluate(net, data)
    r1 = random_slice(net, net.state_dict(), data, dims=1, steps=5, span=0.5, progress=False)
    assert math.isclose(float(r1.loss[2]), ref.loss, rel_tol=1e-5)
    assert not math.isclose(float(r1.loss[0]), ref.loss, rel_tol=1e-3)
    # the point alpha = alphas[4] is state + alpha * d
    d = r1.directions[0]
    a4 = float(r1.alphas[4])
    moved = {k: v + a4 * d[k] if k in d else v for k, v in net.state_dict().items()}
    assert math.isclose(float(r1.loss[4]), mc.evaluate(net, data, state=moved).loss, rel_tol=1e-5)
    r2 = random_slice(net, net.state_dict(), data, dims=2, steps=3, progress=False)
    assert r2.loss.shape == (3, 3) and r2.betas is not None
    assert math.isclose(float(r2.loss[1, 1]), ref.loss, rel_tol=1e-5)
    with pytest.raises(ConfigError):
        random_slice(net, net.state_dict(), data, dims=3, progress=False)


def test_mli_closed_form_bump() -> None:
    # logits (w, 0); a point of class 0 and one of class 1 at x = 1: L(w) is minimal at w = 0.
    # The line from w = -2 to w = 1 goes down to w = 0 (t = 2/3), then rises by L(1) - L(0).
    net = nn.Linear(1, 2, bias=False)
    s_init = {"weight": torch.tensor([[-2.0], [0.0]])}
    s_final = {"weight": torch.tensor([[1.0], [0.0]])}
    data = (torch.ones(2, 1), torch.tensor([0, 1]))

    def L(w: float) -> float:
        return 0.5 * (math.log1p(math.exp(-w)) + math.log1p(math.exp(w)))

    r = monotonic_interpolation(net, s_init, s_final, data, ts=7, progress=False)
    for t, loss in zip(r.ts.tolist(), r.loss.tolist(), strict=True):
        assert math.isclose(loss, L(-2 + 3 * t), rel_tol=1e-5)
    assert not r.monotonic
    assert math.isclose(r.max_bump, L(1.0) - L(0.0), rel_tol=1e-4)
    assert r.bump_t == 1.0
    # from w = -2 to w = 0 the loss decreases monotonically
    r2 = monotonic_interpolation(net, s_init, {"weight": torch.zeros(2, 1)}, data, ts=9,
                                 progress=False)
    assert r2.monotonic and r2.max_bump == 0.0 and r2.bump_t is None
    assert monotonic_interpolation(net, s_init, s_final, data, ts=7, tol=1.0,
                                   progress=False).monotonic


def test_largest_bump_against_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 5, 12):
        v = torch.randn(n, generator=g, dtype=torch.float64)
        brute = max([0.0] + [float(v[j] - v[i]) for j in range(n) for i in range(j)])
        assert math.isclose(largest_bump(v)[0], brute, abs_tol=1e-12)


def test_public_namespace() -> None:
    assert mc.landscape.plane is plane and mc.landscape.random_slice is random_slice
    assert mc.landscape.monotonic_interpolation is monotonic_interpolation


def test_plot_plane_writes_atomically(tmp_path) -> None:
    nets = [_net(s) for s in range(3)]
    res = plane(nets[0], [n.state_dict() for n in nets], _data(), grid=3, progress=False)
    out = tmp_path / "sub" / "plane.png"
    plot_plane(res, out, title="t")
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in out.parent.iterdir()] == ["plane.png"]
    plot_plane(res, tmp_path / "err.png", metric="error")
    with pytest.raises(ConfigError):
        plot_plane(res, tmp_path / "x.png", metric="nope")
