"""The full attention symmetry (MHA, GQA, MQA, rotary, ALiBi, cross-attention): Heads specs keep the
function, the structured assignment matches brute force, weight matching recovers planted heads."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

import modeconn as mc
from modeconn import Heads, PermutationSpec, Slot, SpecError
from modeconn._src.assign import solve_heads
from modeconn._src.heads import HeadsMoves, assemble, decompose


class Attention(nn.Module):
    """Grouped-query attention written plainly (HF Llama's repeat_kv convention: h = g * R + r)."""

    def __init__(self, d=12, heads=4, kv=2, dqk=4, dv=3, rotary=False, alibi=False):
        super().__init__()
        self.h, self.kv, self.dqk, self.dv = heads, kv, dqk, dv
        self.rotary, self.alibi = rotary, alibi
        self.q = nn.Linear(d, heads * dqk)
        self.k = nn.Linear(d, kv * dqk)
        self.v = nn.Linear(d, kv * dv)
        self.o = nn.Linear(heads * dv, d)

    def forward(self, x, ctx=None):
        ctx = x if ctx is None else ctx  # cross-attention: keys/values from another sequence
        B, T, _ = x.shape
        S = ctx.shape[1]
        q = self.q(x).view(B, T, self.h, self.dqk).transpose(1, 2)
        k = self.k(ctx).view(B, S, self.kv, self.dqk).transpose(1, 2)
        v = self.v(ctx).view(B, S, self.kv, self.dv).transpose(1, 2)
        if self.rotary:
            q, k = rope(q), rope(k)
        rep = self.h // self.kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        att = q @ k.transpose(-1, -2) / self.dqk**0.5
        if self.alibi:
            slopes = 2.0 ** -torch.arange(1, self.h + 1, dtype=x.dtype)
            dist = torch.arange(S)[None, :] - torch.arange(T)[:, None]
            att = att + slopes[:, None, None] * dist
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, self.h * self.dv)
        return self.o(y)


def rope(x):
    d = x.shape[-1] // 2
    pos = torch.arange(x.shape[-2], dtype=x.dtype)[:, None]
    ang = pos * 10000 ** (-torch.arange(d, dtype=x.dtype) / d)
    cos, sin = ang.cos(), ang.sin()
    a, b = x[..., :d], x[..., d:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)


def attention_spec(m: Attention) -> PermutationSpec:
    """The full symmetry by hand: q | o-columns per query head, k | v per key/value head."""
    H, G, dqk, dv = m.h, m.kv, m.dqk, m.dv
    qk_dim, blk = (1, dqk) if m.rotary else (dqk, 1)  # rotary: q/k dims pinned, heads still move
    q0, o0 = 0, H * qk_dim
    k0 = o0 + H * dv
    v0 = k0 + G * qk_dim
    n = v0 + G * dv
    heads = Heads(
        H,
        ((q0, qk_dim), (o0, dv)),
        num_kv_heads=G,
        kv_segments=((k0, qk_dim), (v0, dv)),
        links=(0, 1),
        fixed=m.alibi,
    )
    slots = (
        Slot("q.weight", 0, block=blk, unit_start=q0, length=H * qk_dim),
        Slot("q.bias", 0, block=blk, unit_start=q0, length=H * qk_dim),
        Slot("o.weight", 1, unit_start=o0, length=H * dv),
        Slot("k.weight", 0, block=blk, unit_start=k0, length=G * qk_dim),
        Slot("k.bias", 0, block=blk, unit_start=k0, length=G * qk_dim),
        Slot("v.weight", 0, unit_start=v0, length=G * dv),
        Slot("v.bias", 0, unit_start=v0, length=G * dv),
    )
    return PermutationSpec({"att": n}, {"att": slots}, heads={"att": heads})


