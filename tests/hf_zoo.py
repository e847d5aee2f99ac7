"""Tiny Hugging Face ``transformers`` models, one per family, for the symmetry acceptance matrix.

Each :class:`Family` builds a model from a tiny config (random weights, nothing downloaded) and an
example input, and records what an expert expects of its permutation symmetry: the parameter
coverage (share of parameter elements in tensors some group permutes), the number of attention
groups, and their structure ``(query heads, key/value heads, fixed order, units per query head,
units per key/value head)`` -- rotary embeddings pin the q/k dims (a head's q/k block is one unit),
grouped-query attention has key/value segments. Used by tests/test_hf_matrix.py and
benchmarks/bench_spec.py; transformers is imported lazily.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

import modeconn as mc

V, D, L, H, FF, T = 64, 16, 2, 4, 24, 7  # vocab, width, layers, heads, MLP width, tokens


class Task(nn.Module):
    """A model's task output only (``logits``, ...): what a user compares, not the hidden states."""

    def __init__(self, model: nn.Module, field: str = "logits") -> None:
        super().__init__()
        self.model, self.field = model, field

    def forward(self, **kw: Any) -> torch.Tensor:
        return getattr(self.model(**kw), self.field)


Sig = tuple[int, int, bool, int, int]


@dataclass
class Family:
    name: str
    build: Callable[[Any], tuple[nn.Module, dict[str, torch.Tensor]]]
    unpermuted: tuple[str, ...]  # tensors (name suffixes) an expert leaves unpermuted
    attention: int  # expected number of attention groups
    heads: tuple[Sig, ...]  # expected structures (H, G, fixed, units/q head, units/kv head)
    why: str = ""  # what the expectation rests on


def ids(n: int = T, vocab: int = V) -> torch.Tensor:
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(0))


def lm(cfg_cls: str, **kw: Any) -> Callable[[Any], tuple[nn.Module, dict[str, torch.Tensor]]]:
    def build(hf: Any) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        cfg = getattr(hf, cfg_cls)(use_cache=False, **kw)
        return Task(hf.AutoModelForCausalLM.from_config(cfg)), {"input_ids": ids()}

    return build


def enc(cfg_cls: str, **kw: Any) -> Callable[[Any], tuple[nn.Module, dict[str, torch.Tensor]]]:
    def build(hf: Any) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        cfg = getattr(hf, cfg_cls)(num_labels=3, **kw)
        x = ids()
        model = hf.AutoModelForSequenceClassification.from_config(cfg)
        return Task(model), {"input_ids": x, "attention_mask": torch.ones_like(x)}

    return build


def vision(cfg_cls: str, size: int = 16, **kw: Any) -> Callable[[Any], Any]:
    def build(hf: Any) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        cfg = getattr(hf, cfg_cls)(num_labels=3, **kw)
        cls = cfg_cls.replace("Config", "ForImageClassification")
        model = getattr(hf, cls)(cfg)
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        return Task(model), {"pixel_values": x}

    return build


