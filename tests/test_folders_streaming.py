"""Hugging Face model folders in and out, streamed merges (bitwise = in memory), TIES as the
reference code, the streaming selection, and the bad-folder errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

import modeconn as mc
from modeconn._src import lazy
from modeconn._src.hf import save_permuted
from modeconn._src.merge import get_method
from modeconn._src.merge.tensorwise import kth_smallest_abs

transformers = pytest.importorskip("transformers")

V = 64  # vocabulary of the tiny GPT-2


def _gpt2(seed: int, base: torch.nn.Module | None = None, noise: float = 0.002):
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=V, n_positions=16,
                                  use_cache=False, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    if base is not None:  # a "fine-tune": the base plus a small perturbation
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for (_, p), (_, q) in zip(m.named_parameters(), base.named_parameters(), strict=True):
                p.copy_(q + noise * torch.randn(q.shape, generator=g))
    return m


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A base and two fine-tunes saved with save_pretrained (ft1 sharded), and their models."""
    root = tmp_path_factory.mktemp("hf")
    base = _gpt2(0)
    fts = [_gpt2(1, base), _gpt2(2, base)]
    paths = {"base": root / "base", "ft0": root / "ft0", "ft1": root / "ft1"}
    base.save_pretrained(paths["base"])
    fts[0].save_pretrained(paths["ft0"])
    fts[1].save_pretrained(paths["ft1"], max_shard_size="20KB")
    assert (paths["ft1"] / "model.safetensors.index.json").is_file()
    return paths, {"base": base, "ft0": fts[0], "ft1": fts[1]}


X = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(0))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X).logits


def _state(path) -> dict[str, torch.Tensor]:
    return dict(mc.load_checkpoint(path).state)


def test_folder_loads_lazily_and_builds_the_transformers_model(folders):
    paths, models = folders
    for name in ("ft0", "ft1"):  # single file and sharded
        ck = mc.load_checkpoint(paths[name])
        assert isinstance(ck.state, lazy.LazyState) and ck.folder
        own = models[name].state_dict()
        assert set(ck.state) <= set(own) and "lm_head.weight" not in ck.state  # tied, not saved
        assert all(torch.equal(ck.state[k], own[k]) for k in ck.state)
        net = ck.build()
        assert type(net).__name__ == "GPT2LMHeadModel"
        assert torch.equal(_logits(net), _logits(models[name]))


def test_folders_aligned_merged_and_written_back_load_with_the_expected_logits(folders, tmp_path):
    paths, models = folders
    spec = mc.infer_spec(models["ft0"], X)
    # hide ft1 behind a random permutation of its units (streamed, tensor by tensor)
    perm = mc.random_permutation(spec, seed=3)
    hidden = save_permuted(tmp_path / "ft1_perm", mc.load_checkpoint(paths["ft1"]).state, spec,
                           perm, folder_from=paths["ft1"], max_shard_bytes=30_000)
    assert (hidden / "model.safetensors.index.json").is_file()
    assert (hidden / "config.json").is_file()
    shuffled = transformers.GPT2LMHeadModel.from_pretrained(hidden).eval()
    assert torch.allclose(_logits(shuffled), _logits(models["ft1"]), atol=1e-5)  # same function
    assert not torch.equal(_state(hidden)["transformer.h.0.mlp.c_fc.weight"],
                           _state(paths["ft1"])["transformer.h.0.mlp.c_fc.weight"])
    # align it back onto ft0 by weight matching (on the built models: their state dicts hold the
    # tied lm_head.weight the spec names)
    found = mc.weight_matching(spec, mc.load_checkpoint(paths["ft0"]).build().state_dict(),
                               mc.load_checkpoint(hidden).build().state_dict())
    aligned = save_permuted(tmp_path / "ft1_aligned", mc.load_checkpoint(hidden).state, spec,
                            found, folder_from=hidden)
    want_ft1 = _state(paths["ft1"])
    got = _state(aligned)
    assert all(torch.equal(got[k], want_ft1[k]) for k in want_ft1)  # the planted order recovered
    # merge the folders (streamed, sharded output) and load the result with from_pretrained
    out = mc.merge_files([paths["ft0"], aligned], tmp_path / "merged", method="ties",
                         base=paths["base"], density=0.5, max_shard_bytes=40_000)
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (paths["ft0"] / "config.json").read_text())
    merged = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    expected = mc.merge([_state(paths["ft0"]), want_ft1], method="ties",
                        base=_state(paths["base"]), density=0.5)
    ref = _gpt2(0)
    ref.load_state_dict(dict(expected), strict=False)
    ref.tie_weights()
    assert torch.equal(_logits(merged), _logits(ref))


