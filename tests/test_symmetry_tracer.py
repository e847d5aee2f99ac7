"""The tracer reads what eager code reads; the failures measured in issue 9, each as a test.

Each model here failed (or got a wrong or empty spec) with the tracer before the symmetry
package: factory calls sized by traced values (OPT, BART, a nanoGPT causal mask), ``torch.finfo``
of a traced dtype (BLOOM, T5), a module created inside ``forward`` (DistilBERT), ``h[arange,
argmax]`` (CLIP), ``torch.roll`` (Swin), channels-first LayerNorms (ConvNeXt), a custom
``autograd.Function`` (torch 2.14). Each must now keep its function under a random permutation
and permute the hidden units an expert would.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modeconn as mc
from modeconn._src.errors import SpecError
from symmetry_helpers import assert_symmetry, covered, randomize


class OnesMask(nn.Module):  # OPT/BART: torch.ones(x.shape[0], n)
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        m = torch.ones(x.shape[0], 8)
        return self.b(F.relu(self.a(x)) * m)


class Finfo(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        h = h.clamp(min=torch.finfo(h.dtype).min)
        if h.is_floating_point() and h.dtype == torch.float32:
            h = h + 0.0
        return self.b(F.relu(h))


class InnerModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        return self.b(nn.ReLU()(self.a(x)))


class Causal(nn.Module):  # nanoGPT
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.q = nn.Linear(8, 8)
        self.out = nn.Linear(8, 10)

    def forward(self, idx):
        b, t = idx.shape
        x = self.emb(idx)
        att = (self.q(x) @ x.transpose(-2, -1)) / math.sqrt(8)
        mask = torch.ones(t, t).tril().view(1, t, t)
        att = att.masked_fill(mask == 0, float("-inf")).softmax(-1)
        return self.out(att @ x)


class ArgmaxPick(nn.Module):  # CLIP text
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.a = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, idx):
        h = self.a(self.emb(idx))
        h = h[torch.arange(h.shape[0]), idx.argmax(dim=-1)]
        return self.out(h)


class Roll(nn.Module):  # Swin
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 8)
        self.b = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):  # x (B, H, W, 3)
        h = self.a(x)
        h = h + self.b(torch.roll(h, shifts=(1, 1), dims=(1, 2)).flip(1))
        return self.out(h.mean((1, 2)))


class LayerNorm2d(nn.LayerNorm):  # timm
    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNextLayerNorm(nn.Module):  # HF (older) channels_first
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n))

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        v = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(v + 1e-6)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvLN(nn.Module):
    def __init__(self, ln):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3)
        self.ln = ln
        self.d = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.d(F.gelu(self.ln(self.c(x))))


class Double(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


class AutoFn(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        return self.b(Double.apply(self.a(x)))


CASES = {  # name: (model, input, {param: axis that must be fully permuted})
    "ones": (OnesMask(), torch.randn(4, 6)),
    "finfo": (Finfo(), torch.randn(4, 6)),
    "inner_module": (InnerModule(), torch.randn(4, 6)),
    "causal": (Causal(), torch.randint(0, 10, (2, 5))),
    "argmax_pick": (ArgmaxPick(), torch.randint(0, 10, (2, 5))),
    "roll": (Roll(), torch.randn(2, 4, 4, 3)),
    "layernorm2d": (ConvLN(LayerNorm2d(8)), torch.randn(2, 3, 6, 6)),
    "convnext_ln": (ConvLN(ConvNextLayerNorm(8)), torch.randn(2, 3, 6, 6)),
    "autograd_fn": (AutoFn(), torch.randn(4, 6)),
}


EXPECT = {
    "ones": {"a.weight": 0},
    "finfo": {"a.weight": 0},
    "inner_module": {"a.weight": 0},
    "causal": {"q.weight": 0, "emb.weight": 1},
    "argmax_pick": {"a.weight": 0, "emb.weight": 1},
    "roll": {"a.weight": 0, "b.weight": 0},
    "layernorm2d": {"c.weight": 0, "ln.weight": 0},
    "convnext_ln": {"c.weight": 0, "ln.weight": 0},
    "autograd_fn": {"a.weight": 0},
}


@pytest.mark.parametrize("name", list(CASES))
def test_issue_cases_keep_their_function_and_their_units(name):
    model, x = CASES[name]
    model = randomize(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these should warn
        spec = mc.infer_spec(model, x, verify=False)
    state = model.state_dict()
    for param, axis in EXPECT[name].items():
        assert covered(spec, state, param, axis).all(), (param, spec.pins.get(param))
    assert_symmetry(model, x, spec, seeds=(0,))


def test_metadata_is_the_examples():
    """dtype/device/ndim are concrete: torch.finfo, comparisons and branches see real values."""
    seen = {}

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            h = self.a(x)
            seen["dtype"], seen["device"], seen["ndim"] = h.dtype, h.device, h.ndim
            seen["iinfo"] = torch.iinfo(torch.long).max
            seen["tensor"] = torch.is_tensor(h)
            return h * torch.finfo(h.dtype).eps

    mc.infer_spec(Probe(), torch.randn(2, 4), verify=False)
    assert seen == {
        "dtype": torch.float32,
        "device": torch.device("cpu"),
        "ndim": 2,
        "iinfo": torch.iinfo(torch.long).max,
        "tensor": True,
    }


def test_causal_mask_graph_runs_at_another_sequence_length():
    """torch.ones(t, t) sized by a traced value is a graph node: capture_sites reruns the graph
    at another length without retracing."""
    model = Causal().eval()
    spec = mc.infer_spec(model, torch.randint(0, 10, (2, 5)), verify=False)
    acts = mc.capture_sites(model, spec, torch.randint(0, 10, (3, 7)))
    assert acts and all(t.shape[:2] == (3, 7) for t in acts.values())


def test_register_rule_for_a_custom_autograd_function():
    class Opaque(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return torch.from_numpy(x.numpy() * 2)  # untraceable: kept as one node

        @staticmethod
        def backward(ctx, g):
            return g * 2

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.b(Opaque.apply(self.a(x)))

    x = torch.randn(4, 6)
    with pytest.warns(UserWarning, match=r"Opaque.apply at test_symmetry_tracer.py:\d+"):
        assert mc.infer_spec(M(), x, verify=False).groups == {}
    mc.register_rule(Opaque, "elementwise")
    try:
        spec = mc.infer_spec(M(), x, verify=False)
    finally:
        from modeconn._src.symmetry.registry import register

        register(Opaque, None)
    assert spec.groups == {"a": 8}
    assert_symmetry(randomize(M()), x, spec, seeds=(0,))


def fused_gate(x):  # a user function, registered below: the tracer records it as one op
    return x * torch.sigmoid(x)


def test_register_rule_for_a_plain_function_and_a_module_type():
    class Gate(nn.Module):
        def forward(self, x):
            return torch.from_numpy(x.numpy())  # untraceable unless kept whole

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.g, self.b = nn.Linear(6, 8), Gate(), nn.Linear(8, 3)

        def forward(self, x):
            return self.b(fused_gate(self.g(self.a(x))))

    from modeconn._src.symmetry.registry import register

    mc.register_rule(Gate, "elementwise")
    mc.register_rule(fused_gate, "elementwise")
    try:
        spec = mc.infer_spec(M(), torch.randn(4, 6), verify=False)
        from modeconn._src.symmetry.tracer import trace_model

        targets = [n.target for n in trace_model(M(), torch.randn(4, 6)).gm.graph.nodes]
    finally:
        register(Gate, None)
        register(fused_gate, None)
    assert spec.groups == {"a": 8}
    assert fused_gate in targets  # one node, not traced into
    with pytest.raises(SpecError, match="rule must be"):
        mc.register_rule(Gate, "mystery")


def test_untraceable_model_error_names_op_file_line_and_fix_in_one_line():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)

        def forward(self, x):
            return torch.from_numpy(self.a(x).numpy() * 2)

    with pytest.raises(SpecError) as e:
        mc.infer_spec(Bad(), torch.randn(2, 3))
    msg = str(e.value)
    assert "\n" not in msg
    assert "test_symmetry_tracer.py:" in msg and "numpy" in msg
    assert "register_rule" in msg and "from_axes" in msg


def test_one_warning_per_pinning_op_naming_it():
    """An unknown op used in every layer warns once, with its count and first place."""

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return x + torch.cumsum(self.fc(x), dim=-1)  # positions along the unit axis

    model = nn.Sequential(nn.Linear(4, 8), *[Layer() for _ in range(4)], nn.Linear(8, 2))
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        mc.infer_spec(model, torch.randn(3, 4), verify=False)
    msgs = [str(w.message) for w in ws if "infer_spec" in str(w.message)]
    assert len(msgs) == 1, msgs
    assert "torch.cumsum at test_symmetry_tracer.py:" in msgs[0] and "and 3 more" in msgs[0]


def test_spec_table_says_what_pinned_each_axis():
    model = Roll()
    spec = mc.infer_spec(model, torch.randn(2, 4, 4, 3), verify=False)
    assert spec.pins["a.weight"][1].startswith("network input")
    assert spec.pins["out.weight"][0] == "network output"
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(spec.table())
    text = console.export_text()
    assert "a.weight[1]: network input" in text and "out.bias[0]: network output" in text
    assert mc.PermutationSpec.from_json(spec.to_json()).pins == spec.pins


class BeitAttention(nn.Module):
    """timm's BEiT: the fused qkv bias is cat(q_bias, a zero k_bias buffer, v_bias)."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(5, dim), nn.Linear(dim, 3)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(dim)), nn.Parameter(torch.randn(dim))
        self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        self.proj, self.heads = nn.Linear(dim, dim), heads

    def forward(self, x):
        x = self.inp(x)
        B, N, C = x.shape
        qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = F.linear(x, weight=self.qkv.weight, bias=qkv_bias)
        q, k, v = qkv.reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        return self.out(x + self.proj(y))


