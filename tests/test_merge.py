"""Tests of merging: the registry-driven contract every method keeps, and oracles per method."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modeconn as mc
from modeconn._src.errors import ConfigError, IncompatibleModelsError
from modeconn._src.evaluation import evaluate
from modeconn._src.merge import (
    MergeRecipe,
    diagonal_fisher,
    disjoint_merge,
    drop_and_rescale,
    fisher_weighted_average,
    get_method,
    merge,
    merge_methods,
    regmean_solve,
    slerp,
    trim_magnitude,
)
from modeconn._src.merge.regmean import layer_inputs
from modeconn._src.state import combine

METHODS = merge_methods()


# --- tiny models and data -----------------------------------------------------------------------

def _net(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Linear -> BatchNorm -> ReLU -> Linear, with non-trivial BN statistics."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].weight.data.uniform_(0.5, 1.5)
        net[1].num_batches_tracked.fill_(seed + 7)
    return net.to(dtype).eval()


def _state(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in _net(seed, dtype).state_dict().items()}


def _data(n: int = 48, seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g).to(dtype), torch.randint(0, 3, (n,), generator=g)


def _merge_kwargs(name: str, base, model, data) -> dict:
    """What ``name`` needs, plus its identity settings (merging copies returns the model)."""
    m = get_method(name)
    kw = dict(m.identity_params)
    if m.needs_base:
        kw["base"] = base
    if m.needs_data:
        kw.update(model=model, data=data)
    return kw


def _n_copies(name: str) -> int:
    m = get_method(name)
    return m.max_models if m.max_models is not None else 3


def _assert_states_close(a, b, atol=1e-5, counters=True):
    """Same keys and dtypes, floats close; ``counters=False`` skips non-floating tensors."""
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        if not counters and not a[k].is_floating_point():
            continue
        assert torch.allclose(a[k].double(), b[k].double(), atol=atol), k


# --- contract over every registered method ------------------------------------------------------

def test_registry_lists_every_method_with_its_paper():
    assert mc.merge_methods() == METHODS
    assert set(METHODS) >= {"average", "soup", "fisher", "regmean", "task_arithmetic", "ties",
                            "dare", "slerp"}
    for name in METHODS:
        m = get_method(name)
        assert m.reference.year >= 1985 and m.reference.url.startswith("https://")
        assert m.__class__.__doc__ and str(m.reference.year) in (
            m.__class__.__doc__ + str(m.reference)
        )
    with pytest.raises(ConfigError, match="choose one of: average, soup"):
        get_method("nope")


@pytest.mark.parametrize("name", METHODS)
def test_merging_copies_of_one_model_returns_it(name):
    s, base, net, data = _state(0), _state(5), _net(0), _data()
    out = merge([s] * _n_copies(name), method=name, **_merge_kwargs(name, base, net, data))
    _assert_states_close(out, s, atol=2e-5)
    assert out.info["method"] == name


@pytest.mark.parametrize("name", METHODS)
def test_dtype_and_buffers_preserved(name):
    n = _n_copies(name)
    states = [_state(i, torch.float64) for i in range(n)]
    kw = _merge_kwargs(name, _state(9, torch.float64), _net(0, torch.float64),
                       _data(dtype=torch.float64))
    out = merge(states, method=name, **kw)
    assert list(out) == list(states[0])
    for k, v in out.items():
        assert v.dtype == states[0][k].dtype and v.shape == states[0][k].shape, k
    # non-floating buffers come from the first model; BN statistics are averaged (weights 1)
    assert int(out["1.num_batches_tracked"]) == 7
    mean_var = torch.stack([s["1.running_var"] for s in states]).mean(0)
    if name != "soup":  # the soup averages only the models it keeps; slerp lerps them at t=0.5
        assert torch.allclose(out["1.running_var"], mean_var, atol=1e-12)


@pytest.mark.parametrize("name", [n for n in METHODS if not get_method(n).needs_data])
def test_low_precision_dtype_preserved(name):
    states = [_state(i, torch.bfloat16) for i in range(_n_copies(name))]
    out = merge(states, method=name, **_merge_kwargs(name, _state(9, torch.bfloat16), None, None))
    assert all(out[k].dtype == states[0][k].dtype for k in out)


@pytest.mark.parametrize("name", METHODS)
def test_different_shapes_or_keys_refused_naming_the_tensor(name):
    n = _n_copies(name)
    kw = _merge_kwargs(name, _state(5), _net(0), _data())
    states = [_state(i) for i in range(n)]
    bad = dict(states[-1])
    bad["3.weight"] = torch.zeros(3, 9)
    with pytest.raises(IncompatibleModelsError, match=r"'3\.weight'"):
        merge([*states[:-1], bad], method=name, **kw)
    missing = dict(states[-1])
    del missing["0.bias"]
    with pytest.raises(IncompatibleModelsError, match=r"'0\.bias'"):
        merge([*states[:-1], missing], method=name, **kw)


@pytest.mark.parametrize("name", METHODS)
def test_inputs_not_mutated_and_output_owns_its_memory(name):
    n = _n_copies(name)
    states = [_state(i) for i in range(n)]
    base, net, data = _state(5), _net(0), _data()
    kw = _merge_kwargs(name, base, net, data)
    before = [copy.deepcopy(s) for s in (*states, base, net.state_dict())]
    out = merge(states, method=name, **kw)
    for old, new in zip(before, (*states, base, net.state_dict()), strict=True):
        assert all(torch.equal(old[k], new[k]) for k in old)
    ptrs = {t.data_ptr() for s in (*states, base) for t in s.values()}
    assert not any(v.data_ptr() in ptrs for v in out.values())


def test_bad_inputs_are_one_line_config_errors():
    a, b, c = _state(0), _state(1), _state(2)
    with pytest.raises(ConfigError, match="exactly 2 models, got 3"):
        merge([a, b, c], method="slerp")
    with pytest.raises(ConfigError, match="needs model="):
        merge([a, b], method="fisher", data=_data())
    with pytest.raises(ConfigError, match="needs data="):
        merge([a, b], method="regmean", model=_net())
    with pytest.raises(ConfigError, match="pass base="):
        merge([a, b], method="ties")
    with pytest.raises(ConfigError, match="does not use base="):
        merge([a, b], method="average", base=c)
    with pytest.raises(ConfigError, match="one weight per model"):
        merge([a, b], weights=[1.0])
    with pytest.raises(ConfigError, match="takes no weights"):
        merge([a, b], method="slerp", weights=[1, 2])
    with pytest.raises(ConfigError, match="density: Input should be less than or equal to 1"):
        merge([a, b], method="ties", base=c, density=1.5)
    with pytest.raises(ConfigError, match="dens: unknown parameter"):
        merge([a, b], method="ties", base=c, dens=0.5)
    with pytest.raises(ConfigError, match="two models"):
        merge([a, b, c], model=_net(), data=_data(), repair=True)
    nan = copy.deepcopy(b)
    nan["0.weight"][0, 0] = float("nan")
    with pytest.raises(IncompatibleModelsError, match="NaN"):
        merge([a, nan])


# --- weights and ordering -----------------------------------------------------------------------

def test_average_weights_are_normalized_and_order_free():
    a, b = _state(0), _state(1)
    out = merge([a, b], weights=[1, 3])
    assert torch.allclose(out["0.weight"], 0.25 * a["0.weight"] + 0.75 * b["0.weight"], atol=1e-6)
    _assert_states_close(merge([a, b], weights=[2, 6]), out, atol=1e-6)
    _assert_states_close(merge([b, a], weights=[3, 1]), out, atol=1e-6, counters=False)
    raw = merge([a, b], weights=[1, 3], normalize=False)
    assert torch.allclose(raw["0.weight"], a["0.weight"] + 3 * b["0.weight"], atol=1e-5)


@pytest.mark.parametrize("name", ["average", "fisher", "regmean", "task_arithmetic", "ties"])
def test_symmetric_methods_ignore_input_order(name):
    states = [_state(i) for i in range(3)]
    kw = _merge_kwargs(name, _state(5), _net(0), _data())
    kw.pop("density", None)
    out = merge(states, method=name, **kw)
    _assert_states_close(merge(states[::-1], method=name, **kw), out, atol=1e-5, counters=False)


# --- oracles ----------------------------------------------------------------------------------

def test_fisher_with_equal_fishers_is_the_weighted_average():
    states = [_state(i) for i in range(3)]
    g = torch.Generator().manual_seed(0)
    fisher = {k: torch.rand(v.shape, generator=g) + 0.1 for k, v in states[0].items()
              if v.is_floating_point()}
    w = [0.2, 0.5, 0.3]
    out = fisher_weighted_average(states, [fisher] * 3, w)
    _assert_states_close(out, combine(states, w), atol=1e-6)


def test_fisher_floor_gives_the_informed_model_its_value():
    a, b = {"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([1.0, 1.0])}
    fa, fb = {"w": torch.tensor([0.0, 1.0])}, {"w": torch.tensor([1.0, 1.0])}
    out = fisher_weighted_average([a, b], [fa, fb])["w"]
    assert out[0].item() == pytest.approx(1.0 / (1.0 + 1e-6), abs=1e-7)
    assert out[0].item() < 1.0  # F_a floored at 1e-6
    assert out[1].item() == pytest.approx(0.5)


def _brute_fisher(net: nn.Module, x: torch.Tensor, y: torch.Tensor, exact: bool):
    """Per-example, per-label autograd loop: F = mean_x sum_y p(y|x) grad(log p(y|x))^2."""
    net = copy.deepcopy(net).eval()
    total = {k: torch.zeros_like(p) for k, p in net.named_parameters()}
    for i in range(len(x)):
        logp = F.log_softmax(net(x[i : i + 1]), -1)[0]
        labels = range(logp.shape[0]) if exact else [int(y[i])]
        for c in labels:
            grads = torch.autograd.grad(logp[c], list(net.parameters()), retain_graph=True)
            weight = logp[c].exp().item() if exact else 1.0
            for (k, _), gr in zip(net.named_parameters(), grads, strict=True):
                total[k] += weight * gr**2
    return {k: v / len(x) for k, v in total.items()}


@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_diagonal_fisher_matches_a_per_example_loop(kind):
    net, (x, y) = _net(3), _data(12, seed=1)
    got = diagonal_fisher(net, (x, y), fisher=kind, batch_size=5)
    want = _brute_fisher(net, x, y, exact=kind == "exact")
    assert set(got) == set(want)
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6, rtol=1e-4), k


def test_fisher_merge_uses_each_models_own_data():
    states, net = [_state(0), _state(1)], _net(0)
    datas = [_data(20, seed=1), _data(20, seed=2)]
    fishers = [diagonal_fisher(net, d, state=s) for s, d in zip(states, datas, strict=True)]
    want = fisher_weighted_average(states, fishers, [1.0, 2.0])
    got = merge(states, method="fisher", model=net, data=datas, weights=[1.0, 2.0])
    _assert_states_close(got, want, atol=1e-6)


def test_regmean_single_linear_equals_least_squares():
    g = torch.Generator().manual_seed(0)
    layers = [nn.Linear(5, 3) for _ in range(3)]
    states = [{k: v.detach() for k, v in lay.state_dict().items()} for lay in layers]
    xs = [torch.randn(40, 5, generator=g) * (i + 1) + i for i in range(3)]
    data = [(x, torch.zeros(len(x), dtype=torch.long)) for x in xs]
    out = merge(states, method="regmean", model=nn.Linear(5, 3), data=data, alpha=1.0)
    # oracle: one least-squares fit of all models' outputs on all their inputs
    A = torch.cat([torch.cat([x, torch.ones(len(x), 1)], 1) for x in xs]).double()
    Y = torch.cat([lay(x) for lay, x in zip(layers, xs, strict=True)]).detach().double()
    sol = torch.linalg.lstsq(A, Y).solution  # (6, 3)
    assert torch.allclose(out["weight"].double(), sol[:5].T, atol=1e-4)
    assert torch.allclose(out["bias"].double(), sol[5], atol=1e-4)


def test_regmean_alpha_zero_is_a_diagonal_weighted_mean():
    g = torch.Generator().manual_seed(1)
    Ws = [torch.randn(2, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    Gs = []
    for _ in range(3):
        X = torch.randn(10, 4, generator=g, dtype=torch.float64)
        Gs.append(X.T @ X)
    got = regmean_solve(Ws, Gs, alpha=0.0)
    d = torch.stack([torch.diagonal(G) for G in Gs])  # (3, 4)
    want = (d[:, None, :] * torch.stack(Ws)).sum(0) / d.sum(0)
    assert torch.allclose(got, want, atol=1e-10)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv1d(3, 4, 3, stride=2, padding=1, dilation=2),
        nn.Conv1d(3, 2, 3, padding=1, padding_mode="circular"),
        nn.Conv2d(2, 3, (3, 2), stride=(1, 2), padding=(1, 0)),
        nn.Conv2d(2, 3, 3, padding="same"),
    ],
)
def test_regmean_conv_rows_reproduce_the_convolution(conv):
    x = torch.randn(2, conv.in_channels, *([7] if isinstance(conv, nn.Conv1d) else [6, 7]))
    rows = layer_inputs(conv, x, augment=True)
    W = torch.cat([conv.weight.reshape(conv.out_channels, -1), conv.bias[:, None]], 1).double()
    y = conv(x).detach().double()  # (N, C_out, *spatial) -> rows ordered (N, positions)
    want = y.flatten(2).transpose(1, 2).reshape(-1, conv.out_channels)
    assert torch.allclose(rows @ W.T, want, atol=1e-5)


def test_regmean_on_a_cnn_keeps_copies_and_solves_its_convs():
    net = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3))
    s = {k: v.detach() for k, v in net.state_dict().items()}
    data = (torch.randn(16, 1, 8), torch.zeros(16, dtype=torch.long))
    out = merge([s, s], method="regmean", model=net, data=data)
    _assert_states_close(out, s, atol=1e-5)
    assert out.info["regmean_layers"] == ["0", "3"]


def test_ties_matches_the_hand_worked_example():
    base = {"w": torch.ones(4)}
    taus = [torch.tensor([3.0, -1.0, 0.5, -4.0]), torch.tensor([-2.0, -1.5, 1.0, -3.0]),
            torch.tensor([1.0, 0.2, -3.0, 2.0])]
    states = [{"w": base["w"] + t} for t in taus]
    # trim (k = 50%): [3,0,0,-4], [-2,0,0,-3], [0,0,-3,2]; sum [1,0,-3,-5] -> signs [+,0,-,-];
    # disjoint mean: [3, 0, -3, (-4-3)/2]
    out = merge(states, method="ties", base=base, density=0.5)
    assert out["w"].tolist() == pytest.approx([4.0, 1.0, -2.0, -2.5])
    half = merge(states, method="ties", base=base, density=0.5, scale=0.5)
    assert half["w"].tolist() == pytest.approx([2.5, 1.0, -0.5, -0.75])
    # weights 1,3,1: weighted [3,0,0,-4], [-6,0,0,-9], [0,0,-3,2]; sum [-3,0,-3,-11];
    # e0: -6/3, e2: -3/1, e3: (-4-9)/(1+3)
    w = merge(states, method="ties", base=base, density=0.5, weights=[1, 3, 1])
    assert w["w"].tolist() == pytest.approx([-1.0, 1.0, -2.0, -2.25])
    assert trim_magnitude(taus[1], 0.5).tolist() == [-2.0, 0.0, 0.0, -3.0]
    assert disjoint_merge([torch.tensor([1.0, -1.0]), torch.tensor([-1.0, 1.0])]).tolist() == [
        0.0, 0.0]  # sum 0: no elected sign


def test_task_arithmetic_is_ilharcos_formula():
    base, a, b = _state(5), _state(0), _state(1)
    out = merge([a, b], method="task_arithmetic", base=base, scale=0.7, normalize=False)
    k = "0.weight"
    want = base[k] + 0.7 * ((a[k] - base[k]) + (b[k] - base[k]))
    assert torch.allclose(out[k], want, atol=1e-6)


def test_task_vector_methods_default_to_their_papers_form():
    base, a, b = _state(5), _state(0), _state(1)
    k = "0.weight"
    ta = merge([a, b], method="task_arithmetic", base=base)  # Ilharco: base + lambda * sum
    assert torch.allclose(ta[k], a[k] + b[k] - base[k], atol=1e-6)
    assert ta.info["normalize"] is False
    mean = merge([a, b], method="task_arithmetic", base=base, normalize=True)
    assert torch.allclose(mean[k], 0.5 * (a[k] + b[k]), atol=1e-6)
    _assert_states_close(merge([a, b], method="dare", base=base, p=0.0), ta, atol=1e-6)
    ties = merge([a, b], method="ties", base=base, density=1.0)  # TIES: the disjoint mean
    assert ties.info["normalize"] is True
    _assert_states_close(ties, merge([a, b], method="ties", base=base, density=1.0,
                                     normalize=True), atol=0)


def test_task_negation_keeps_batchnorm_statistics_valid():
    base, a, b = _state(5), _state(0), _state(1)
    out = merge([a, b], method="task_arithmetic", base=base, weights=[1.0, -1.0])
    k = "0.weight"
    assert torch.allclose(out[k], base[k] + (a[k] - base[k]) - (b[k] - base[k]), atol=1e-6)
    var = 0.5 * (a["1.running_var"] + b["1.running_var"])
    assert torch.allclose(out["1.running_var"], var, atol=1e-6)


def test_ties_trim_over_the_whole_task_vector():
    base = {"u": torch.zeros(4), "v": torch.zeros(2)}
    # task 0: big entries in u, small in v; task 1: small in u, big in v
    t0 = {"u": torch.tensor([4.0, -3.0, 0.1, 0.2]), "v": torch.tensor([0.3, -0.4])}
    t1 = {"u": torch.tensor([0.1, 0.2, -0.3, 0.1]), "v": torch.tensor([5.0, 6.0])}
    # model-wide, the TIES code's count: k = int(0.5 * 6) = 3, threshold = the (6 - 3)-th smallest
    # |tau|, keep |tau| >= it (4 entries): t0 (th 0.3) keeps u0, u1, v0, v1; t1 (th 0.2) keeps
    # u1, u2, v0, v1
    out = merge([t0, t1], method="ties", base=base, density=0.5, trim="model")
    # sums u [4, -2.8, -0.3, 0], v [5.3, 5.6]: signs u [+, -, -, 0 -> majority +], v [+, +];
    # disjoint mean: u1 = -3 (t1's +0.2 disagrees), v0 = (0.3 + 5) / 2, v1 = 6 (t0 disagrees)
    assert out["u"].tolist() == pytest.approx([4.0, -3.0, -0.3, 0.0])
    assert out["v"].tolist() == pytest.approx([2.65, 6.0])
    assert out.info["ties_thresholds"] == pytest.approx([0.3, 0.2])
    per_tensor = merge([t0, t1], method="ties", base=base, density=0.5)
    # per tensor: u keeps 2 of 4 per task (t0: u0, u1; t1: u2, u1), v keeps 1 of 2 (v1, v1)
    assert per_tensor["u"].tolist() == pytest.approx([4.0, -3.0, -0.3, 0.0])
    assert per_tensor["v"].tolist() == pytest.approx([0.0, 6.0])


@pytest.mark.parametrize("scale,normalize", [(1.0, True), (0.4, False)])
def test_dare_with_p_zero_is_task_arithmetic(scale, normalize):
    states, base = [_state(i) for i in range(3)], _state(5)
    kw = dict(base=base, scale=scale, normalize=normalize, weights=[1, 2, 3])
    dare = merge(states, method="dare", p=0.0, **kw)
    ta = merge(states, method="task_arithmetic", **kw)
    _assert_states_close(dare, ta, atol=1e-6)
    dare_ties = merge(states, method="dare", p=0.0, consensus=True, **kw)
    ties = merge(states, method="ties", density=1.0, **kw)
    _assert_states_close(dare_ties, ties, atol=1e-6)


def test_dare_is_seeded_and_unbiased():
    states, base = [_state(0), _state(1)], _state(5)
    a = merge(states, method="dare", base=base, p=0.5, seed=3)
    _assert_states_close(merge(states, method="dare", base=base, p=0.5, seed=3), a, atol=0)
    assert not torch.equal(merge(states, method="dare", base=base, p=0.5, seed=4)["0.weight"],
                           a["0.weight"])
    g = torch.Generator().manual_seed(0)
    out = drop_and_rescale(torch.ones(200_000), 0.7, g)
    assert (out == 0).float().mean().item() == pytest.approx(0.7, abs=0.01)
    assert out.mean().item() == pytest.approx(1.0, abs=0.02)  # E[m / (1 - p)] = 1


def test_slerp_endpoints_and_closed_form():
    a, b = _state(0), _state(1)
    _assert_states_close(merge([a, b], method="slerp", t=0.0), a, atol=0)
    _assert_states_close(merge([a, b], method="slerp", t=1.0), b, atol=0, counters=False)
    # orthogonal tensors of norm r: slerp(t) = r (cos(t pi/2) e1 + sin(t pi/2) e2)
    e1, e2 = torch.tensor([2.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0])
    for t in (0.25, 0.5, 0.9):
        want = 2 * torch.tensor([math.cos(t * math.pi / 2), math.sin(t * math.pi / 2), 0.0])
        assert torch.allclose(slerp(e1, e2, t), want, atol=1e-6)
    # 60 degrees apart: the midpoint bisects the angle and keeps the norm
    u, v = torch.tensor([1.0, 0.0]), torch.tensor([0.5, math.sqrt(3) / 2])
    mid = slerp(u, v, 0.5)
    assert torch.allclose(mid, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]),
                          atol=1e-6)
    # colinear tensors fall back to lerp
    assert torch.allclose(slerp(e1, 3 * e1, 0.5), 2 * e1)
    # swapping the models is t -> 1 - t
    _assert_states_close(merge([a, b], method="slerp", t=0.3),
                         merge([b, a], method="slerp", t=0.7), atol=1e-6, counters=False)


# --- greedy soup on trained models -------------------------------------------------------------

@pytest.fixture(scope="module")
def finetuned():
    """A base model on a small 3-class problem and four fine-tunes of it (different data/seeds)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 3, generator=g)
    x = torch.randn(900, 5, generator=g)
    y = (x @ W + 0.5 * torch.randn(900, 3, generator=g)).argmax(1)
    train, held, test = (x[:600], y[:600]), (x[600:750], y[600:750]), (x[750:], y[750:])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        net = nn.Sequential(nn.Linear(5, 32), nn.ReLU(), nn.Linear(32, 3))
    base = mc.train(net, (x[:150], y[:150]), epochs=2, lr=0.05, seed=0, progress=False).model
    tuned = [
        mc.train(base, (train[0][i * 150 : (i + 1) * 150], train[1][i * 150 : (i + 1) * 150]),
                 epochs=10, lr=0.05, seed=i, progress=False).model
        for i in range(4)
    ]
    return base, tuned, held, test


