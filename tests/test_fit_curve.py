"""Curve fitting (Garipov et al. 2018): the loss it optimises, its schedule, hooks, resume."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modeconn as mc
from modeconn._src.errors import CheckpointError, ConfigError
from modeconn._src.paths import ControlPointCurve, garipov_schedule, initial_curve, train_curve


def _toy(seed: int = 0, dropout: float = 0.0):
    torch.manual_seed(seed)
    nets = [
        nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 4))
        for _ in range(2)
    ]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 6, generator=g)
    y = (x[:, :4].argmax(1) + (x[:, 4] > 1.0).long()) % 4
    return nets, (x, y)


def _equal_paths(p, q) -> bool:
    return all(torch.equal(a[k], b[k]) for a, b in zip(p.points, q.points, strict=True) for k in a)


def test_garipov_schedule():
    assert [garipov_schedule(e, 10) for e in (0, 4, 5)] == [1.0, 1.0, 1.0]
    assert garipov_schedule(7, 10) == pytest.approx(1 - 0.2 / 0.4 * 0.99)
    assert garipov_schedule(9, 10) == pytest.approx(0.01)
    assert garipov_schedule(90, 100) == pytest.approx(0.01)


def test_initial_bends_lie_on_the_segment_so_the_curve_starts_as_the_linear_path():
    (a, b), _ = _toy()
    for kind in ("bezier", "polychain"):
        curve = initial_curve(a, a.state_dict(), b.state_dict(), kind=kind, bends=2).to_path()
        line = mc.LinearPath(a.state_dict(), b.state_dict())
        for t in (0.2, 0.5, 0.9):
            for k, v in line.state(t).items():
                torch.testing.assert_close(curve.state(t)[k], v, atol=1e-6, rtol=0)


class _Recording(ControlPointCurve):
    """Records the t of every forward call (tests the reparametrisation hook too)."""

    def forward(self, t):
        self.seen = [*getattr(self, "seen", []), t]
        return super().forward(t)


def test_one_step_equals_sgd_on_ce_plus_half_wd_norm_of_theta_t():
    (a, b), (x, y) = _toy(1)
    sa, sb = a.state_dict(), b.state_dict()
    names = [n for n, _ in a.named_parameters()]
    bend = {k: 0.5 * (sa[k] + sb[k]) + 0.1 for k in sa}
    curve = _Recording("bezier", [sa, bend, sb], names)
    lr, wd = 0.3, 0.01
    train_curve(
        a, curve, (x, y), epochs=1, lr=lr, wd=wd, momentum=0.0, batch_size=len(x), progress=False
    )
    (t,) = curve.seen
    # Oracle: θ(t) = (1−t)²θ_A + 2t(1−t)θ_1 + t²θ_B; gradient by hand-written autograd on θ_1.
    m = {k: v.clone().requires_grad_(True) for k, v in bend.items()}
    theta = {k: (1 - t) ** 2 * sa[k] + 2 * t * (1 - t) * m[k] + t**2 * sb[k] for k in sa}
    loss = F.cross_entropy(torch.func.functional_call(a, theta, (x,)), y)
    loss = loss + 0.5 * wd * sum(v.pow(2).sum() for v in theta.values())
    loss.backward()
    got = curve.to_path().points[1]
    for k in sa:
        torch.testing.assert_close(got[k], bend[k] - lr * m[k].grad, atol=1e-6, rtol=1e-5)


def test_fit_keeps_endpoints_and_inputs_and_leaves_global_rng_alone():
    (a, b), data = _toy(2, dropout=0.2)
    before = [copy.deepcopy(n.state_dict()) for n in (a, b)]
    a.eval()
    rng = torch.get_rng_state()
    for kind in ("bezier", "polychain"):
        curve = mc.fit_curve(
            a, b, data, kind=kind, bends=2, epochs=2, lr=0.1, batch_size=32, progress=False
        )
        assert isinstance(curve, {"bezier": mc.BezierCurve, "polychain": mc.PolyChain}[kind])
        assert curve.num_points == 4 and len(curve.meta["history"]) == 2
        for s, p in ((before[0], curve.points[0]), (before[1], curve.points[-1])):
            assert all(torch.equal(s[k], p[k]) for k in s)
        line = initial_curve(a, before[0], before[1], kind=kind, bends=2).to_path()
        assert not torch.equal(curve.points[1]["0.weight"], line.points[1]["0.weight"])
    assert torch.equal(torch.get_rng_state(), rng)
    assert not a.training
    for n, s in zip((a, b), before, strict=True):
        assert all(torch.equal(n.state_dict()[k], s[k]) for k in s)
    free = mc.fit_curve(a, b, data, bends=1, epochs=1, fix_endpoints=False, progress=False)
    assert not torch.equal(free.points[0]["0.weight"], before[0]["0.weight"])


def test_same_seed_same_curve_other_seed_other_curve():
    (a, b), data = _toy(3, dropout=0.2)
    kw = dict(epochs=2, lr=0.1, batch_size=32, progress=False)
    c1, c2 = (mc.fit_curve(a, b, data, seed=0, **kw) for _ in range(2))
    assert _equal_paths(c1, c2)
    assert not _equal_paths(c1, mc.fit_curve(a, b, data, seed=1, **kw))


def test_kill_and_resume_gives_the_uninterrupted_curve_bit_for_bit(tmp_path):
    (a, b), data = _toy(4, dropout=0.2)
    kw = dict(kind="bezier", bends=2, epochs=5, lr=0.1, batch_size=32, seed=7, progress=False)
    full = mc.fit_curve(a, b, data, **kw)

    class Killed(Exception):
        pass

    def kill_after_two(epoch, record):
        if epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        mc.fit_curve(a, b, data, checkpoint_dir=tmp_path, callback=kill_after_two, **kw)
    assert (tmp_path / "fit_state.pt").is_file()
    seen = []
    resumed = mc.fit_curve(
        a, b, data, checkpoint_dir=tmp_path, resume=True, callback=lambda e, r: seen.append(e), **kw
    )
    assert seen == [2, 3, 4]  # only the remaining epochs ran
    assert _equal_paths(full, resumed)
    assert resumed.meta["history"] == full.meta["history"]
    with pytest.raises(CheckpointError, match="different settings"):
        mc.fit_curve(a, b, data, checkpoint_dir=tmp_path, resume=True, **{**kw, "lr": 0.2})


def test_hooks_input_transform_and_after_step():
    (a, b), data = _toy(5)
    kw = dict(epochs=1, lr=0.1, batch_size=32, progress=False)
    calls = []

    def identity(model_fn, x, y):
        out = model_fn(x)
        assert out.shape == (len(x), 4) and not out.requires_grad  # detached weights
        calls.append(len(x))
        return x

    plain = mc.fit_curve(a, b, data, **kw)
    hooked = mc.fit_curve(a, b, data, input_transform=identity, **kw)
    assert calls == [32, 32, 32] and _equal_paths(plain, hooked)

    def pgd(model_fn, x, y):
        return mc.pgd_attack(model_fn, x, y, eps=0.3, step=0.1, steps=2)

    robust = mc.fit_curve(a, b, data, input_transform=pgd, **kw)
    assert robust.meta["fit"]["adversarial"] and not _equal_paths(plain, robust)
    steps = []
    curve = initial_curve(a, a.state_dict(), b.state_dict())
    train_curve(a, curve, data, after_step=lambda c, opt: steps.append(c is curve), **kw)
    assert steps == [True, True, True]


def test_batchnorm_model_trains_with_batch_statistics(mnist1d_splits):
    a = mc.models.create("mlp", width=32, norm="bn", seed=0)
    b = mc.models.create("mlp", width=32, norm="bn", seed=1)
    x, y = mnist1d_splits.tensors("train")
    data = (x[:512], y[:512])
    curve = mc.fit_curve(a, b, data, epochs=1, progress=False)
    assert curve.meta["model"]["name"] == "mlp"
    ev = mc.evaluate_path(a, curve, data, ts=3, progress=False)
    assert ev.endpoint_error <= 1e-4 and ev.meta["bn_reset"]
    assert bool(torch.isfinite(ev.loss).all())


def test_frozen_parameters_follow_the_curve_during_training():
    (a, b), (x, y) = _toy(6)
    for net in (a, b):
        net[0].bias.requires_grad_(False)
    curve = initial_curve(a, a.state_dict(), b.state_dict(), bends=1)
    theta = curve(0.25)  # the network trained at t is the network path.state(t) gives
    want = mc.BezierCurve([a.state_dict(), curve.to_path().points[1], b.state_dict()]).state(0.25)
    torch.testing.assert_close(theta["0.bias"], want["0.bias"], atol=1e-6, rtol=0)
    assert not theta["0.bias"].requires_grad and theta["0.weight"].requires_grad
    fitted = mc.fit_curve(a, b, (x, y), epochs=1, batch_size=32, progress=False)
    mid = 0.5 * (a.state_dict()["0.bias"] + b.state_dict()["0.bias"])
    torch.testing.assert_close(fitted.points[1]["0.bias"], mid, atol=1e-6, rtol=0)


def test_bad_options_are_refused():
    (a, b), data = _toy()
    with pytest.raises(ConfigError, match="kind"):
        mc.fit_curve(a, b, data, kind="spline")
    with pytest.raises(ConfigError, match="align"):
        mc.fit_curve(a, b, data, align="magic")
    with pytest.raises(ConfigError, match="bends"):
        mc.fit_curve(a, b, data, bends=0)
    with pytest.raises(ConfigError, match="bends"):
        mc.fit_curve(a, b, data, bends=-1, fix_endpoints=False)
    with pytest.raises(ConfigError, match="batch_size"):
        mc.fit_curve(a, b, data, batch_size=0)
    with pytest.raises(ConfigError, match="epochs"):
        mc.fit_curve(a, b, data, epochs=0)


@pytest.mark.slow
def test_learned_bezier_beats_the_linear_path_on_mnist1d(trained, mnist1d_splits):
    a, b = trained("mlp", seed=0), trained("mlp", seed=1)
    test = mnist1d_splits.test
    line = mc.evaluate_path(
        a, mc.LinearPath(a.state_dict(), b.state_dict()), test, ts=11, progress=False
    )
    curve = mc.fit_curve(a, b, mnist1d_splits, epochs=3, progress=False)
    ev = mc.evaluate_path(a, curve, test, ts=11, progress=False)
    # Measured (10-epoch endpoints, 3 curve epochs, 2 seed pairs): linear max loss 2.56 and
    # barrier 1.40; curve max loss 1.37 and barrier 0.21.
    assert ev.loss.max() < 0.65 * line.loss.max()
    assert ev.barrier("loss") < 0.35 * line.barrier("loss")
    assert ev.summary("accuracy")["min"] > line.summary("accuracy")["min"] + 0.2


def test_weight_aligned_curve_ends_at_a_permuted_copy_of_b(trained, mnist1d_splits):
    a, b = trained("mlp", seed=0), trained("mlp", seed=1)
    curve = mc.fit_curve(a, b, mnist1d_splits, align="weight", epochs=1, progress=False)
    assert curve.meta["fit"]["align"] == "weight"
    end = curve.points[-1]
    x, _ = mnist1d_splits.tensors("test")
    with torch.no_grad():
        torch.testing.assert_close(
            torch.func.functional_call(a, end, (x,)), b(x), atol=1e-4, rtol=0
        )
    assert not torch.equal(end["layers.0.weight"], b.state_dict()["layers.0.weight"])
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in curve.points[0].items())