def test_fused_qkv_bias_concatenated_with_a_zero_buffer_keeps_the_heads():
    """The concatenated bias and the reshape into (3, heads, dims) agree; the zero k_bias (not in
    the state dict) is constant, so reordering it changes nothing."""
    model = randomize(BeitAttention()).eval()
    model.k_bias.zero_()  # randomize() also perturbs buffers
    x = torch.randn(2, 4, 5)
    spec = mc.infer_spec(model, x, verify=False)
    assert len(spec.heads) == 1
    state = model.state_dict()
    assert covered(spec, state, "q_bias", 0).all() and covered(spec, state, "qkv.weight", 0).all()
    assert_symmetry(model, x, spec, seeds=(0, 1))


def test_values_read_only_for_their_shape_relate_nothing_but_in_place_ops_do():
    """BART reads ``x[:, :, -1]`` only for its shape: that slice must not pin x's units. An
    in-place op whose result is only measured still changes its input: it keeps its rule."""

    class ShapeOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x):
            h = self.a(x)
            n = h[:, :, -1].shape[-1]  # only the shape is read
            return self.b(h) * n

    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)
            self.s = nn.Parameter(torch.randn(8))

        def forward(self, x):
            h = self.a(x).clone()
            n = h.mul_(self.s).shape[-1]  # the result is only measured, h is changed
            return self.b(h) * n

    x = torch.randn(2, 5, 6)
    for cls in (ShapeOnly, InPlace):
        model = randomize(cls()).eval()
        spec = mc.infer_spec(model, x, verify=False)
        assert covered(spec, model.state_dict(), "a.weight", 0).all(), cls.__name__
        assert_symmetry(model, x, spec, seeds=(0,))


def test_attention_notes_of_head_resolution_become_one_warning_per_op(monkeypatch):
    """Head resolution's notes (attention blocks whose head dims it pinned) reach the walk's
    warnings: one warning naming the block, however many blocks; none without notes."""
    from modeconn._src.symmetry import emit

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            h = self.a(x)
            return self.mha(h, h, h, need_weights=False)[0]

    def infer_warnings() -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mc.infer_spec(Attn().eval(), torch.randn(2, 3, 8), verify=False)
        return [str(w.message) for w in caught if "modeconn.infer_spec" in str(w.message)]

    assert infer_warnings() == []
    real = emit.resolve_heads

    def noted(V, param_classes, descs, full=False):
        layout = real(V, param_classes, descs, full)
        hidden = sorted({V.find(v) for v in V.label})[:2]
        layout.notes = [
            ("attention", "whole heads move", repr(f"blk{i}"), [v]) for i, v in enumerate(hidden)
        ]
        return layout

    monkeypatch.setattr(emit, "resolve_heads", noted)
    got = infer_warnings()
    assert len(got) == 1 and "attention 'blk0' and 1 more (whole heads move)" in got[0], got
