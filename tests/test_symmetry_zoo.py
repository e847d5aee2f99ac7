"""Ten plain-PyTorch architectures (tests/symmetry_zoo.py): a random permutation of the inferred
spec keeps the outputs (relative 1e-5, eval and train mode), and the parameter coverage (printed)
is what an expert expects: every tensor with a hidden axis is permuted; only the tensors named
here (the final classifier's bias, ...) stay put."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import modeconn as mc
import symmetry_zoo as Z
from symmetry_helpers import assert_symmetry, coverage, randomize


def tokens(n: int = 6) -> torch.Tensor:
    return torch.randint(0, 32, (2, n), generator=torch.Generator().manual_seed(0))


def img(size: int = 8) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


# name: (model factory, inputs, tensors an expert leaves unpermuted, attention groups)
CASES = {
    "nanogpt": (Z.NanoGPT, tokens, (), 2),
    "densenet": (Z.DenseNet, img, ("classifier.bias",), 0),
    "efficientnet_se": (Z.EfficientNet, img, ("classifier.bias",), 0),
    "mobilenetv3": (Z.MobileNetV3, img, ("classifier.bias",), 0),
    # a grouped conv's channels are groups x channels per group: a heads structure (per block)
    "regnet_group_conv": (Z.RegNet, img, ("fc.bias",), 2),
    "convnext_layernorm2d": (Z.ConvNeXt, img, ("head.bias",), 0),
    "unet": (Z.UNet, img, ("outc.bias",), 0),
    # the token-mixing MLP's output is the token axis (positions): its bias stays put
    "mlp_mixer": (
        Z.MLPMixer,
        img,
        ("head.bias", "blocks.0.token_mix.2.bias", "blocks.1.token_mix.2.bias"),
        0,
    ),
    "cross_attention": (
        Z.CrossAttentionBlock,
        lambda: (torch.randn(2, 5, 6), torch.randn(2, 3, 5)),
        ("proj_out.bias",),
        1,
    ),
    "llama_gqa_rotary": (Z.LlamaDecoder, tokens, (), 1),
}


def expected_coverage(model: nn.Module, unpermuted: tuple[str, ...]) -> float:
    state = {k: t for k, t in model.state_dict().items() if t.is_floating_point()}
    total = sum(t.numel() for t in state.values())
    return 1 - sum(state[k].numel() for k in unpermuted) / total


@pytest.mark.parametrize("name", list(CASES))
def test_plain_pytorch_architecture(name):
    factory, inputs, unpermuted, n_attention = CASES[name]
    torch.manual_seed(0)
    model = randomize(factory()).eval()
    x = inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an expert would call every pinned axis right: no warning
        spec = mc.infer_spec(model, x, verify=False)
    cov, want = coverage(model, spec), expected_coverage(model, unpermuted)
    print(f"{name}: {len(spec.groups)} groups, {len(spec.heads)} attention, coverage {cov:.4f}")
    assert cov == pytest.approx(want, abs=1e-9), (cov, want, spec.pins)
    assert len(spec.heads) == n_attention
    assert_symmetry(model, x, spec, seeds=(0,))
