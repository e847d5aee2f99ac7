"""Curve ensembles and fast geometric ensembling (Garipov et al. 2018)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modeconn as mc
from modeconn._src.errors import ConfigError
from modeconn._src.paths.ensemble import curve_ensemble, evaluate_ensemble, fge, fge_lr
from modeconn._src.train import train as train_model


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))


def _data(n: int = 80, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, :4].argmax(1) + (x[:, 4] > 1.5).long()) % 4  # learnable, a little noisy
    return x, y


def test_curve_ensemble_of_identical_points_is_the_model() -> None:
    net = _net(0)
    data = _data()
    path = mc.LinearPath(net.state_dict(), net.state_dict())
    res = curve_ensemble(net, path, data, ts=4)
    ref = mc.evaluate(net, data)
    assert res.ts == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert res.accuracy == ref.accuracy
    assert math.isclose(res.loss, ref.loss, rel_tol=1e-5)
    assert res.member_accuracies == [ref.accuracy] * 4
    assert all(math.isclose(v, ref.loss, rel_tol=1e-5) for v in res.member_losses)


def test_ensemble_matches_a_hand_averaged_softmax() -> None:
    nets = [_net(s) for s in range(3)]
    x, y = _data()
    with torch.no_grad():
        probs = torch.stack([F.softmax(n(x).double(), -1) for n in nets]).mean(0)
    acc = float((probs.argmax(1) == y).double().mean())
    nll = float(-probs[torch.arange(len(y)), y].log().mean())
    # a shuffling loader: predictions must still be matched to the right targets
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True,
        generator=torch.Generator().manual_seed(1),
    )
    res = evaluate_ensemble(nets[0], [n.state_dict() for n in nets], loader)
    assert math.isclose(res.accuracy, acc, abs_tol=1e-12)
    assert math.isclose(res.loss, nll, rel_tol=1e-9)
    for n, a in zip(nets, res.member_accuracies, strict=True):
        assert a == mc.evaluate(n, (x, y)).accuracy
    # Jensen: the NLL of the averaged softmax is at most the members' mean NLL
    assert res.loss <= sum(res.member_losses) / 3 + 1e-12
    with pytest.raises(ConfigError):
        evaluate_ensemble(nets[0], [], (x, y))


def test_curve_ensemble_on_bezier_uses_the_curve_points() -> None:
    nets = [_net(s) for s in range(3)]
    data = _data()
    curve = mc.BezierCurve([n.state_dict() for n in nets])
    res = curve_ensemble(nets[0], curve, data, ts=[0.0, 0.5, 1.0])
    ref = evaluate_ensemble(nets[0], [curve.state(t) for t in (0.0, 0.5, 1.0)], data)
    assert res.accuracy == ref.accuracy and math.isclose(res.loss, ref.loss, rel_tol=1e-12)
    assert res.member_accuracies[0] == mc.evaluate(nets[0], data).accuracy
    assert res.member_accuracies[2] == mc.evaluate(nets[2], data).accuracy
    with pytest.raises(ConfigError):
        curve_ensemble(nets[0], curve, data, ts=[1.5])


def test_fge_lr_schedule() -> None:
    c = 10
    lrs = [fge_lr(i, c, 0.1, 0.001) for i in range(2 * c + 1)]
    assert lrs[0] == pytest.approx(0.001) and lrs[c] == pytest.approx(0.001)
    assert lrs[c // 2] == pytest.approx(0.1) and max(lrs) == pytest.approx(0.1)
    assert lrs[: c // 2 + 1] == sorted(lrs[: c // 2 + 1])  # rises, then falls
    assert lrs[c // 2 : c + 1] == sorted(lrs[c // 2 : c + 1], reverse=True)


def test_fge_snapshots_count_and_ensemble() -> None:
    net = _net(0)
    train = _data(160, seed=1)
    test = _data(160, seed=2)
    base = train_model(net, train, epochs=15, lr=0.1, seed=0, progress=False).model
    before = {k: v.clone() for k, v in base.state_dict().items()}
    snaps = fge(base, train, cycles=3, cycle_epochs=2, lr_max=0.1, lr_min=0.001, batch_size=32,
                progress=False)
    assert len(snaps) == 3
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())  # not mutated
    for a, b in zip(snaps, snaps[1:], strict=False):  # each cycle moved the weights
        assert not torch.equal(a["0.weight"], b["0.weight"])
    again = fge(base, train, cycles=3, cycle_epochs=2, lr_max=0.1, lr_min=0.001, batch_size=32,
                progress=False)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(snaps, again, strict=True) for k in a)
    res = evaluate_ensemble(base, snaps, test)
    assert len(res.member_accuracies) == 3
    assert res.loss <= sum(res.member_losses) / 3 + 1e-12
    with pytest.raises(ConfigError):
        fge(base, train, cycles=0, progress=False)


def test_curve_ensemble_resets_batchnorm_per_point() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    data = _data()
    path = mc.LinearPath(net.state_dict(), net.state_dict())  # fresh BN stats: mean 0, var 1
    res = curve_ensemble(net, path, data, ts=2, bn_data=data)
    want = mc.evaluate(mc.reset_bn(net, data), data)
    assert math.isclose(res.member_losses[0], want.loss, rel_tol=1e-5)
    assert math.isclose(res.loss, want.loss, rel_tol=1e-5)
    stale = curve_ensemble(net, path, data, ts=2)  # without bn_data the stored statistics are used
    assert not math.isclose(stale.loss, want.loss, rel_tol=1e-3)