LLAMA = dict(
    vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=L,
    num_attention_heads=H, num_key_value_heads=2, max_position_embeddings=32,
)  # fmt: skip
BERT = dict(
    vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
    intermediate_size=FF, max_position_embeddings=32,
)  # fmt: skip
MHA = (H, H, False, 2 * (D // H), 0)  # q/k and v/o segments, dims free
ROT_MHA = (H, H, False, 1 + D // H, 0)  # rotary: a head's q/k block is one unit
ROT_GQA = (H, 2, False, 1 + D // H, 1 + D // H)
LM, CLS = ("lm_head.bias",), ("classifier.bias",)
RCLS = ("classifier.out_proj.bias",)


def _t5(hf: Any) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    cfg = hf.T5Config(
        vocab_size=V, d_model=D, d_kv=D // H, d_ff=FF, num_layers=L, num_heads=H,
        relative_attention_num_buckets=8, use_cache=False, decoder_start_token_id=0,
    )  # fmt: skip
    m = hf.T5ForConditionalGeneration(cfg)
    return Task(m), {"input_ids": ids(), "decoder_input_ids": ids(5)}


def _bart(hf: Any) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    cfg = hf.BartConfig(
        vocab_size=V, d_model=D, encoder_layers=L, decoder_layers=L, encoder_attention_heads=H,
        decoder_attention_heads=H, encoder_ffn_dim=FF, decoder_ffn_dim=FF,
        max_position_embeddings=32, use_cache=False,
    )  # fmt: skip
    return Task(hf.BartForConditionalGeneration(cfg)), {
        "input_ids": ids(), "decoder_input_ids": ids(5),
    }  # fmt: skip


def _whisper(hf: Any) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    cfg = hf.WhisperConfig(
        vocab_size=V, num_mel_bins=8, d_model=D, encoder_layers=L, decoder_layers=L,
        encoder_attention_heads=H, decoder_attention_heads=H, encoder_ffn_dim=FF,
        decoder_ffn_dim=FF, max_source_positions=8, max_target_positions=16, use_cache=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )  # fmt: skip
    feats = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(0))
    return Task(hf.WhisperForConditionalGeneration(cfg)), {
        "input_features": feats, "decoder_input_ids": ids(5),
    }  # fmt: skip


def _clip(hf: Any) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    cfg = hf.CLIPConfig(
        text_config=dict(BERT, max_position_embeddings=T, eos_token_id=V - 1),
        vision_config=dict(hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
                           intermediate_size=FF, image_size=16, patch_size=8),
        projection_dim=8,
    )  # fmt: skip
    pix = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return Task(hf.CLIPModel(cfg), "logits_per_image"), {"input_ids": ids(), "pixel_values": pix}


VIT = dict(hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=FF,
           image_size=16, patch_size=8)  # fmt: skip

FAMILIES = [
    # --- decoder-only ----------------------------------------------------------------------
    Family("gpt2", lm("GPT2Config", vocab_size=V, n_embd=D, n_layer=L, n_head=H, n_positions=32),
           (), L, (MHA,), "learned positions, Conv1D, fused c_attn"),
    Family("opt", lm("OPTConfig", vocab_size=V, hidden_size=D, ffn_dim=FF, num_hidden_layers=L,
                     num_attention_heads=H, max_position_embeddings=32, word_embed_proj_dim=D),
           (), L, (MHA,), "learned positions; run-time causal mask"),
    Family("bloom", lm("BloomConfig", vocab_size=V, hidden_size=D, n_layer=L, n_head=H),
           (), L, ((H, H, True, 2 * (D // H), 0),), "ALiBi pins head order, not dims"),
    Family("llama", lm("LlamaConfig", **LLAMA), (), L, (ROT_GQA,), "GQA 4 q / 2 kv, rotary"),
    Family("mistral", lm("MistralConfig", **LLAMA), (), L, (ROT_GQA,), "GQA, rotary"),
    Family("qwen2", lm("Qwen2Config", **LLAMA), (), L, (ROT_GQA,), "GQA, rotary, q/k/v bias"),
    Family("gemma", lm("GemmaConfig", **dict(LLAMA, num_key_value_heads=1, head_dim=D // H)),
           (), L, ((H, 1, False, 1 + D // H, D // H),),
           "MQA (rotary: the one key head has no units, its v dims do), tied embeddings"),
    Family("phi", lm("PhiConfig", vocab_size=V, hidden_size=D, intermediate_size=FF,
                     num_hidden_layers=L, num_attention_heads=H, max_position_embeddings=32,
                     partial_rotary_factor=0.5), LM, L, ((H, H, False, 1 + 2 + D // H, 0),),
           "partial rotary: half the q/k dims free"),
    Family("gpt_neox", lm("GPTNeoXConfig", vocab_size=V, hidden_size=D, intermediate_size=FF,
                          num_hidden_layers=L, num_attention_heads=H, max_position_embeddings=32,
                          rotary_pct=0.5), (), L, ((H, H, False, 1 + 2 + D // H, 0),),
           "fused qkv interleaved per head, partial rotary"),
    Family("gptj", lm("GPTJConfig", vocab_size=V, n_embd=D, n_layer=L, n_head=H, n_positions=32,
                      rotary_dim=2), LM, L, ((H, H, False, 1 + 2 + D // H, 0),),
           "rotary on 2 of 4 q/k dims, parallel attention + MLP"),
    Family("falcon", lm("FalconConfig", vocab_size=V, hidden_size=D, num_hidden_layers=L,
                        num_attention_heads=H, num_kv_heads=2, new_decoder_architecture=True),
           (), L, (ROT_GQA,), "fused qkv interleaved per key/value group"),
    Family("gpt_bigcode", lm("GPTBigCodeConfig", vocab_size=V, n_embd=D, n_layer=L, n_head=H,
                             n_positions=32, multi_query=True),
           (), L, ((H, 1, False, 2 * (D // H), 2 * (D // H)),), "MQA, fused [q | k | v]"),
    Family("qwen3", lm("Qwen3Config", **dict(LLAMA, head_dim=D // H)),
           ("q_norm.weight", "k_norm.weight"), L, (ROT_GQA,),
           "GQA, rotary, per-head q/k RMSNorm (its weight: rotary-pinned dims)"),
    # --- encoders ---------------------------------------------------------------------------
    Family("bert", enc("BertConfig", **BERT), CLS, L, (MHA,), "absolute positions"),
    Family("roberta", enc("RobertaConfig", **BERT, pad_token_id=1), RCLS, L, (MHA,), ""),
    Family("distilbert", enc("DistilBertConfig", vocab_size=V, dim=D, n_layers=L, n_heads=H,
                             hidden_dim=FF, max_position_embeddings=32), CLS, L, (MHA,),
           "nn.ReLU() built inside forward"),
    Family("albert", enc("AlbertConfig", **BERT, embedding_size=8), CLS, 1, (MHA,),
           "one layer shared by both passes: one attention group"),
    Family("electra", enc("ElectraConfig", **BERT, embedding_size=8), RCLS, L, (MHA,), ""),
    # --- encoder-decoders -------------------------------------------------------------------
    Family("t5", _t5, (), 3, ((H, H, False, 2 * 8 + 1, 0), (H, H, False, 2 * 8, 0)),
           "layer 0's relative-bias table (one unit per head) is reused by every layer: one "
           "head order per stack (encoder, decoder self, decoder cross: its zero bias is shared)"),
    Family("bart", _bart, (), 3 * L, (MHA,), "self + cross attention"),
    Family("whisper", _whisper, (), 3 * L, (MHA,), "conv front end, k_proj without bias"),
    # --- vision -----------------------------------------------------------------------------
    Family("vit", vision("ViTConfig", **VIT), CLS, L, (MHA,), "patch conv, cls token"),
    Family("deit", vision("DeiTConfig", **VIT), CLS, L, (MHA,), "cls + distillation tokens"),
    Family("swin", vision("SwinConfig", size=32, patch_size=4, embed_dim=8, depths=[1, 1],
                          num_heads=[2, 4], window_size=4, mlp_ratio=2.0), CLS, 2,
           ((2, 2, False, 9, 0), (4, 4, False, 9, 0)),
           "roll on spatial axes; relative-position table: one unit per head"),
    Family("convnext", vision("ConvNextConfig", num_channels=3, hidden_sizes=[8, 16],
                              depths=[1, 1], num_stages=2, patch_size=4), CLS, 0, (),
           "channels-first LayerNorm subclass"),
    Family("resnet", vision("ResNetConfig", embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                            layer_type="basic"), ("classifier.1.bias",), 0, (),
           "BatchNorm residual CNN"),
    Family("mobilenet_v2", vision("MobileNetV2Config", size=32, depth_multiplier=0.25,
                                  image_size=32, min_depth=4), CLS, 0, (),
           "depthwise convs, ReLU6"),
    Family("clip", _clip, ("logit_scale",), 2 * L, (MHA,),
           "text: h[arange, argmax] pooling; logit_scale is a scalar"),
]  # fmt: skip

BY_NAME = {f.name: f for f in FAMILIES}


def coverage(spec: Any, model: nn.Module) -> float:
    """Share of parameter elements (shared tensors once) in tensors some group permutes."""
    names: dict[int, list[str]] = {}
    sizes: dict[int, int] = {}
    for k, p in model.named_parameters(remove_duplicate=False):  # tied weights: one tensor
        names.setdefault(id(p), []).append(k)
        sizes[id(p)] = p.numel()
    covered = spec.params()
    done = sum(sizes[i] for i, ks in names.items() if covered & set(ks))
    return done / sum(sizes.values())


def heads_signature(h: Any) -> tuple[int, int, bool, int, int]:
    """``(H, G, fixed, units per query head, units per key/value head)`` of a ``Heads``."""
    return (
        h.num_heads,
        h.group_size,
        h.fixed,
        sum(d for _, d in h.segments),
        sum(d for _, d in h.kv_segments),
    )


def expected_coverage(f: Family, model: nn.Module) -> float:
    """The coverage an expert expects: every tensor but ``f.unpermuted``."""
    sizes: dict[int, int] = {}
    pinned: set[int] = set()
    for k, p in model.named_parameters(remove_duplicate=False):
        sizes[id(p)] = p.numel()
        if is_listed(k, f.unpermuted):
            pinned.add(id(p))
    return 1 - sum(sizes[i] for i in pinned) / sum(sizes.values())


def is_listed(name: str, suffixes: tuple[str, ...]) -> bool:
    """Does ``name`` end in one of the dotted ``suffixes`` (not ``pre_classifier.bias``)?"""
    return any(name == s or name.endswith("." + s) for s in suffixes)


def uncovered(spec: Any, model: nn.Module) -> list[str]:
    """Parameters (first name of each shared tensor) no group permutes."""
    names: dict[int, list[str]] = {}
    for k, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(k)
    return [ks[0] for ks in names.values() if not spec.params() & set(ks)]


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Noise on every float parameter and buffer (so no symmetry hides behind zeros and ones)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=g)
                if name.endswith("running_var"):
                    t.mul_(torch.exp(0.3 * noise))
                else:
                    t.add_(0.3 * noise)
    return model


def symmetry_error(
    model: nn.Module, inputs: dict[str, torch.Tensor], spec: Any, seed: int = 0
) -> float:
    """Relative max change of the outputs under a random permutation of ``spec`` (0: exact)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    perm = mc.random_permutation(spec, seed=seed)
    mc.check_permutation(spec, perm)
    permuted = mc.apply_permutation(spec, perm, state)
    if not any(not torch.equal(permuted[k], state[k]) for k in spec.params()):
        raise AssertionError("the permutation changed no weight (vacuous check)")
    with torch.no_grad():
        ref = functional_call(model, state, (), inputs, tie_weights=False)
        got = functional_call(model, permuted, (), inputs, tie_weights=False)
    return float((ref - got).abs().max()) / max(1.0, float(ref.abs().max()))


def planted_misses(spec: Any, state: dict[str, torch.Tensor], seed: int = 1) -> list[str]:
    """Tensors default ``weight_matching`` does not restore after a planted permutation."""
    planted = mc.random_permutation(spec, seed=seed)
    b = mc.apply_permutation(spec, planted, state)
    back = mc.apply_permutation(spec, mc.weight_matching(spec, state, b), b)
    return [k for k in spec.params() if not torch.equal(back[k], state[k])]
