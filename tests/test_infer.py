"""Tests of infer_spec: every inferred permutation keeps the function, and covers the hidden units.

Each model's weights are perturbed with noise first (so LayerNorm's ones and zero biases cannot
hide a wrong slot); outputs are compared in eval and train mode; the spec inference runs with
``verify=False`` so the inference itself is tested, not its safety net.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import modeconn as mc
import modeconn.models  # noqa: F401
from modeconn._src.errors import SpecError
from symmetry_helpers import (  # noqa: E402 (tests/ is on sys.path under pytest)
    assert_hidden_covered,
    assert_symmetry,
    covered,
    infer,
    randomize,
)

# --------------------------------------------------------------------------------------------
# the zoo: a contract over every registered model
# --------------------------------------------------------------------------------------------
ZOO_CASES = [
    # (name, kwargs, input shape, expected number of groups)
    ("mlp", {}, (40,), 3),
    ("mlp", {"norm": "bn"}, (40,), 3),
    ("mlp", {"norm": "ln"}, (40,), 3),
    ("cnn1d", {}, (40,), 3),
    ("cnn", {}, (1, 8, 8), 3),
    ("resnet", {}, (1, 8, 8), 6),  # 3 stages: a stream and a block-internal group each
    ("transformer", {}, (40,), 5),  # the stream; per block an attention group and an MLP group
]


def test_zoo_cases_cover_every_registered_model():
    builtins = [n for n in mc.models.names() if n in mc.models._BUILTINS]  # not test-registered
    assert len(builtins) == 5 and {c[0] for c in ZOO_CASES} >= set(builtins)


@pytest.mark.parametrize(
    ("name", "kwargs", "shape", "n_groups"), ZOO_CASES, ids=lambda v: str(v) if v else "-"
)
def test_zoo_model_permutation_keeps_the_function(name, kwargs, shape, n_groups):
    model = randomize(mc.models.create(name, input_shape=shape, num_classes=10, seed=0, **kwargs))
    x = torch.randn(6, *shape)
    spec = infer(model, x)
    print(f"{name} {kwargs}: {len(spec.groups)} groups (expected {n_groups}): {spec.groups}")
    assert len(spec.groups) == n_groups
    assert_symmetry(model, x, spec)
    assert_hidden_covered(model, spec, skip={"head"})
    # the network's input features and output classes are never permuted
    state = model.state_dict()
    first = next(k for k in state if k.endswith("weight"))
    assert not covered(spec, state, first, 1).any()
    assert not covered(spec, state, "head.weight", 0).any()


def test_zoo_transformer_attention_has_heads_structure():
    model = mc.models.create("transformer", input_shape=(40,), num_classes=10, dim=32, num_heads=4)
    spec = infer(model, torch.randn(2, 40))
    assert spec.heads["blocks.0.attn"] == mc.Heads(4, ((0, 8), (32, 8)))
    assert spec.groups["blocks.0.attn"] == 64
    assert spec.groups["stream"] == 32
    sites = {s.node for s in spec.sites["stream"]}
    assert len(sites) == 5  # ln1, ln2 of both blocks and the pooled features entering the head


def test_bn_running_stats_are_permuted():
    model = randomize(mc.models.create("mlp", input_shape=(40,), num_classes=10, norm="bn"))
    spec = infer(model, torch.randn(4, 40))
    params = spec.params()
    for i in range(3):
        assert {f"norms.{i}.running_mean", f"norms.{i}.running_var"} <= params


# --------------------------------------------------------------------------------------------
# models the zoo does not have, written the way users write them
# --------------------------------------------------------------------------------------------
class ResidualMLP(nn.Module):
    def __init__(self, d_in=12, width=16, depth=3, n_out=5):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(width),
                nn.Linear(width, 2 * width),
                nn.GELU(),
                nn.Linear(2 * width, width),
            )
            for _ in range(depth)
        )
        self.out = nn.Linear(width, n_out)

    def forward(self, x):
        h = self.inp(x)
        for blk in self.blocks:
            h = h + blk(h)
        return self.out(F.relu(h))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + identity)


class BottleneckResNet(nn.Module):
    def __init__(self, n_out=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(Bottleneck(16, 4), Bottleneck(16, 4))  # no projection
        self.layer2 = nn.Sequential(Bottleneck(16, 8, stride=2), Bottleneck(32, 8))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, n_out)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class UNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        d = torch.cat([self.up(e2), e1], dim=1)  # skip connection by concatenation
        return self.head(self.dec(d))


class CausalSelfAttention(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.register_buffer("bias", torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class GPTBlock(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, n_head)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(d, 4 * d), c_proj=nn.Linear(4 * d, d)))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x))))


class MiniGPT(nn.Module):
    """nanoGPT-style: fused qkv, causal mask buffer, tied token embedding and lm head."""

    def __init__(self, vocab=20, d=16, n_head=2, n_layer=2):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(16, d)
        self.h = nn.ModuleList(GPTBlock(d, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class SDPAttention(nn.Module):
    """Separate q/k/v projections with different q/k and v head sizes, through F.sdpa."""

    def __init__(self, d=12, heads=3, dqk=4, dv=5):
        super().__init__()
        self.h, self.dqk, self.dv = heads, dqk, dv
        self.q = nn.Linear(d, heads * dqk)
        self.k = nn.Linear(d, heads * dqk)
        self.v = nn.Linear(d, heads * dv)
        self.o = nn.Linear(heads * dv, d)

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q(x).reshape(B, T, self.h, self.dqk).permute(0, 2, 1, 3)
        k = self.k(x).reshape(B, T, self.h, self.dqk).permute(0, 2, 1, 3)
        v = self.v(x).reshape(B, T, self.h, self.dv).permute(0, 2, 1, 3)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.o(y.transpose(1, 2).flatten(2))


class TimmAttentionBlock(nn.Module):
    """timm ViT style: qkv reshaped to (B, N, 3, H, d), permuted, then indexed / unbound."""

    def __init__(self, dim=12, num_heads=3, unbind=False):
        super().__init__()
        self.num_heads, self.head_dim, self.unbind = num_heads, dim // num_heads, unbind
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, N, 3, self.num_heads, self.head_dim)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        if self.unbind:
            q, k, v = qkv.unbind(0)
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            q, k, v = qkv[0], qkv[1], qkv[2]
            y = (q @ k.transpose(-2, -1) * self.head_dim**-0.5).softmax(dim=-1) @ v
        x = x + self.proj(y.transpose(1, 2).reshape(B, N, C))
        return self.head(x.mean(1))


@pytest.mark.parametrize("unbind", [False, True])
def test_timm_style_qkv_gets_independent_qk_and_v_dims(unbind):
    model = randomize(TimmAttentionBlock(unbind=unbind))
    x = torch.randn(2, 5, 12)
    spec = infer(model, x)
    assert spec.heads == {"qkv": mc.Heads(3, ((0, 4), (12, 4)))}
    rows = sorted(
        (s.offset, s.unit_start, s.length) for _, s in spec.slots_of("qkv.weight") if s.axis == 0
    )
    assert rows == [(0, 0, 12), (12, 0, 12), (24, 12, 12)]
    assert_symmetry(model, x, spec)


def test_residual_mlp():
    model = randomize(ResidualMLP())
    x = torch.randn(5, 12)
    spec = infer(model, x)
    print("residual mlp groups:", spec.groups)
    assert len(spec.groups) == 4  # the stream + one hidden group per block
    assert spec.groups["stream"] == 16
    assert_symmetry(model, x, spec)
    assert_hidden_covered(model, spec, skip={"out"})


def test_bottleneck_resnet():
    model = randomize(BottleneckResNet())
    x = torch.randn(3, 3, 8, 8)
    spec = infer(model, x)
    print("bottleneck resnet groups:", spec.groups)
    # stem+layer1 stream, layer2 stream, and 2 inner groups per block (4 blocks)
    assert len(spec.groups) == 2 + 8
    assert_symmetry(model, x, spec)
    assert_hidden_covered(model, spec, skip={"fc"})


def test_unet_with_concatenation():
    model = randomize(UNet())
    x = torch.randn(2, 1, 8, 8)
    spec = infer(model, x)
    print("unet groups:", spec.groups, spec.heads)
    assert_symmetry(model, x, spec)
    assert_hidden_covered(model, spec, skip={"head"})
    # the decoder's input columns are the direct sum of the upsampled and the skip channels
    dec = [(g, s) for g, s in spec.slots_of("dec.0.weight") if s.axis == 1]
    assert {s.offset for _, s in dec} == {0, 8}
    assert len({g for g, _ in dec}) == 2


def test_gpt_with_fused_qkv_and_tied_embeddings():
    model = randomize(MiniGPT())
    assert model.lm_head.weight is model.wte.weight
    idx = torch.randint(0, 20, (3, 10))
    spec = infer(model, idx)
    print("minigpt groups:", spec.groups, spec.heads)
    assert len(spec.groups) == 1 + 2 * 2
    assert spec.heads["h.0.attn"] == mc.Heads(2, ((0, 8), (16, 8)))
    # tied weights: both keys are permuted, the same way, along the stream (axis 1)
    assert {"wte.weight", "lm_head.weight"} <= spec.params()
    assert not covered(spec, model.state_dict(), "wte.weight", 0).any()  # vocabulary stays
    assert covered(spec, model.state_dict(), "lm_head.weight", 1).all()
    # fused qkv rows: q at offset 0, k at offset 16 (units 0..15), v at 32 (units 16..31)
    rows = sorted(
        (s.offset, s.unit_start, s.length)
        for _, s in spec.slots_of("h.0.attn.c_attn.weight")
        if s.axis == 0
    )
    assert rows == [(0, 0, 16), (16, 0, 16), (32, 16, 16)]
    assert_symmetry(model, idx, spec)


def test_sdpa_attention_with_distinct_qk_and_v_head_sizes():
    model = randomize(SDPAttention())
    x = torch.randn(2, 6, 12)
    spec = infer(model, x)
    assert spec.heads[next(iter(spec.heads))] == mc.Heads(3, ((0, 4), (12, 5)))
    assert_symmetry(model, x, spec)


def test_torch_transformer_encoder():
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = randomize(
        nn.Sequential(
            nn.Linear(6, 16),
            nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
            nn.Linear(16, 3),
        )
    )
    x = torch.randn(2, 5, 6)
    spec = infer(model, x)
    print("TransformerEncoder groups:", spec.groups, spec.heads)
    assert len(spec.groups) == 1 + 2 * 2
    assert all(h == mc.Heads(4, ((0, 4), (16, 4))) for h in spec.heads.values())
    assert len(spec.heads) == 2
    assert_symmetry(model, x, spec)


@pytest.fixture(scope="module")
def hf():
    return pytest.importorskip("transformers")


def test_hf_bert(hf):
    cfg = hf.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = randomize(hf.BertForSequenceClassification(cfg).eval())
    ids = torch.randint(0, 50, (2, 7))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    spec = mc.infer_spec(model, inputs, verify=False)
    print(f"BERT: {len(spec.groups)} groups, {len(spec.heads)} attention groups: {spec.groups}")
    # stream, 2 x (attention, intermediate), pooler
    assert len(spec.groups) == 1 + 2 * 2 + 1
    assert len(spec.heads) == 2
    assert_symmetry(model, inputs, spec, seeds=(0,))


def test_hf_gpt2(hf):
    cfg = hf.GPT2Config(
        vocab_size=50,
        n_positions=16,
        n_embd=16,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    model = randomize(hf.GPT2LMHeadModel(cfg).eval())
    ids = torch.randint(0, 50, (2, 7))
    spec = mc.infer_spec(model, {"input_ids": ids}, verify=False)
    print(f"GPT-2: {len(spec.groups)} groups, {len(spec.heads)} attention groups: {spec.groups}")
    assert len(spec.groups) == 1 + 2 * 2  # stream, 2 x (attention, MLP)
    assert len(spec.heads) == 2
    assert {"transformer.wte.weight", "lm_head.weight"} & spec.params()
    assert_symmetry(model, {"input_ids": ids}, spec, seeds=(0,))


# --------------------------------------------------------------------------------------------
# unknown ops: conservative, never wrong
# --------------------------------------------------------------------------------------------
class _Mix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.from_numpy(x.detach().numpy()[:, ::-1].copy())  # reverses the channels

    @staticmethod
    def backward(ctx, g):
        return g.flip(1)


class WithCustomFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.c(F.relu(self.b(_Mix.apply(F.relu(self.a(x))))))


class WithFlipAndSlice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(11, 3)

    def forward(self, x):
        h = F.relu(self.a(x)).flip(1)  # position-dependent on the hidden axis
        g = F.relu(self.b(h))
        return self.c(torch.cat([g, g[:, :3]], dim=1))  # slicing the hidden axis


@pytest.mark.parametrize("cls", [WithCustomFunction, WithFlipAndSlice])
def test_unknown_ops_give_a_conservative_spec_with_a_warning(cls):
    model = randomize(cls())
    x = torch.randn(4, 6)
    with pytest.warns(UserWarning, match="not permuted"):
        spec = mc.infer_spec(model, x, verify=False)
    # a.weight's rows feed the unknown op: they must stay in place
    assert not covered(spec, model.state_dict(), "a.weight", 0).any()
    if spec.groups:
        assert_symmetry(model, x, spec)


def test_untraceable_model_raises_spec_error_naming_the_fix():
    class Bad(nn.Module):
        def forward(self, x):
            return torch.from_numpy(x.numpy() * 2)

    with pytest.raises(SpecError, match="from_axes"):
        mc.infer_spec(Bad(), torch.randn(2, 3))


def test_verification_drops_a_wrong_group():
    from modeconn._src.symmetry.verify import verify_spec

    model = randomize(
        nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    )
    x = torch.randn(5, 4)
    good = infer(model, x)
    wrong = mc.PermutationSpec(
        groups={**good.groups, "bad": 6},
        slots={**good.slots, "bad": (mc.Slot("2.bias", 0),)},  # a bias alone: breaks the function
    )
    with pytest.warns(UserWarning, match="bad"):
        fixed = verify_spec(model, wrong, {"input": x}, warn=True)
    assert set(fixed.groups) == set(good.groups)


# --------------------------------------------------------------------------------------------
# property test over random MLP / CNN shapes
# --------------------------------------------------------------------------------------------
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    widths=st.lists(st.integers(1, 7), min_size=1, max_size=3),
    conv=st.booleans(),
    norm=st.sampled_from([None, "bn", "ln"]),
    residual=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_property_random_mlps_and_cnns(widths, conv, norm, residual, seed):
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    cin = 2
    for w in widths:
        if conv:
            layers.append(nn.Conv1d(cin, w, 3, padding=1))
            if norm == "bn":
                layers.append(nn.BatchNorm1d(w))
            elif norm == "ln":
                layers.append(nn.GroupNorm(1, w))
        else:
            layers.append(nn.Linear(cin, w))
            if norm:
                layers.append(nn.BatchNorm1d(w) if norm == "bn" else nn.LayerNorm(w))
        layers.append(nn.ReLU())
        cin = w
    if residual:  # a residual block on the last hidden width
        body = nn.Sequential(nn.Conv1d(cin, cin, 1) if conv else nn.Linear(cin, cin), nn.Tanh())

        class Res(nn.Module):
            def __init__(self):
                super().__init__()
                self.body = body

            def forward(self, x):
                return x + self.body(x)

        layers.append(Res())
    layers += [nn.Flatten(), nn.Linear(cin * (5 if conv else 1), 3)]
    model = randomize(nn.Sequential(*layers), seed)
    x = torch.randn(4, 2, 5) if conv else torch.randn(4, 2)
    spec = infer(model, x)
    expected = sum(1 for w in widths if w > 1)
    assert len(spec.groups) == expected
    if spec.groups:
        assert_symmetry(model, x, spec, seeds=(seed,))


# --------------------------------------------------------------------------------------------
# capture_sites and the CLI
# --------------------------------------------------------------------------------------------
def test_capture_sites_returns_the_site_tensors_for_any_batch_size_and_state():
    model = randomize(mc.models.create("transformer", input_shape=(40,), num_classes=10))
    spec = infer(model, torch.randn(2, 40))
    x = torch.randn(7, 40)
    acts = mc.capture_sites(model, spec, x)
    assert set(acts) == {s.node for ss in spec.sites.values() for s in ss}
    site = spec.sites["blocks.0.mlp.fc1"][0]
    with torch.no_grad():  # the MLP hidden activation, computed by hand
        b = model.blocks[0]
        h = model.embed(model._tokens(x)) + model.pos
        h = h + b.attn(b.ln1(h))
        ref = F.gelu(b.mlp.fc1(b.ln2(h)))
    assert torch.allclose(acts[site.node], ref, atol=1e-5)
    # with a permuted state, the sites carry the permuted units
    perm = mc.random_permutation(spec, seed=0)
    state = mc.apply_permutation(spec, perm, model.state_dict())
    got = mc.capture_sites(model, spec, x, state=state)[site.node]
    assert torch.allclose(got, ref[..., perm["blocks.0.mlp.fc1"]], atol=1e-5)


def test_cli_spec_prints_groups_and_writes_json(run_cli, tmp_path):
    out_json = tmp_path / "spec.json"
    code, out, _ = run_cli(
        "spec",
        "resnet",
        "--zoo",
        "--input-shape",
        "[1,8,8]",
        "--json",
        out_json,
    )
    assert code == 0 and "layers.1.stream" in out
    spec = mc.PermutationSpec.from_json(out_json.read_text())
    assert len(spec.groups) == 6
    code, _, err = run_cli("spec", tmp_path / "missing.safetensors")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------
# more models written the way users write them (review: each one a way to break the analysis)
# --------------------------------------------------------------------------------------------
class _Net(nn.Module):
    """A model given by its layers and a forward function (keeps the cases below short)."""

    def __init__(self, fwd, **layers):
        super().__init__()
        self.fwd = fwd
        for k, v in layers.items():
            setattr(self, k, v)

    def forward(self, x):
        return self.fwd(self, x)


def _std_positional(m, x):  # std(x, dim, unbiased): the 3rd positional argument is not keepdim
    s = F.relu(m.a(x)).std(2, True)  # (B, C, L) -> (B, C)
    return m.b(s) * s.std(1, True)[:, None]


def _chunk_gate(m, x):  # chunk / split along the channel axis, GLU-style gating
    u, v = m.a(x).chunk(2, dim=1)
    p, q = torch.split(m.c(x), [2, 4], dim=-1)
    return m.b(u * torch.sigmoid(v)) + m.d(q) + p.sum(1, keepdim=True)


def _transposed_linear(m, x):  # conv features transposed to tokens, a Linear over channels
    h = F.relu(m.a(x)).transpose(1, 2)  # (B, L, C)
    h = F.relu(m.b(h))
    h = m.t(h.permute(0, 2, 1)).permute(0, 2, 1)  # token mixing over L (the input's length)
    return m.o(h).mean(1)


def _squeeze_excite(m, x):
    h = F.relu(m.conv(x))
    B, C, _, _ = h.shape
    w = torch.sigmoid(m.f2(F.relu(m.f1(h.mean((2, 3)))))).view(B, C, 1, 1)
    return m.head((h * w).flatten(2).mean(-1))


def _broadcast_adds(m, x):  # parameters added with broadcasting, a mean over the channel axis
    h = m.a(x) + m.g  # (B, C) + (C,)
    h = h + m.c + h.mean(dim=1, keepdim=True)  # (1, C); a reduction over the channels
    return m.b(F.relu(h))


def _broadcast_over_length(m, x):  # (B, C=4, L=4) + (4,): broadcasts over L, not C
    return m.b((m.a(x) + m.p).mean(-1))


def _tied_chain(m, x):  # one weight used by two layers
    h = F.relu(m.i(x))
    return m.o(F.relu(m.b(F.relu(m.a(h)))))


def _tied_transpose(m, x):  # autoencoder: the decoder uses the encoder's weight transposed
    h = F.relu(m.i(x))
    return m.o(F.linear(F.relu(m.e(h)), m.e.weight.t()))


def _shared_module(m, x):  # one module applied twice
    h = F.relu(m.i(x))
    return m.o(F.relu(m.m(F.relu(m.m(h)))))


def _functional_prelu(m, x):
    return m.b(F.prelu(m.a(x), m.w))


def _repeat(m, x):  # tiled copies of the hidden units
    return m.b(m.a(x).repeat(1, 2))


def _mha(m, x):
    h = m.i(x)
    k = F.relu(m.j(x))
    a, _ = m.att(h, k, k)
    return m.o(h + a)


def _make_attention(kind):
    d, H = 12, 3
    hd = d // H
    kv = hd if kind == "mqa" else d

    def fwd(m, x):
        h = m.inp(x)
        B, T, C = h.shape
        q = m.q(h).view(B, T, H, hd).transpose(1, 2)
        k = m.k(h).view(B, T, -1, hd).transpose(1, 2)  # one k/v head for all (multi-query)
        v = m.v(h).view(B, T, -1, hd).transpose(1, 2)
        if kind == "rope":  # rotary q/k: the head dims are paired by position
            ang = torch.arange(T).float()[:, None] * torch.arange(hd // 2).float()[None]
            cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

            def rot(t):
                return torch.cat([-t[..., hd // 2 :], t[..., : hd // 2]], -1)

            q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        att = q @ k.transpose(-1, -2)
        if kind == "relbias":  # a learned bias per head (T5, Swin)
            att = att + m.rel[None, :, :T, :T]
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
        return m.head((h + m.o(y)).mean(1))

    return _Net(
        fwd,
        inp=nn.Linear(5, d),
        q=nn.Linear(d, d),
        k=nn.Linear(d, kv),
        v=nn.Linear(d, kv),
        o=nn.Linear(d, d),
        head=nn.Linear(d, 2),
        rel=nn.Parameter(torch.randn(H, 6, 6)),
    )


def _tied(a, b):
    b.weight = a.weight
    return b


USER_CASES = {
    # name: (model factory, input shape, expected groups {name: size} or None (just sound))
    "std_positional_unbiased": (
        lambda: _Net(_std_positional, a=nn.Conv1d(2, 6, 3, padding=1), b=nn.Linear(6, 3)),
        (5, 2, 7),
        {"a": 6},
    ),
    "chunk_split_channels": (
        lambda: _Net(
            _chunk_gate, a=nn.Linear(4, 12), b=nn.Linear(6, 3), c=nn.Linear(4, 6), d=nn.Linear(4, 3)
        ),
        (5, 4),
        None,
    ),
    "transpose_then_linear": (
        lambda: _Net(
            _transposed_linear,
            a=nn.Conv1d(3, 6, 3, padding=1),
            b=nn.Linear(6, 5),
            t=nn.Linear(7, 7),
            o=nn.Linear(5, 2),
        ),
        (4, 3, 7),
        {"a": 6, "b": 5, "t": 7},
    ),
    "glu_module": (
        lambda: nn.Sequential(nn.Linear(4, 12), nn.GLU(), nn.Linear(6, 3)),
        (5, 4),
        None,
    ),
    "glu_conv": (
        lambda: nn.Sequential(nn.Conv1d(2, 12, 3), nn.GLU(dim=1), nn.Conv1d(6, 3, 1)),
        (5, 2, 8),
        None,
    ),
    "prelu_per_channel": (
        lambda: nn.Sequential(nn.Conv2d(2, 6, 3), nn.PReLU(6), nn.Conv2d(6, 3, 1)),
        (5, 2, 6, 6),
        {"0": 6},
    ),
    "prelu_functional": (
        lambda: _Net(
            _functional_prelu, a=nn.Linear(4, 6), w=nn.Parameter(torch.rand(6)), b=nn.Linear(6, 3)
        ),
        (5, 4),
        {"a": 6},
    ),
    "grouped_conv": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 8, 3),
            nn.ReLU(),
            nn.Conv2d(8, 12, 3, groups=2),
            nn.ReLU(),
            nn.Conv2d(12, 12, 1, groups=4),
            nn.ReLU(),
            nn.Conv2d(12, 3, 1),
        ),
        (3, 2, 8, 8),
        None,
    ),
    "depthwise_conv": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 8, 3),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, groups=8),
            nn.ReLU(),
            nn.Conv2d(16, 3, 1),
        ),
        (3, 2, 8, 8),
        None,
    ),
    "bn_without_running_stats": (
        lambda: nn.Sequential(
            nn.Linear(4, 6),
            nn.BatchNorm1d(6, track_running_stats=False),
            nn.ReLU(),
            nn.Linear(6, 3),
        ),
        (5, 4),
        {"0": 6},
    ),
    "bn_without_affine": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 6, 3),
            nn.BatchNorm2d(6, affine=False),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(6 * 16, 3),
        ),
        (5, 2, 6, 6),
        {"0": 6},
    ),
    "embedding_padding_idx": (
        lambda: nn.Sequential(
            nn.Embedding(10, 6, padding_idx=0), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)
        ),
        "tokens",
        {"0": 6, "1": 8},
    ),
    "weight_tied_chain": (
        lambda: _Net(
            _tied_chain,
            i=nn.Linear(3, 6),
            a=(a := nn.Linear(6, 6)),
            b=_tied(a, nn.Linear(6, 6)),
            o=nn.Linear(6, 2),
        ),
        (5, 3),
        {"i": 6},
    ),
    "weight_tied_transpose": (
        lambda: _Net(_tied_transpose, i=nn.Linear(3, 6), e=nn.Linear(6, 8), o=nn.Linear(6, 2)),
        (5, 3),
        {"i": 6, "e": 8},
    ),
    "shared_module": (
        lambda: _Net(_shared_module, i=nn.Linear(3, 6), m=nn.Linear(6, 6), o=nn.Linear(6, 2)),
        (5, 3),
        {"i": 6},
    ),
    "squeeze_excitation": (
        lambda: _Net(
            _squeeze_excite,
            conv=nn.Conv2d(3, 8, 3, padding=1),
            f1=nn.Linear(8, 4),
            f2=nn.Linear(4, 8),
            head=nn.Linear(8, 2),
        ),
        (3, 3, 6, 6),
        {"conv": 8, "f1": 4},
    ),
    "broadcast_residual_adds": (
        lambda: _Net(
            _broadcast_adds,
            a=nn.Linear(4, 6),
            g=nn.Parameter(torch.randn(6)),
            c=nn.Parameter(torch.randn(1, 6)),
            b=nn.Linear(6, 3),
        ),
        (5, 4),
        {"a": 6},
    ),
    "broadcast_over_length_not_channels": (
        lambda: _Net(
            _broadcast_over_length,
            a=nn.Conv1d(3, 4, 1),
            p=nn.Parameter(torch.randn(4)),
            b=nn.Linear(4, 2),
        ),
        (5, 3, 4),
        {"a": 4},
    ),
    "repeat_tiles": (
        lambda: _Net(_repeat, a=nn.Linear(4, 6), b=nn.Linear(12, 3)),
        (5, 4),
        {"a": 6},
    ),
    "mha_kdim_bias_kv": (
        lambda: _Net(
            _mha,
            i=nn.Linear(3, 8),
            j=nn.Linear(3, 6),
            att=nn.MultiheadAttention(8, 2, kdim=6, vdim=6, batch_first=True, add_bias_kv=True),
            o=nn.Linear(8, 2),
        ),
        (2, 5, 3),
        {"stream": 8, "j": 6, "att": 16},
    ),
    # 3 heads: rotary q/k dims move as one block per head (1 unit), v dims (4) freely
    "attention_rotary": (lambda: _make_attention("rope"), (2, 6, 5), {"stream": 12, "q": 15}),
    # 3 heads x (4 q/k dims + 4 v dims + 1 relative-bias table column)
    "attention_relative_bias": (
        lambda: _make_attention("relbias"),
        (2, 6, 5),
        {"stream": 12, "q": 27},
    ),
    # multi-query: query heads, their q dims, the shared k/v dims
    "attention_multi_query": (lambda: _make_attention("mqa"), (2, 6, 5), {"stream": 12, "q": 32}),
}


@pytest.mark.parametrize("case", list(USER_CASES))
def test_user_written_models_keep_their_function(case):
    """Each spec is exact (eval and train mode) without the verification step; where the
    symmetry is only partly known (grouped convs, rotary dims) it is smaller, never wrong."""
    factory, shape, expected = USER_CASES[case]
    torch.manual_seed(0)
    model = randomize(factory())
    x = torch.randint(0, 10, (4, 5)) if shape == "tokens" else torch.randn(*shape)
    spec = infer(model, x)
    print(case, spec.groups, spec.heads)
    if expected is not None:
        assert spec.groups == expected
    assert_symmetry(model, x, spec, seeds=(0, 1, 2))


def test_rotary_attention_keeps_one_head_permutation_for_qk_and_v():
    """Rotary q/k dims are pinned inside a head (one block per head); the heads of q/k and of v
    must still move together (one heads group), not as two independent head groups."""
    model = randomize(_make_attention("rope"))
    spec = infer(model, torch.randn(2, 6, 5))
    (g,) = [g for g in spec.groups if g != "stream"]
    assert spec.heads[g].num_heads == 3
    params = {s.param for s in spec.slots[g]}
    assert {"q.weight", "k.weight", "v.weight", "o.weight"} <= params


def test_grouped_transposed_conv_is_pinned_with_its_weight():
    model = randomize(
        nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2),
            nn.ReLU(),
            nn.Conv2d(6, 1, 1),
        )
    )
    x = torch.randn(2, 1, 4, 4)
    with pytest.warns(UserWarning, match="grouped transposed convolution"):
        spec = mc.infer_spec(model, x, verify=False)
    assert not any(p.startswith("2.") for p in spec.params())  # its weight alone: never permuted


def test_a_model_that_fails_on_its_example_inputs_gets_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 12), nn.ReLU(), nn.Linear(4, 3))  # 12 != 4
    with pytest.raises(SpecError, match=r"fails on the example inputs in module '2' \(Linear\)"):
        mc.infer_spec(model, torch.randn(3, 4))


def test_untraceable_model_error_says_how_to_pass_a_spec():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)

        def forward(self, x):
            return self.a(torch.from_numpy(x.numpy() * 2))

    with pytest.raises(SpecError, match="spec=") as e:
        mc.infer_spec(Bad(), torch.randn(2, 3))
    assert "PermutationSpec.from_axes" in str(e.value)


def test_parametrized_weights_are_pinned_with_a_warning():
    """weight_norm computes a Linear's weight from other tensors: its axes cannot be permuted
    through the computed weight, so they are pinned, and the user is told why."""
    model = randomize(
        nn.Sequential(
            nn.Linear(3, 6),
            nn.ReLU(),
            nn.utils.parametrizations.weight_norm(nn.Linear(6, 6)),
            nn.ReLU(),
            nn.Linear(6, 2),
        )
    )
    with pytest.warns(UserWarning, match=r"ParametrizedLinear '2'.*weight is computed"):
        spec = mc.infer_spec(model, torch.randn(4, 3), verify=False)
    assert spec.groups == {}