def test_streaming_equals_in_memory_bitwise_for_every_data_free_method(tmp_path, monkeypatch):
    monkeypatch.setattr(lazy, "BLOCK_ELEMENTS", 48)  # several row blocks per tensor

    def state(seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {"emb.weight": torch.randn(37, 5, generator=g).to(dtype),
                "fc.weight": torch.randn(6, 40, generator=g).to(dtype),  # rows wider than a block
                "fc.bias": torch.randn(6, generator=g).to(dtype),
                "bn.running_var": (torch.rand(6, generator=g) + 0.5).to(dtype),
                "bn.num_batches_tracked": torch.tensor(seed), "scale": torch.randn((), generator=g)
                .to(dtype)}

    variants = {"ties": [{"density": 0.3}, {"density": 0.3, "trim": "model"}],
                "dare": [{"p": 0.4}, {"p": 0.4, "consensus": True}]}
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        paths = [mc.save_checkpoint(tmp_path / f"m{i}.safetensors", state(i, dtype))
                 for i in range(4)]
        base = mc.save_checkpoint(tmp_path / "base.safetensors", state(9, dtype))
        for name in mc.streaming_methods():
            m = get_method(name)
            n = m.max_models or 4
            for params in variants.get(name, [{}]):
                base_arg = base if m.needs_base else None
                out = mc.merge_files(paths[:n], tmp_path / "out.safetensors", method=name,
                                     base=base_arg, **params)
                got = mc.load_checkpoint(out).state
                want = mc.merge([_state(p) for p in paths[:n]], method=name,
                                base=_state(base) if base_arg else None, **params)
                assert list(got) == list(want)
                for k in want:
                    assert got[k].dtype == want[k].dtype == state(0, dtype)[k].dtype
                    assert torch.equal(got[k], want[k]), (name, params, dtype, k)


def test_kth_smallest_abs_is_exact_against_kthvalue():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        parts = [torch.randn(n, generator=g, dtype=dtype) * 10 ** float(e)
                 for n, e in ((100, -3), (37, 2), (250, 0))]
        parts.append(torch.tensor([0.0, -0.0, 1.0, -1.0, 1.0], dtype=dtype))  # ties and zeros
        flat = torch.cat(parts).abs()
        for rank in (1, 2, 5, 100, 200, flat.numel() - 1, flat.numel()):
            got = kth_smallest_abs(lambda ps=parts: ps, rank, dtype)
            assert got.dtype == dtype and got == flat.kthvalue(rank).values


# --- TIES: the reference code, re-derived (github.com/prateeky2806/ties-merging, ties_minimal) ---

def _ref_topk_values_mask(M, K):
    n, d = M.shape
    k = int(d * K)
    k = d - k  # keep the top k: threshold at the (d - k)-th smallest
    kth, _ = M.abs().kthvalue(k, dim=1, keepdim=True)
    return M * (M.abs() >= kth)


def _ref_ties(flat_tvs, K):
    trimmed = _ref_topk_values_mask(flat_tvs.clone(), K)
    sign = torch.sign(trimmed.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())  # resolve_zero_signs(..., "majority")
    keep = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    sel = trimmed * keep
    return sel.sum(dim=0) / torch.clamp((sel != 0).sum(dim=0).float(), min=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("density", [0.2, 0.5, 0.7])
def test_ties_model_wide_matches_the_reference_code(dtype, density):
    g = torch.Generator().manual_seed(1)
    shapes = {"a": (7, 5), "b": (5,), "c": (3, 4)}
    base = {k: torch.randn(s, generator=g, dtype=dtype) for k, s in shapes.items()}
    # integers on a coarse grid: ties in magnitude and exact-zero sign sums occur
    fts = [{k: base[k] + torch.randint(-3, 4, s, generator=g).to(dtype) for k, s in shapes.items()}
           for _ in range(3)]
    flat = torch.stack([torch.cat([(f[k] - base[k]).flatten() for k in shapes]) for f in fts])
    assert (flat.sum(0) == 0).any()  # the zero-sign rule is exercised
    want = torch.cat([b.flatten() for b in base.values()]) + _ref_ties(flat, density)
    out = mc.merge(fts, method="ties", base=base, density=density, trim="model")
    got = torch.cat([out[k].flatten() for k in shapes])
    assert got.dtype == dtype
    assert torch.allclose(got, want, atol=1e-12 if dtype == torch.float64 else 1e-6, rtol=0)
    kept = (_ref_topk_values_mask(flat, density) != 0).sum(1)
    assert kept.tolist() != [math.ceil(density * flat.shape[1])] * 3  # not the ceil count


# --- bad input: one line, exit 2, no output left behind ---

def test_bad_folders_are_one_line_exit_2_and_leave_nothing(folders, tmp_path, run_cli):
    paths, _ = folders
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in paths["ft1"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    missing = sorted(set(index["weight_map"].values()))[1]
    (broken / missing).unlink()
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes((paths["ft0"] / "model.safetensors").read_bytes())
    other = tmp_path / "wider"
    cfg = transformers.GPT2Config(n_layer=2, n_embd=48, n_head=4, vocab_size=V, n_positions=16)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(other)
    cases = [(broken, f"missing shard {missing!r}"), (no_config, "has no config.json"),
             (other, "the models do not share one architecture")]
    for bad, message in cases:
        out = tmp_path / "out"
        r = run_cli("merge", paths["ft0"], bad, "--out", out, "--no-progress")
        assert r.code == 2 and message in r.err and r.err.count("\n") == 1, r.err
        assert "Traceback" not in r.err and not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp left
    with pytest.raises(mc.CheckpointError, match="missing shard"):
        mc.load_checkpoint(broken)


def test_cli_merges_folders_into_a_folder(folders, tmp_path, run_cli):
    paths, _ = folders
    out = tmp_path / "avg"
    r = run_cli("merge", paths["ft0"], paths["ft1"], "--out", out, "--no-progress",
                "--json", tmp_path / "r.json")
    assert r.code == 0, r.err
    net = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    want = mc.merge([_state(paths["ft0"]), _state(paths["ft1"])])
    assert all(torch.equal(v, want[k]) for k, v in _state(out).items())
    assert type(net).__name__ == "GPT2LMHeadModel"
    assert json.loads((tmp_path / "r.json").read_text())["info"]["streamed"] is True
    r = run_cli("merge", paths["ft0"], paths["ft1"], "--out", tmp_path / "x.safetensors")
    assert r.code == 2 and "must be a folder name" in r.err


def test_cli_align_writes_the_aligned_folder(folders, tmp_path, run_cli):
    paths, models = folders
    spec = mc.infer_spec(models["ft0"], X)
    (tmp_path / "spec.json").write_text(spec.to_json())
    hidden = mc.permute_checkpoint(paths["ft1"], spec, mc.random_permutation(spec, seed=5),
                                   tmp_path / "hidden")
    out = tmp_path / "aligned"
    r = run_cli("align", paths["ft0"], hidden, "--spec", tmp_path / "spec.json", "--no-barrier",
                "--out", out, "--no-progress")
    assert r.code == 0, r.err
    want = _state(paths["ft1"])
    got = _state(out)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    r = run_cli("align", paths["ft0"], hidden, "--spec", tmp_path / "spec.json", "--no-barrier",
                "--out", tmp_path / "a.safetensors")
    assert r.code == 2 and "must be a folder name" in r.err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_streamed_merges_on_cuda_match_the_cpu(folders, tmp_path, run_cli):
    paths, _ = folders
    for name, params in [("average", {}), ("ties", {"density": 0.3, "trim": "model"}),
                         ("dare", {"p": 0.3}), ("slerp", {})]:
        m = get_method(name)
        inputs = [paths["ft0"], paths["ft1"]]
        base = paths["base"] if m.needs_base else None
        cpu = mc.merge_files(inputs, tmp_path / f"{name}_cpu", method=name, base=base, **params)
        gpu = mc.merge_files(inputs, tmp_path / f"{name}_gpu", method=name, base=base,
                             device="cuda", **params)
        a, b = _state(cpu), _state(gpu)
        assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), name
    r = run_cli("merge", paths["ft0"], paths["ft1"], "--device", "cuda", "--out", tmp_path / "c",
                "--no-progress")
    assert r.code == 0, r.err


def test_recipes_of_folders_write_folders_streamed_or_in_memory(folders, tmp_path, run_cli):
    from modeconn._src.merge.recipe import run_recipe

    paths, _ = folders
    want = mc.merge([_state(paths["ft0"]), _state(paths["ft1"])])
    recipe = tmp_path / "r.yaml"  # the CLI streams a per-tensor recipe
    recipe.write_text(f"models: [{paths['ft0']}, {paths['ft1']}]\nmethod: average\n"
                      f"out: {tmp_path / 'streamed'}\n")
    r = run_cli("merge", "--config", recipe, "--no-progress")
    assert r.code == 0, r.err
    in_memory = mc.MergeRecipe(models=[str(paths["ft0"]), str(paths["ft1"])], method="average",
                               out=str(tmp_path / "in_memory"))
    run_recipe(in_memory)
    for out in ("streamed", "in_memory"):
        got = _state(tmp_path / out)
        assert (tmp_path / out / "config.json").is_file()
        assert got.keys() <= want.keys() and all(torch.equal(v, want[k]) for k, v in got.items())