def test_greedy_soup_never_lowers_held_out_accuracy(finetuned):
    base, tuned, held, _ = finetuned
    states = [m.state_dict() for m in tuned] + [_random_like(base)]
    out = merge(states, method="soup", model=base, data=held)
    singles = [evaluate(base, held, state=s).accuracy for s in states]
    soup_acc = evaluate(base, held, state=out).accuracy
    assert soup_acc >= max(singles)
    assert soup_acc == pytest.approx(out.info["soup"]["soup_accuracy"])
    members = out.info["soup"]["members"]
    assert members[0] == max(range(len(singles)), key=lambda i: singles[i])
    assert len(members) >= 2 and 4 not in members  # fine-tunes soup well; the random net does not
    # the soup is the uniform average of its members
    uniform = [1 / len(members)] * len(members)
    _assert_states_close(out, combine([states[i] for i in members], uniform))


def test_greedy_soup_adds_only_on_strict_improvement(finetuned):
    base, tuned, held, _ = finetuned
    s = tuned[0].state_dict()
    out = merge([s, copy.deepcopy(s)], method="soup", model=base, data=held)
    assert out.info["soup"]["members"] == [0]  # the identical copy does not strictly improve


def _random_like(model: nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(42)
    return {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


# --- alignment and BN repair --------------------------------------------------------------------

def _spec() -> mc.PermutationSpec:
    return mc.PermutationSpec.from_axes(
        {"h": 8},
        {"0.weight": ("h", None), "0.bias": ("h",), "1.weight": ("h",), "1.bias": ("h",),
         "1.running_mean": ("h",), "1.running_var": ("h",), "3.weight": (None, "h")},
    )


@pytest.mark.parametrize("n", [2, 3])
def test_align_recovers_permuted_copies_before_averaging(n):
    spec, a = _spec(), _state(0)
    copies = [a] + [mc.apply_permutation(spec, mc.random_permutation(spec, seed=s), a)
                    for s in range(1, n)]
    naive = merge(copies)
    assert not torch.allclose(naive["0.weight"], a["0.weight"], atol=1e-3)
    aligned = merge(copies, align="weight", spec=spec, model=_net(0))
    _assert_states_close(aligned, a, atol=1e-5)
    assert aligned.info["aligned"] == "weight"


def test_align_with_a_base_maps_every_model_onto_the_base():
    spec, base = _spec(), _state(0)
    g = torch.Generator().manual_seed(1)
    deltas = [{k: 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else 0 * v
               for k, v in base.items()} for _ in range(2)]
    t1 = {k: base[k] + deltas[0][k] for k in base}
    t2 = {k: base[k] + deltas[1][k] for k in base}
    t2_perm = mc.apply_permutation(spec, mc.random_permutation(spec, seed=3), t2)
    out = merge([t1, t2_perm], method="task_arithmetic", base=base, align="weight", spec=spec,
                model=_net(0))
    want = merge([t1, t2], method="task_arithmetic", base=base)
    _assert_states_close(out, want, atol=1e-6)


def test_reset_bn_recomputes_statistics_of_the_merged_model():
    a, b, net = _state(0), _state(1), _net(0)
    x, y = _data(64, seed=4)
    out = merge([a, b], model=net, data=(x, y), reset_bn=True)
    hidden = x @ out["0.weight"].T + out["0.bias"]  # the BN's input in the merged model
    assert torch.allclose(out["1.running_mean"], hidden.mean(0), atol=1e-5)
    assert torch.allclose(out["1.running_var"], hidden.var(0, unbiased=True), atol=1e-4)
    assert out.info["bn_reset"] is True


def test_repair_runs_on_two_model_merges():
    a, b = _state(0), _state(1)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    sa = {k: v.detach() for k, v in net.state_dict().items()}
    sb = {k: v + 0.3 * torch.randn_like(v) for k, v in sa.items()}
    out = merge([sa, sb], model=net, data=_data(64), repair=True)
    assert out.info["repaired"]  # at least one hidden layer was corrected
    assert set(out) == set(sa)
    del a, b


# --- recipes ------------------------------------------------------------------------------------

def test_recipe_validation_messages(tmp_path):
    ok = MergeRecipe.validate_dict({"models": ["a.pt", {"path": "b.pt"}], "method": "average"})
    assert [m.path for m in ok.models] == ["a.pt", "b.pt"] and ok.weights() is None
    cases = [
        ({"models": ["a.pt"], "methd": "average"}, "methd: unknown parameter"),
        ({"models": ["a.pt"], "method": "nope"}, "choose one of: average"),
        ({"models": ["a", "b"], "method": "ties"}, "needs base"),
        ({"models": ["a", "b"], "method": "ties", "base": "p", "parameters": {"density": 0}},
         "density: Input should be greater than 0"),
        ({"models": [{"path": "a", "weight": 1}, "b"]}, "every model or for none"),
        ({"models": ["a", "b", "c"], "method": "slerp"}, "exactly 2 models, got 3"),
        ({"models": ["a", "b"], "method": "fisher"}, "needs data"),
        ({"models": []}, "models: List should have at least 1 item"),
    ]
    for obj, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            MergeRecipe.validate_dict(obj)
    with pytest.raises(Exception, match="frozen"):
        ok.method = "ties"  # type: ignore[misc]
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [a.pt\nmethod: average\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        MergeRecipe.from_yaml(bad)
    good = tmp_path / "r.yaml"
    good.write_text("models:\n  - path: a.pt\n    weight: 2\n  - path: /abs/b.pt\n    weight: 1\n"
                    "method: ties\nbase: pre.pt\nparameters: {density: 0.3}\nalign: weight\n"
                    "out: out/m.safetensors\n")
    r = MergeRecipe.from_yaml(good)
    assert r.models[0].path == str(tmp_path / "a.pt") and r.models[1].path == "/abs/b.pt"
    assert r.base == str(tmp_path / "pre.pt") and r.out == str(tmp_path / "out/m.safetensors")
    assert r.weights() == [2.0, 1.0] and r.align is not None and r.align.method == "weight"
