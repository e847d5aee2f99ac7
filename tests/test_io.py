"""Atomic writes and checkpoints: exact round trips, metadata, safe loading, clear errors."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from torch import nn

import modeconn as mc
from modeconn._src.io import atomic_path, atomic_write

# --- atomic writes ------------------------------------------------------------------------------


def test_atomic_write_replaces_only_on_success(tmp_path):
    dest = tmp_path / "sub" / "out.txt"
    with atomic_write(dest, "w") as f:
        f.write("first")
    assert dest.read_text() == "first"
    with pytest.raises(RuntimeError), atomic_write(dest, "w") as f:
        f.write("half-written")
        raise RuntimeError("boom")
    assert dest.read_text() == "first"  # untouched
    assert sorted(p.name for p in dest.parent.iterdir()) == ["out.txt"]  # temp file removed


def test_atomic_path_for_writers_taking_a_filename(tmp_path):
    dest = tmp_path / "plot.png"
    with atomic_path(dest) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png"
        tmp.write_bytes(b"png")
    assert dest.read_bytes() == b"png"
    with pytest.raises(ValueError), atomic_path(tmp_path / "other.png") as tmp:
        tmp.write_bytes(b"x")
        raise ValueError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]


# --- round trips --------------------------------------------------------------------------------

ROUND_TRIP = [
    ("mlp", {"input_shape": (40,), "norm": "bn"}),
    ("cnn1d", {"input_shape": (40,)}),
    ("cnn", {"input_shape": (1, 8, 8), "norm": "bn"}),
    ("resnet", {"input_shape": (1, 8, 8)}),
    ("transformer", {"input_shape": (40,)}),
]


def _with_bn_stats(m: nn.Module) -> nn.Module:
    # non-trivial BN buffers (running stats, num_batches_tracked) must survive too
    m.train()
    with torch.no_grad():
        shape = tuple(m.modeconn_config["kwargs"]["input_shape"])
        m(torch.randn(8, *shape))
    return m.eval()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize(("name", "kw"), ROUND_TRIP, ids=[n for n, _ in ROUND_TRIP])
def test_round_trip_exact_with_metadata(tmp_path, name, kw, suffix):
    m = _with_bn_stats(mc.models.create(name, seed=1, **kw))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    meta = {"data": "mnist1d", "seed": 3, "metrics": {"test_accuracy": 0.91, "h": [1.5, 2]}}
    path = mc.save_checkpoint(tmp_path / f"m{suffix}", m, meta=meta)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # not mutated
    ck = mc.load_checkpoint(path)
    assert ck.state.keys() == before.keys()
    for k, v in before.items():
        assert ck.state[k].dtype == v.dtype and torch.equal(ck.state[k], v), k
    assert ck.meta["data"] == "mnist1d" and ck.meta["seed"] == 3
    assert ck.meta["metrics"] == {"test_accuracy": 0.91, "h": [1.5, 2]}
    assert ck.meta["modeconn_version"] == mc.__version__
    assert ck.meta["model"] == json_roundtrip(m.modeconn_config)
    rebuilt = ck.build()
    x = torch.randn(4, *kw["input_shape"])
    with torch.no_grad():
        assert torch.equal(rebuilt(x), m(x))
    assert rebuilt.modeconn_meta["seed"] == 3


def json_roundtrip(obj):
    import json

    return json.loads(json.dumps(obj))


def test_tied_weights_saved_and_reloaded(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Linear(4, 4, bias=False)
            self.out = nn.Linear(4, 4, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, x):
            return self.out(self.emb(x))

    m = Tied()
    mc.save_checkpoint(tmp_path / "tied.safetensors", m)
    ck = mc.load_checkpoint(tmp_path / "tied.safetensors")
    assert torch.equal(ck.state["emb.weight"], m.emb.weight.detach())
    assert torch.equal(ck.state["out.weight"], m.emb.weight.detach())
    back = mc.load_model(tmp_path / "tied.safetensors", Tied())
    assert back.out.weight is back.emb.weight


def test_plain_state_needs_model_name(tmp_path):
    m = mc.models.create("mlp", input_shape=(6,), num_classes=3, width=8, seed=0)
    torch.save(m.state_dict(), tmp_path / "foreign.pt")  # a checkpoint from elsewhere
    with pytest.raises(mc.CheckpointError, match="does not record its model; pass --model"):
        mc.load_checkpoint(tmp_path / "foreign.pt").build()
    net = mc.load_model(
        tmp_path / "foreign.pt", "mlp", {"input_shape": [6], "num_classes": 3, "width": 8}
    )
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in net.state_dict().items())
    nested = tmp_path / "nested.pth"
    torch.save({"state_dict": m.state_dict(), "epoch": 3}, nested)
    assert mc.load_checkpoint(nested).state.keys() == m.state_dict().keys()


def test_shape_mismatch_names_first_tensor(tmp_path):
    m = mc.models.create("mlp", input_shape=(40,), width=16, seed=0)
    path = mc.save_checkpoint(tmp_path / "w16.safetensors", m)
    with pytest.raises(
        mc.CheckpointError, match=r"tensor 'layers\.0\.weight' has shape \(16, 40\)"
    ):
        mc.load_model(path, "mlp", {"width": 32})
    with pytest.raises(mc.CheckpointError, match="w16.safetensors.*no tensor 'layers.3.weight'"):
        mc.load_model(path, "mlp", {"depth": 4})
    with pytest.raises(
        mc.CheckpointError, match=r"unexpected tensor 'layers\.2\.(weight|bias)' \(2 extra"
    ):
        mc.load_model(path, "mlp", {"depth": 2})


# --- refusing unsafe or broken files --------------------------------------------------------------


class _Evil:
    """Unpickling this calls open(target, "w"): code execution on load."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.parametrize("how", ["torch.save", "raw pickle"])
