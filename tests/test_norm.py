"""Tests of BatchNorm reset and REPAIR (Jordan et al. ICLR 2023; Git Re-Basin's BN reset)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import modeconn as mc
from modeconn._src.errors import ConfigError, DataError
from modeconn._src.evaluation import evaluate, with_state
from modeconn._src.norm import needs_bn_reset, repair, reset_bn, reset_bn_state
from modeconn._src.state import lerp


# --- helpers ------------------------------------------------------------------------------------
def mlp_spec(model: nn.Module) -> mc.PermutationSpec:
    """Hand-written spec of the zoo MLP (optionally with BatchNorm), git re-basin style."""
    depth = len(model.layers)
    width = model.layers[0].out_features
    bn = isinstance(model.norms[0], nn.BatchNorm1d)
    axes: dict[str, tuple[str | None, ...]] = {}
    for i in range(depth):
        axes[f"layers.{i}.weight"] = (f"h{i}", f"h{i - 1}" if i else None)
        axes[f"layers.{i}.bias"] = (f"h{i}",)
        if bn:
            for k in ("weight", "bias", "running_mean", "running_var"):
                axes[f"norms.{i}.{k}"] = (f"h{i}",)
    axes["head.weight"] = (None, f"h{depth - 1}")
    return mc.PermutationSpec.from_axes({f"h{i}": width for i in range(depth)}, axes)


def aligned_pair(trained, **kw):
    a, b = trained("mlp", seed=0, **kw), trained("mlp", seed=1, **kw)
    spec = mlp_spec(a)
    perm = mc.weight_matching(spec, a.state_dict(), b.state_dict())
    return a, with_state(b, mc.apply_permutation(spec, perm, b.state_dict()))


def midpoint(a: nn.Module, b: nn.Module, alpha: float = 0.5) -> nn.Module:
    return with_state(a, lerp(a.state_dict(), b.state_dict(), alpha))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor], training: bool) -> None:
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert model.training == training


def unit_stats(model: nn.Module, layer: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Oracle: mean/std (population) of a layer's outputs over all of x, channel = conv axis 1."""
    mod = dict(model.named_modules())[layer]
    out = []
    h = mod.register_forward_hook(lambda m, a, o: out.append(o.detach()))
    model.eval()
    with torch.no_grad():
        model(x)
    h.remove()
    o = out[0].double()
    o = o.movedim(1, -1) if isinstance(mod, nn.Conv2d) else o
    o = o.reshape(-1, o.shape[-1])
    return o.mean(0), o.std(0, unbiased=False)


