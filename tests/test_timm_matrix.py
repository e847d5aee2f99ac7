"""Optional: the symmetry matrix over timm models (not part of CI; timm needs torchvision).

Run it in a venv with timm, e.g. the torch 2.14.1 one on these machines::

    PYTHONPATH=src /work/venvs/t214/bin/python -m pytest -q -s tests/test_timm_matrix.py

(``pip install torch==2.14.1 torchvision==0.29.1 timm`` makes one). For each model: a random
permutation of the inferred spec keeps the logits (relative 1e-5, perturbed weights), the
coverage (printed) is what an expert expects, and attention groups exist where the model has
heads.
"""

from __future__ import annotations

import time

import pytest
import torch

import modeconn as mc
from modeconn._src.symmetry.verify import _perturbed_state as perturbed_state
from symmetry_helpers import coverage, outputs

timm = pytest.importorskip("timm")

# name: (create_model kwargs, image size, Heads groups an expert expects: attention layers, and
# grouped (not depthwise) convolutions, whose groups move whole with channels permuted per group)
MODELS = {
    "resnet18": ({}, 32, 0),
    "convnext_atto": ({}, 32, 0),  # LayerNorm2d: a channels-first LayerNorm, traced into
    "vit_tiny_patch16_224": ({"img_size": 32}, 32, 12),
    "deit_tiny_patch16_224": ({"img_size": 32}, 32, 12),
    "efficientnet_b0": ({}, 32, 0),
    "mobilenetv3_small_100": ({}, 32, 0),
    "mobilenetv2_050": ({}, 32, 0),
    "regnetx_002": ({}, 32, 13),  # grouped convs: groups x channels per group (Heads groups)
    "swin_tiny_patch4_window7_224": ({"img_size": 56}, 56, 12),  # roll, relative-position bias
    "mixer_s32_224": ({"img_size": 64}, 64, 0),
    # qkv bias = cat(q_bias, zero k_bias buffer, v_bias); relative-position bias tables
    "beit_base_patch16_224": ({"img_size": 32, "depth": 2, "embed_dim": 64, "num_heads": 4}, 32, 2),
    "densenet121": ({}, 32, 0),
    "poolformer_s12": ({}, 32, 0),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_timm_model(name):
    kw, size, n_attention = MODELS[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kw).eval()
    # noise scaled to each tensor (so LayerNorm's ones and zero-init heads hide nothing), in
    # double precision (12 attention layers at float32 differ by ~1e-6 from summation order)
    model.load_state_dict(perturbed_state(model, 0))
    model = model.double()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    t = time.perf_counter()
    spec = mc.infer_spec(model, x, verify=False)
    took = time.perf_counter() - t
    state = model.state_dict()
    permuted = mc.apply_permutation(spec, mc.random_permutation(spec, seed=0), state)
    (a,), (b,) = outputs(model, state, x, train=False), outputs(model, permuted, x, train=False)
    rel = float((a - b).abs().max() / a.abs().max())
    cov = coverage(model, spec)
    head_bias = sum(
        t.numel()
        for k, t in state.items()
        if k.endswith(("head.fc.bias", "classifier.bias", "head.bias"))
    )
    total = sum(t.numel() for t in state.values() if t.is_floating_point())
    print(
        f"{name}: {len(spec.groups)} groups, {len(spec.heads)} attention, coverage {cov:.5f}, "
        f"rel diff {rel:.1e}, infer_spec {took:.2f} s"
    )
    assert rel < 1e-5
    assert cov >= 1 - (head_bias + 1e-3 * total) / total  # all but the classifier bias (±0.1%)
    assert len(spec.heads) == n_attention