def test_malicious_pickle_refused_not_executed(tmp_path, how):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"state_dict": {"w": torch.zeros(2)}, "hook": _Evil(str(target))}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    # sanity: the payload really would create the file if unpickled unsafely
    with open(path, "rb") as f:
        if how == "raw pickle":
            pickle.load(f)
            assert target.exists()
            target.unlink()
    with pytest.raises(mc.CheckpointError) as e:
        mc.load_checkpoint(path)
    msg = str(e.value)
    assert "evil.pt" in msg and "safetensors" in msg and "\n" not in msg
    assert not target.exists()


def test_missing_corrupt_and_truncated(tmp_path):
    with pytest.raises(mc.CheckpointError, match="does not exist"):
        mc.load_checkpoint(tmp_path / "missing.safetensors")
    with pytest.raises(mc.CheckpointError, match="has no config.json"):
        mc.load_checkpoint(tmp_path)  # a folder that is not a Hugging Face model folder
    m = mc.models.create("mlp", input_shape=(40,), width=8, seed=0)
    for suffix in (".safetensors", ".pt"):
        good = mc.save_checkpoint(tmp_path / f"good{suffix}", m)
        data = good.read_bytes()
        cut = tmp_path / f"cut{suffix}"
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(mc.CheckpointError, match=f"cut{suffix}.*corrupt or truncated"):
            mc.load_checkpoint(cut)
        junk = tmp_path / f"junk{suffix}"
        junk.write_bytes(os.urandom(64))
        with pytest.raises(mc.CheckpointError, match=f"junk{suffix}"):
            mc.load_checkpoint(junk)


def test_failed_save_leaves_no_file(tmp_path):
    dest = tmp_path / "x.safetensors"
    with pytest.raises(mc.CheckpointError, match="not JSON-serialisable"):
        mc.save_checkpoint(dest, {"w": torch.zeros(1)}, meta={"bad": object()})
    with pytest.raises(mc.CheckpointError, match="not a tensor"):
        mc.save_checkpoint(dest, {"w": torch.zeros(1), "step": 3})
    assert list(tmp_path.iterdir()) == []


# --- found in review --------------------------------------------------------------------------


def test_recorded_model_factory_is_not_run_unless_named(tmp_path):
    """A checkpoint's metadata naming ``pkg.mod:fn`` must not import and call it by itself: a
    crafted safetensors file recording ``os:system`` ran its command before the fix."""
    import json

    from safetensors.torch import save_file

    target = tmp_path / "pwned"
    evil = tmp_path / "evil.safetensors"
    meta = {"model": {"name": "os:system", "kwargs": {"command": f"touch {target}"}}}
    save_file({"w": torch.zeros(1)}, str(evil), metadata={"modeconn": json.dumps(meta)})
    with pytest.raises(mc.CheckpointError, match="records the model factory 'os:system'"):
        mc.load_checkpoint(evil).build()
    with pytest.raises(mc.CheckpointError, match="--model os:system"):
        mc.load_model(evil)
    assert not target.exists()
    # a factory the caller names is built, with the options the checkpoint recorded
    net = nn.Linear(3, 2)
    net.modeconn_config = {"name": "torch.nn:Linear", "kwargs": {"in_features": 3,
                                                                 "out_features": 2}}  # fmt: skip
    mc.save_checkpoint(tmp_path / "lin.safetensors", net)
    ck = mc.load_checkpoint(tmp_path / "lin.safetensors")
    with pytest.raises(mc.CheckpointError, match="torch.nn:Linear"):
        ck.build()
    rebuilt = ck.build("torch.nn:Linear")
    assert torch.equal(rebuilt.weight, net.weight)


def test_written_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        mc.save_checkpoint(tmp_path / "a.safetensors", nn.Linear(2, 1))
        with atomic_path(tmp_path / "p.png") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o640  # not mkstemp's 0o600
    assert (tmp_path / "p.png").stat().st_mode & 0o777 == 0o640
    (tmp_path / "a.safetensors").chmod(0o664)  # replacing a file keeps its permissions
    mc.save_checkpoint(tmp_path / "a.safetensors", nn.Linear(2, 1))
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o664


def test_refused_pickle_warns_nothing(tmp_path, recwarn):
    class Evil:
        def __reduce__(self):
            return (print, ("hi",))

    (tmp_path / "e.pt").write_bytes(pickle.dumps({"w": Evil()}))  # protocol 4/5: torch warned
    with pytest.raises(mc.CheckpointError, match="refusing"):
        mc.load_checkpoint(tmp_path / "e.pt")
    assert not [w for w in recwarn if "pickle" in str(w.message)]