KINDS = {
    "mha": {"heads": 4, "kv": 4},
    "gqa": {"heads": 6, "kv": 2},
    "mqa": {"heads": 4, "kv": 1},
    "gqa-rotary": {"heads": 4, "kv": 2, "rotary": True},
    "mha-alibi": {"heads": 4, "kv": 4, "alibi": True},
    "cross": {"heads": 4, "kv": 2},
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_heads_spec_is_the_attention_symmetry(kind):
    """Every sampled valid permutation keeps the output; one that breaks a rule changes it."""
    torch.manual_seed(0)
    m = Attention(**KINDS[kind])
    spec = attention_spec(m)
    x, ctx = torch.randn(2, 5, 12), torch.randn(2, 7, 12)
    args = (x, ctx) if kind == "cross" else (x,)
    ref = m(*args)
    state = m.state_dict()
    moved = 0
    for seed in range(4):
        p = mc.random_permutation(spec, seed=seed)
        mc.check_permutation(spec, p)
        moved += int((p["att"] != torch.arange(spec.groups["att"])).sum())
        m.load_state_dict(mc.apply_permutation(spec, p, state))
        assert torch.allclose(m(*args), ref, atol=1e-5), (kind, seed)
    assert moved > 0
    # a permutation outside the symmetry: swap two query heads of different groups (or, MQA and
    # ALiBi, two q dims inside one head without their key dims) -- the output changes
    bad = torch.arange(spec.groups["att"])
    H, R, d = m.h, m.h // m.kv, (1 if m.rotary else m.dqk)
    if m.rotary and (R == H or m.alibi):
        pytest.skip("no cross-group swap to test")
    a, b = (0, d * R) if R < H and not m.alibi else (0, 1)  # another group's head / another dim
    bad[[a, b]] = torch.tensor([b, a])
    with pytest.raises(SpecError):
        mc.check_permutation(spec, {"att": bad})
    m.load_state_dict(mc.apply_permutation(spec, {"att": bad}, state))
    assert not torch.allclose(m(*args), ref, atol=1e-4)


def all_moves(h: Heads):
    """Every valid heads permutation's factors (brute force; tiny sizes only)."""
    G, R = h.group_size, h.heads_per_group

    def perms(n, free=True):
        return list(itertools.permutations(range(n))) if free else [tuple(range(n))]

    sigmas = perms(G, not h.fixed)
    taus = list(itertools.product(perms(R, not h.fixed), repeat=G))
    kv = [list(itertools.product(perms(d), repeat=G)) for _, d in h.kv_segments]
    unl = [
        list(itertools.product(perms(d), repeat=h.num_heads))
        for j, (_, d) in enumerate(h.segments)
        if h.link(j) < 0
    ]
    for sg, tu, *rest in itertools.product(sigmas, taus, *kv, *unl):
        kvd, qd = rest[: len(kv)], iter(rest[len(kv) :])
        q_dims = [list(next(qd)) if h.link(j) < 0 else [] for j in range(len(h.segments))]
        yield HeadsMoves(list(sg), [list(t) for t in tu], [list(x) for x in kvd], q_dims)


def brute(s, h, n):
    best = -np.inf
    for mv in all_moves(h):
        p = assemble(h, mv, n).numpy()
        best = max(best, s[np.arange(n), p].sum())
    return best


TINY = {
    # 4 query heads in 2 groups, linked q/k (dim 2) and o/v (dim 1): 18 units
    "gqa": (Heads(4, ((0, 2), (8, 1)), 2, ((12, 2), (16, 1)), (0, 1)), 18),
    # 3 query heads sharing one key/value head: the q/k dims are shared by all heads
    "mqa": (Heads(3, ((0, 2), (6, 1)), 1, ((9, 2), (11, 1)), (0, 1)), 12),
    # multi-head, today's meaning: q/k and v segments, dims free per head
    "mha": (Heads(2, ((0, 2), (4, 2))), 8),
    # unlinked q segment in a grouped layout + a kv segment
    "mixed": (Heads(4, ((0, 1), (4, 2)), 2, ((12, 2),), (-1, 0)), 16),
    "fixed": (Heads(2, ((0, 2), (4, 2)), fixed=True), 8),
    "gqa3": (Heads(6, ((0, 1), (6, 2)), 2, ((18, 1), (20, 2)), (0, 1)), 24),
}


@pytest.mark.parametrize("case", list(TINY))
def test_heads_assignment_matches_brute_force(case):
    h, n = TINY[case]
    rng = np.random.default_rng(1)
    for _ in range(3):
        s = rng.normal(size=(n, n))
        p = mc.solve_assignment(torch.from_numpy(s), h)
        decompose(h, p)  # valid
        assert np.isclose(s[np.arange(n), p.numpy()].sum(), brute(s, h, n)), case


def test_heads_alternation_is_monotone_local_and_recovers_planted():
    """R! above the enumeration limit: alternation. Never above the exact optimum; on a planted
    score (noise + the planted permutation's indicator) it finds the planted permutation."""
    h, n = TINY["gqa3"]
    rng = np.random.default_rng(2)
    gaps = []
    for seed in range(6):
        s = rng.normal(size=(n, n))
        alt = solve_heads(s, h, exact_limit=1).numpy()
        ex = solve_heads(s, h).numpy()
        v_alt, v_ex = s[np.arange(n), alt].sum(), s[np.arange(n), ex].sum()
        assert v_alt <= v_ex + 1e-9
        assert np.isclose(v_ex, brute(s, h, n))
        gaps.append(v_ex - v_alt)
        planted = mc.random_permutation(PermutationSpec({"a": n}, {}, heads={"a": h}), seed=seed)
        sp = 0.3 * rng.normal(size=(n, n))
        sp[np.arange(n), planted["a"].numpy()] += 1.0
        assert torch.equal(solve_heads(sp, h, exact_limit=1), planted["a"])
    print("alternation gap to the exact optimum on random scores:", np.round(gaps, 3))


def test_heads_check_rejects_what_breaks_the_symmetry():
    h, n = TINY["gqa"]
    spec = PermutationSpec({"a": n}, {}, heads={"a": h})
    ok = assemble(
        h, HeadsMoves([1, 0], [[1, 0], [0, 1]], [[[1, 0], [0, 1]], [[0], [0]]], [[], []]), n
    )
    mc.check_permutation(spec, {"a": ok})
    cross = torch.arange(n)  # query head 1 (group 0) <-> query head 2 (group 1), q only
    cross[2:4], cross[4:6] = torch.arange(4, 6), torch.arange(2, 4)
    with pytest.raises(SpecError, match="differently|group"):
        mc.check_permutation(spec, {"a": cross})
    unlinked = torch.arange(n)  # q dims of head 0 swapped, k dims of group 0 kept
    unlinked[[0, 1]] = torch.tensor([1, 0])
    with pytest.raises(SpecError, match="linked"):
        mc.check_permutation(spec, {"a": unlinked})
    fixed = PermutationSpec({"a": 8}, {}, heads={"a": TINY["fixed"][0]})
    swap = torch.tensor([2, 3, 0, 1, 6, 7, 4, 5])  # whole heads 0 <-> 1
    with pytest.raises(SpecError, match="fixed"):
        mc.check_permutation(fixed, {"a": swap})
    with pytest.raises(SpecError):
        Heads(4, ((0, 2),), num_kv_heads=3)
    with pytest.raises(SpecError):
        Heads(4, ((0, 2),), 2, ((8, 3),), (0,))  # linked dims differ
    with pytest.raises(SpecError, match="overlap"):
        PermutationSpec({"a": 8}, {}, heads={"a": Heads(2, ((0, 2), (2, 2)))})


def test_heads_spec_json_round_trip_keeps_old_form():
    spec = attention_spec(Attention(heads=4, kv=2, alibi=True))
    assert PermutationSpec.from_json(spec.to_json()) == spec
    old = {"groups": {"h": 8}, "heads": {"h": {"num_heads": 2, "segments": [[0, 2], [4, 2]]}}}
    assert PermutationSpec.from_dict(old).heads["h"] == Heads(2, ((0, 2), (4, 2)))
    assert PermutationSpec.from_dict(old).to_dict()["heads"] == old["heads"]


@pytest.mark.parametrize("kind", ["gqa", "mqa", "gqa-rotary"])
def test_weight_matching_recovers_planted_gqa_permutation(kind):
    torch.manual_seed(1)
    m = Attention(**KINDS[kind])
    spec = attention_spec(m)
    a = m.state_dict()
    p = mc.random_permutation(spec, seed=3)
    b = mc.apply_permutation(spec, p, a)
    got = mc.weight_matching(spec, a, b)
    assert torch.equal(got["att"], mc.inverse_permutation(p)["att"])
    back = mc.apply_permutation(spec, got, b)
    assert all(torch.equal(back[k], a[k]) for k in a)