class TwoBN(nn.Module):
    """Linear -> BN1d -> ReLU -> Linear -> BN1d (on tokens' channel axis 1) -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(5, 8), nn.BatchNorm1d(8)
        self.fc2, self.bn2 = nn.Linear(8, 6), nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.fc1(x)))
        h = self.bn2(self.fc2(self.drop(h)))
        return self.head(h)


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


# --- reset_bn -----------------------------------------------------------------------------------
@pytest.mark.parametrize("make, shape", [(TwoBN, (5,)), (ConvBN, (2, 6, 6))])
def test_reset_bn_equals_full_dataset_statistics(make, shape):
    torch.manual_seed(0)
    net = make()
    net.train()  # the input's mode must survive; its running stats are stale (zeros / ones)
    x = torch.randn(300, *shape) * 3 + 1.5
    y = torch.zeros(300, dtype=torch.long)
    before = snapshot(net)
    fresh = reset_bn(net, (x, y), batch_size=64)  # uneven batches: 4 x 64 + 44
    assert_untouched(net, before, training=True)
    assert fresh is not net and not fresh.training

    # oracle: the BN inputs of the same forward passes (BN in batch-statistics mode, dropout off),
    # captured by hooks, pooled over the whole dataset, with torch.mean / torch.var
    ref = copy.deepcopy(net).eval()
    bns = {n: m for n, m in ref.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in bns}
    for n, m in bns.items():
        m.train()
        m.register_forward_pre_hook(lambda mod, a, n=n: seen[n].append(a[0].movedim(1, -1)))
    with torch.no_grad():
        for i in range(0, 300, 64):
            ref(x[i : i + 64])
    mods = dict(fresh.named_modules())
    for n in bns:
        z = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen[n]]).double()
        torch.testing.assert_close(mods[n].running_mean.double(), z.mean(0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mods[n].running_var.double(), z.var(0), atol=1e-5, rtol=1e-5)
        assert int(mods[n].num_batches_tracked) == 5
        assert mods[n].momentum == 0.1


def test_reset_bn_first_layer_matches_closed_form():
    # the first BN's input does not depend on other BNs: its statistics are those of fc1(x)
    torch.manual_seed(1)
    net = TwoBN()
    x = torch.randn(257, 5) * 2
    fresh = reset_bn(net, (x, torch.zeros(257, dtype=torch.long)), batch_size=50, max_batches=3)
    with torch.no_grad():
        z = net.fc1(x[:150]).double()
    torch.testing.assert_close(fresh.bn1.running_mean.double(), z.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fresh.bn1.running_var.double(), z.var(0), atol=1e-5, rtol=1e-5)


def test_reset_bn_without_bn_is_a_plain_copy():
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(20, 4)
    fresh = reset_bn(net, (x, torch.zeros(20, dtype=torch.long)))
    assert fresh is not net and not needs_bn_reset(net)
    assert torch.equal(fresh(x), net(x))
    state = net.state_dict()
    assert reset_bn_state(net, state, (x, torch.zeros(20))) == state


def test_reset_bn_state_is_functional():
    torch.manual_seed(2)
    net = TwoBN()
    state = {k: v + 0.1 if v.is_floating_point() else v for k, v in net.state_dict().items()}
    before = {k: v.clone() for k, v in state.items()}
    x, y = torch.randn(128, 5), torch.zeros(128, dtype=torch.long)
    new = reset_bn_state(net, state, (x, y))
    assert all(torch.equal(state[k], v) for k, v in before.items())
    expected = reset_bn(with_state(net, state), (x, y)).state_dict()
    assert all(torch.equal(new[k], expected[k]) for k in expected)
    assert needs_bn_reset(net)


def test_reset_bn_bad_input():
    net = TwoBN()
    with pytest.raises(DataError):
        reset_bn(net, (torch.randn(1, 5), torch.zeros(1, dtype=torch.long)))
    with pytest.raises(ConfigError):
        reset_bn(net, (torch.randn(8, 5), torch.zeros(8, dtype=torch.long)), max_batches=0)


@pytest.mark.slow
def test_reset_bn_repairs_an_aligned_bn_midpoint(trained, mnist1d_splits):
    a, b = aligned_pair(trained, norm="bn")
    mid = midpoint(a, b)
    before = evaluate(mid, mnist1d_splits.test)
    after = evaluate(reset_bn(mid, mnist1d_splits.train), mnist1d_splits.test)
    # measured: accuracy 0.49 -> 0.62, loss 1.43 -> 0.98
    assert after.accuracy > before.accuracy + 0.05
    assert after.loss < before.loss - 0.2


# --- REPAIR -------------------------------------------------------------------------------------
def conv_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.ReLU(),
        nn.Flatten(), nn.Linear(5 * 4 * 4, 3),
    )


def token_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 7), nn.ReLU(), nn.Flatten(), nn.Linear(35, 3)
    )


@pytest.mark.parametrize(
    "make, shape, layers",
    [(conv_net, (2, 6, 6), ["0", "2"]), (token_net, (5, 4), ["0", "2"])],
)
@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_repair_reaches_goal_statistics(make, shape, layers, alpha):
    a, b = make(0), make(1)
    merged = midpoint(a, b, alpha)
    x = torch.randn(200, *shape)
    data = (x, torch.zeros(200, dtype=torch.long))
    before = snapshot(merged)
    fixed = repair(a, b, merged, data, alpha=alpha, batch_size=64, eps=0.0)  # eps=0: exact
    assert_untouched(merged, before, training=True)
    assert fixed.modeconn_repaired == layers  # the logits layer is left alone
    for name in layers:
        mu_a, sd_a = unit_stats(a, name, x)
        mu_b, sd_b = unit_stats(b, name, x)
        mu, sd = unit_stats(fixed, name, x)
        torch.testing.assert_close(mu, (1 - alpha) * mu_a + alpha * mu_b, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(sd, (1 - alpha) * sd_a + alpha * sd_b, atol=1e-4, rtol=1e-3)
        mu_m, sd_m = unit_stats(merged, name, x)
        assert not torch.allclose(sd_m, sd, rtol=1e-2)  # there was something to correct
    head = list(dict(fixed.named_modules()))[-1]
    assert torch.equal(dict(fixed.named_modules())[head].weight, merged[-1].weight)


def test_repair_alpha_zero_on_a_is_a_no_op():
    a, b = conv_net(0), conv_net(1)
    x = torch.randn(64, 2, 6, 6)
    fixed = repair(a, b, a, (x, torch.zeros(64, dtype=torch.long)), alpha=0.0)
    with torch.no_grad():
        torch.testing.assert_close(fixed(x), a(x), atol=1e-4, rtol=1e-4)


def test_repair_skips_layers_feeding_batchnorm():
    torch.manual_seed(0)
    a, b = TwoBN(), TwoBN()
    x = torch.randn(128, 5)
    data = (x, torch.zeros(128, dtype=torch.long))
    fixed = repair(a, b, midpoint(a, b), data)
    assert fixed.modeconn_repaired == []  # fc1, fc2 feed BN; head gives the logits
    expected = reset_bn(midpoint(a, b), data)
    assert all(torch.allclose(fixed.state_dict()[k].float(), v.float(), atol=1e-6)
               for k, v in expected.state_dict().items())


def test_repair_bad_input():
    a, b = conv_net(0), conv_net(1)
    data = (torch.randn(16, 2, 6, 6), torch.zeros(16, dtype=torch.long))
    with pytest.raises(ConfigError):
        repair(a, b, a, data, alpha=1.5)
    with pytest.raises(ConfigError):
        repair(a, b, a, data, layers=["nope"])
    with pytest.raises(mc.IncompatibleModelsError):
        repair(a, token_net(0), a, data)


@pytest.mark.slow
def test_repair_lowers_the_aligned_midpoint_loss(trained, mnist1d_splits):
    a, b = aligned_pair(trained)
    mid = midpoint(a, b)
    fixed = repair(a, b, mid, mnist1d_splits.train)
    assert fixed.modeconn_repaired == ["layers.0", "layers.1", "layers.2"]
    before = evaluate(mid, mnist1d_splits.test).loss
    after = evaluate(fixed, mnist1d_splits.test).loss
    # measured: test loss 1.262 -> 1.207 (endpoints 1.171 / 1.159); naive midpoint 2.56 -> 1.68
    assert after < before - 0.02


def test_repair_in_a_net_mixing_batchnorm_and_plain_layers_reaches_every_goal():
    """A corrected layer upstream of a BatchNorm moves that BN's inputs: its statistics must be
    reset before a later layer is measured, or that layer misses its goal after the final reset."""

    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(),
            nn.Dropout(0.3), nn.Linear(8, 7), nn.ReLU(), nn.Linear(7, 3),
        )

    x = torch.randn(300, 5) * 2
    data = (x, torch.zeros(300, dtype=torch.long))
    a, b = reset_bn(make(0), data), reset_bn(make(1), data)
    merged = midpoint(a, b)
    merged.train()
    before = snapshot(merged)
    fixed = repair(a, b, merged, data, eps=0.0)
    assert_untouched(merged, before, training=True)
    assert fixed.modeconn_repaired == ["0", "6"]  # "2" feeds the BN, "8" gives the logits
    for name in fixed.modeconn_repaired:
        mu_a, sd_a = unit_stats(a, name, x)
        mu_b, sd_b = unit_stats(b, name, x)
        mu, sd = unit_stats(fixed, name, x)
        torch.testing.assert_close(mu, (mu_a + mu_b) / 2, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(sd, (sd_a + sd_b) / 2, atol=1e-4, rtol=1e-3)
    # and the BN statistics of the result are exact for its own (corrected) weights
    expected = reset_bn(fixed, data)
    torch.testing.assert_close(fixed[3].running_mean, expected[3].running_mean)
    torch.testing.assert_close(fixed[3].running_var, expected[3].running_var)


def test_repair_refuses_nan_weights():
    a, b = conv_net(0), conv_net(1)
    with torch.no_grad():
        b[0].weight[0, 0, 0, 0] = float("nan")
    data = (torch.randn(16, 2, 6, 6), torch.zeros(16, dtype=torch.long))
    with pytest.raises(mc.IncompatibleModelsError, match="model B has NaN"):
        repair(a, b, a, data)


def test_reset_bn_leaves_a_batchnorm_the_forward_never_runs():
    torch.manual_seed(0)
    net = TwoBN()
    net.unused = nn.BatchNorm1d(3)  # registered, never called
    x = torch.randn(64, 5)
    fresh = reset_bn(net, (x, torch.zeros(64, dtype=torch.long)))
    assert torch.equal(fresh.unused.running_mean, net.unused.running_mean)
    assert not torch.equal(fresh.bn1.running_mean, net.bn1.running_mean)
