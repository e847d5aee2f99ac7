"""Contract tests over every zoo model (timm-style), plus each family's specific promises."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modeconn as mc
from modeconn.models.transformer import Attention

# Input shapes each built-in family is exercised with; any other registered model is tested with
# its default input shape.
SHAPES = {
    "mlp": [(40,), (1, 8, 8)],
    "cnn1d": [(40,), (2, 37)],
    "cnn": [(1, 8, 8), (3, 12, 10)],
    "resnet": [(1, 8, 8), (40,)],
    "transformer": [(40,), (1, 8, 8)],
}
EXTRA_KWARGS = {
    "mlp": [{"norm": "bn"}, {"norm": "ln"}],
    "cnn1d": [{"norm": "bn", "pool": "mean"}],
    "cnn": [{"norm": "bn"}],
    "resnet": [{"depth": 14, "width": 2}],
}


def _cases():
    for name in mc.models.names():
        shapes = SHAPES.get(name, [None])
        for shape in shapes:
            yield pytest.param(name, shape, {}, id=f"{name}-{shape}")
        for kw in EXTRA_KWARGS.get(name, []):
            yield pytest.param(name, shapes[0], kw, id=f"{name}-{shapes[0]}-{kw}")


def _build(name, shape, kw, seed=0, num_classes=7):
    args = dict(kw, num_classes=num_classes)
    if shape is not None:
        args["input_shape"] = shape
    return mc.models.create(name, seed=seed, **args)


def _input(model, n=5, seed=0):
    shape = tuple(model.modeconn_config["kwargs"]["input_shape"])
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("name", "shape", "kw"), list(_cases()))
class TestZooContract:
    def test_forward_backward_shapes(self, name, shape, kw):
        m = _build(name, shape, kw)
        x = _input(m)
        out = m(x)
        assert out.shape == (5, 7)
        F.cross_entropy(out, torch.arange(5) % 7).backward()
        for pname, p in m.named_parameters():
            assert p.grad is not None and p.grad.shape == p.shape, pname
            assert torch.isfinite(p.grad).all(), pname

    def test_seed_determinism_and_rng_untouched(self, name, shape, kw):
        before = torch.get_rng_state()
        a, b, c = (
            _build(name, shape, kw, seed=3),
            _build(name, shape, kw, seed=3),
            _build(name, shape, kw, seed=4),
        )
        assert torch.equal(torch.get_rng_state(), before)
        sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())

    def test_fx_trace_matches_and_batch_independent(self, name, shape, kw):
        m = _build(name, shape, kw).eval()
        x = _input(m)
        traced = torch.fx.symbolic_trace(m)
        with torch.no_grad():
            out = m(x)
            torch.testing.assert_close(traced(x), out)
            # one example alone gives the same logits as inside a batch (no batch-size mixing)
            torch.testing.assert_close(m(x[2:3]), out[2:3], rtol=1e-5, atol=1e-5)

    def test_config_recorded_and_rebuilds(self, name, shape, kw):
        m = _build(name, shape, kw)
        cfg = json.loads(json.dumps(m.modeconn_config))  # JSON-serialisable
        assert cfg["name"] == name
        again = mc.models.create(cfg["name"], **cfg["kwargs"])
        assert {k: v.shape for k, v in again.state_dict().items()} == {
            k: v.shape for k, v in m.state_dict().items()
        }


def test_names_lists_the_builtins_in_order():
    assert mc.models.names()[:5] == ["mlp", "cnn1d", "cnn", "resnet", "transformer"]


def test_unknown_model_lists_known_names():
    with pytest.raises(mc.ConfigError, match="unknown model 'vgg99'.*mlp.*transformer"):
        mc.models.create("vgg99")


def test_unknown_option_is_a_config_error():
    with pytest.raises(mc.ConfigError, match="no option 'widht'"):
        mc.models.create("mlp", widht=3)
    with pytest.raises(mc.ConfigError, match="depth must be 6n\\+2"):
        mc.models.create("resnet", depth=10)
    with pytest.raises(mc.ConfigError, match="norm"):
        mc.models.create("cnn", norm="ln")


def test_register_validates_names():
    with pytest.raises(mc.ConfigError, match="invalid"):
        mc.models.register("Bad Name")
    with pytest.raises(mc.ConfigError, match="already registered"):
        mc.models.register("mlp")


def test_resolve_import_path():
    m = mc.models.resolve("torch.nn:Linear", in_features=3, out_features=2)
    assert isinstance(m, nn.Linear)
    assert m.modeconn_config == {
        "name": "torch.nn:Linear",
        "kwargs": {"in_features": 3, "out_features": 2},
    }
    with pytest.raises(mc.ConfigError, match="cannot import"):
        mc.models.resolve("no_such_pkg.mod:fn")


def test_mlp_structure():
    m = mc.models.create("mlp", input_shape=(1, 8, 8), width=16, depth=4, norm="ln")
    assert [tuple(l.weight.shape) for l in m.layers] == [(16, 64)] + [(16, 16)] * 3
    assert all(isinstance(n, nn.LayerNorm) for n in m.norms)
    linear = mc.models.create("mlp", input_shape=(5,), num_classes=3, depth=0)
    assert [k for k in linear.state_dict()] == ["head.weight", "head.bias"]


def test_resnet_depth_width_and_projection_shortcuts():
    m = mc.models.create("resnet", input_shape=(3, 16, 16), depth=20, width=2)
    blocks = list(m.layers)
    assert len(blocks) == 9  # ResNet-20: 3 stages x 3 BasicBlocks
    projections = [i for i, b in enumerate(blocks) if isinstance(b.shortcut, nn.Sequential)]
    assert projections == [3, 6]  # where channels double and the resolution halves
    assert blocks[3].shortcut[0].kernel_size == (1, 1) and blocks[3].shortcut[0].stride == (2, 2)
    assert m.head.in_features == 64 * 2
    one_d = mc.models.create("resnet", input_shape=(40,))
    assert isinstance(one_d.stem, nn.Conv1d)


def test_transformer_attention_matches_sdpa():
    # oracle: torch's fused scaled_dot_product_attention with the same q/k/v projections
    torch.manual_seed(0)
    att = Attention(dim=12, num_heads=3, num_tokens=5)
    x = torch.randn(2, 5, 12)

    def heads(t):
        return t.reshape(2, 5, 3, 4).transpose(1, 2)

    ref = F.scaled_dot_product_attention(heads(att.q(x)), heads(att.k(x)), heads(att.v(x)))
    ref = att.out(ref.transpose(1, 2).reshape(2, 5, 12))
    torch.testing.assert_close(att(x), ref, rtol=1e-5, atol=1e-6)


def test_transformer_patches_tokens():
    m = mc.models.create("transformer", input_shape=(1, 8, 8), dim=16, num_heads=2, patch_size=4)
    assert m.num_tokens == 4 and m.embed.in_features == 16
    with pytest.raises(mc.ConfigError, match="patch_size"):
        mc.models.create("transformer", input_shape=(40,), patch_size=3)


def test_option_of_the_wrong_type_is_a_clear_config_error():
    # was "'<' not supported between instances of 'str' and 'int'"
    with pytest.raises(mc.ConfigError, match="option 'width' must be an integer, got 'abc'"):
        mc.models.create("mlp", width="abc")
    with pytest.raises(mc.ConfigError, match="option 'input_shape' must be a list of integers"):
        mc.models.create("cnn", input_shape="1,8,8")
    with pytest.raises(mc.ConfigError, match="option 'depth' must be an integer"):
        mc.models.create("mlp", depth=True)
    import numpy as np

    assert mc.models.create("mlp", input_shape=(np.int64(40),), width=np.int64(8)) is not None
