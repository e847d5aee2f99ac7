"""Unit tests of the spec data structure and the assignment solver, vs brute force and scipy."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

import modeconn as mc
from modeconn import Heads, PermutationSpec, Site, Slot
from modeconn._src.errors import SpecError


def mlp_spec() -> tuple[PermutationSpec, dict[str, torch.Tensor]]:
    """A hand-written spec for Linear(3,4) -> BN(4) -> Linear(4,5) -> Linear(5,2)."""
    g = torch.Generator().manual_seed(0)
    state = {
        "a.weight": torch.randn(4, 3, generator=g),
        "a.bias": torch.randn(4, generator=g),
        "bn.running_mean": torch.randn(4, generator=g),
        "b.weight": torch.randn(5, 4, generator=g),
        "b.bias": torch.randn(5, generator=g),
        "c.weight": torch.randn(2, 5, generator=g),
        "steps": torch.tensor(3),
    }
    spec = PermutationSpec.from_axes(
        {"h1": 4, "h2": 5},
        {
            "a.weight": ("h1", None),
            "a.bias": ("h1",),
            "bn.running_mean": ("h1",),
            "b.weight": ("h2", "h1"),
            "b.bias": ("h2",),
            "c.weight": (None, "h2"),
        },
    )
    return spec, state


def test_apply_matches_explicit_index_select_and_is_pure():
    spec, state = mlp_spec()
    before = {k: v.clone() for k, v in state.items()}
    p = mc.random_permutation(spec, seed=3)
    out = mc.apply_permutation(spec, p, state)
    assert all(torch.equal(state[k], before[k]) for k in state)  # input untouched
    assert torch.equal(out["a.weight"], state["a.weight"][p["h1"]])
    assert torch.equal(out["b.weight"], state["b.weight"][p["h2"]][:, p["h1"]])
    assert torch.equal(out["c.weight"], state["c.weight"][:, p["h2"]])
    assert out["steps"] is state["steps"]


def test_inverse_and_compose_roundtrips():
    spec, state = mlp_spec()
    p, q = mc.random_permutation(spec, seed=1), mc.random_permutation(spec, seed=2)
    back = mc.apply_permutation(
        spec, mc.inverse_permutation(p), mc.apply_permutation(spec, p, state)
    )
    assert all(torch.equal(back[k], state[k]) for k in state)
    two_steps = mc.apply_permutation(spec, q, mc.apply_permutation(spec, p, state))
    one_step = mc.apply_permutation(spec, mc.compose_permutations(p, q), state)
    assert all(torch.equal(two_steps[k], one_step[k]) for k in state)
    ident = mc.apply_permutation(spec, mc.identity_permutation(spec), state)
    assert all(torch.equal(ident[k], state[k]) for k in state)


def test_block_repeats_offset_slots_match_a_manual_flatten():
    # conv channels (3) x spatial (2) flattened into 6 columns, repeated twice at offset 1
    slot = Slot("w", 1, offset=1, block=2, repeats=2)
    pos = slot.positions(3)
    assert pos.tolist() == [[1, 2, 7, 8], [3, 4, 9, 10], [5, 6, 11, 12]]
    spec = PermutationSpec({"c": 3}, {"c": (slot,)})
    w = torch.arange(13.0).view(1, 13)
    out = mc.apply_permutation(spec, {"c": torch.tensor([2, 0, 1])}, {"w": w})["w"]
    assert out.tolist() == [[0, 5, 6, 1, 2, 3, 4, 11, 12, 7, 8, 9, 10]]


def test_chunked_slot_places_runs_of_units_one_period_apart():
    # q/k/v fused per head (GPT-NeoX): head h's 2 pass dims sit at 5h + 3 + i; one slot, 3 heads
    slot = Slot("w", 0, offset=3, unit_start=1, length=6, chunk=2, period=5)
    assert slot.positions(7).flatten().tolist() == [3, 4, 8, 9, 13, 14]
    assert slot.extent(7) == 15
    spec = PermutationSpec({"d": 7}, {"d": (slot,)})
    w = torch.arange(15.0)
    perm = torch.tensor([0, 4, 3, 6, 5, 2, 1])  # unit u moves to where perm says: index_select
    out = mc.apply_permutation(spec, {"d": perm}, {"w": w})["w"]
    expect = w.clone()
    pos = slot.positions(7).flatten()
    expect[pos] = w[pos[perm[1:] - 1]]  # units 1..6 are carried, in runs of 2
    assert out.tolist() == expect.tolist()
    back = PermutationSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert back.slots == spec.slots
    with pytest.raises(SpecError, match="chunk"):
        PermutationSpec({"d": 7}, {"d": (Slot("w", 0, length=6, chunk=2, period=5, repeats=2),)})


def test_json_roundtrip_keeps_everything():
    spec = PermutationSpec(
        groups={"h": 4, "att": 6},
        slots={
            "h": (Slot("a", 0), Slot("b", 1, offset=2, block=3, repeats=2)),
            "att": (Slot("q", 0, unit_start=0, length=4), Slot("v", 0, unit_start=4, length=2)),
        },
        sites={
            "h": (Site("relu", 1),),
            "att": (Site("qkv", -1, offset=3, unit_start=4, length=2),),
        },
        heads={"att": Heads(2, ((0, 2), (4, 1)))},
    )
    text = spec.to_json()
    json.loads(text)
    again = PermutationSpec.from_json(text)
    assert again == spec


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"a.weight": torch.zeros(3, 3)}, "needs 4 positions"),
        ({"a.weight": torch.zeros(4, 3), "c.weight": torch.zeros(5)}, "has 1 axes"),
        ({}, "a.weight"),
    ],
)
def test_check_errors_name_the_tensor(bad, match):
    spec, state = mlp_spec()
    state = {k: v for k, v in state.items() if k not in ("a.weight", "c.weight")} | bad
    state.setdefault("c.weight", torch.zeros(2, 5))
    with pytest.raises(SpecError, match=match):
        spec.check(state)


def test_check_rejects_overlapping_slots_and_bad_construction():
    spec = PermutationSpec({"x": 2, "y": 2}, {"x": (Slot("w", 0),), "y": (Slot("w", 0, offset=1),)})
    with pytest.raises(SpecError, match="overlap"):
        spec.check({"w": torch.zeros(3)})
    with pytest.raises(SpecError):
        PermutationSpec({"x": 0}, {})
    with pytest.raises(SpecError):
        PermutationSpec({"x": 2}, {"y": ()})
    with pytest.raises(SpecError):
        PermutationSpec.from_json("{not json")


def test_heads_structure_random_permutations_are_valid_and_checked():
    heads = Heads(3, ((0, 2), (6, 4)))
    spec = PermutationSpec({"att": 18}, {}, heads={"att": heads})
    for seed in range(20):
        p = mc.random_permutation(spec, seed=seed)["att"]
        mc.check_permutation(spec, {"att": p})
        qk, v = p[:6].view(3, 2) // 2, (p[6:].view(3, 4) - 6) // 4
        assert (qk == qk[:, :1]).all() and (v == v[:, :1]).all()
        assert torch.equal(qk[:, 0], v[:, 0])  # the same head permutation in both segments
    bad = torch.arange(18)
    bad[[1, 2]] = bad[[2, 1]]  # moves a q/k dim into another head
    with pytest.raises(SpecError, match="splits a head"):
        mc.check_permutation(spec, {"att": bad})
    mixed = torch.cat([torch.tensor([2, 3, 0, 1, 4, 5]), torch.arange(6, 18)])  # q/k heads 0<->1
    with pytest.raises(SpecError, match="differently"):  # ... but the v heads stay
        mc.check_permutation(spec, {"att": mixed})


# --- assignment ---------------------------------------------------------------------------------
def brute_force(score: np.ndarray, valid=lambda p: True) -> float:
    n = score.shape[0]
    best = -np.inf
    for p in itertools.permutations(range(n)):
        if valid(p):
            best = max(best, score[np.arange(n), list(p)].sum())
    return best


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_solve_assignment_matches_brute_force(n):
    rng = np.random.default_rng(n)
    for _ in range(3):
        s = rng.normal(size=(n, n))
        p = mc.solve_assignment(torch.from_numpy(s)).numpy()
        assert sorted(p.tolist()) == list(range(n))
        assert np.isclose(s[np.arange(n), p].sum(), brute_force(s))


@pytest.mark.parametrize("n", [0, 1, 2, 7, 31, 100])
def test_solve_assignment_matches_scipy(n):
    s = np.random.default_rng(n).normal(size=(n, n))
    p = mc.solve_assignment(torch.from_numpy(s).float()).numpy()
    assert p.shape == (n,)
    r, c = linear_sum_assignment(s, maximize=True)
    assert np.isclose(s[np.arange(n), p].sum(), s[r, c].sum(), atol=1e-4)


def test_solve_assignment_rejects_bad_input():
    with pytest.raises(ValueError):
        mc.solve_assignment(torch.zeros(2, 3))
    with pytest.raises(ValueError):
        mc.solve_assignment(torch.tensor([[float("nan")]]))


def test_heads_structured_assignment_matches_brute_force():
    heads = Heads(2, ((0, 1), (2, 2)))  # 2 heads; q/k dim 1 each, v dim 2 each: 6 units
    spec = PermutationSpec({"att": 6}, {}, heads={"att": heads})

    def valid(p):
        try:
            mc.check_permutation(spec, {"att": torch.tensor(p)})
            return True
        except SpecError:
            return False

    rng = np.random.default_rng(0)
    for _ in range(5):
        s = rng.normal(size=(6, 6))
        p = mc.solve_assignment(torch.from_numpy(s), heads).numpy()
        assert valid(tuple(p.tolist()))
        assert np.isclose(s[np.arange(6), p].sum(), brute_force(s, valid))


def test_permutation_spec_from_inference_survives_json():
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    spec = mc.infer_spec(net, torch.randn(2, 4))
    assert PermutationSpec.from_json(spec.to_json()) == spec
