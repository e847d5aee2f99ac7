"""Data sources: MNIST-1D, digits, .npz files and import paths; bad input raises DataError."""

from __future__ import annotations

import os
import sys
import textwrap

import numpy as np
import pytest
import torch

import modeconn as mc


def test_mnist1d_default(mnist1d_splits):
    s = mnist1d_splits
    assert s.name == "mnist1d" and s.input_shape == (40,) and s.num_classes == 10
    x, y = s.tensors("train")
    xt, yt = s.tensors("test")
    assert x.shape == (4000, 40) and xt.shape == (1000, 40)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.tolist()) == set(range(10)) and set(yt.tolist()) <= set(range(10))
    # standardised with the training split's own statistics
    assert (
        abs(float(x.double().mean())) < 1e-5
        and abs(float(x.double().std(unbiased=False)) - 1) < 1e-5
    )


def test_mnist1d_cached_reproducible_and_rng_untouched(tmp_path, monkeypatch):
    monkeypatch.setenv("MODECONN_CACHE", str(tmp_path))
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a = mc.data.load("mnist1d", n_samples=200, seed=7)
    assert np.array_equal(np.random.get_state()[1], before)
    assert (tmp_path / "mnist1d_n200_seed7.npz").is_file()
    b = mc.data.load("mnist1d", n_samples=200, seed=7)  # from the cache
    assert len(a.train) == 160 and len(a.test) == 40
    assert torch.equal(a.tensors()[0], b.tensors()[0]) and torch.equal(
        a.tensors()[1], b.tensors()[1]
    )
    c = mc.data.load("mnist1d", n_samples=200, seed=8)
    assert not torch.equal(a.tensors()[0], c.tensors()[0])


def test_digits_stratified_fixed_split(digits_splits):
    s = digits_splits
    assert s.input_shape == (1, 8, 8) and s.num_classes == 10
    assert len(s.train) == 1347 and len(s.test) == 450
    from sklearn.datasets import load_digits

    counts = np.bincount(load_digits().target)
    test_counts = np.bincount(s.tensors("test")[1].numpy(), minlength=10)
    assert np.all(np.abs(test_counts - counts * 0.25) <= 1)  # stratified
    again = mc.data.load("digits")
    assert torch.equal(again.tensors("test")[0], s.tensors("test")[0])
    other = mc.data.load("digits", seed=1)
    assert not torch.equal(other.tensors("test")[1], s.tensors("test")[1])


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def _good(n=30, m=10, shape=(4,)):
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.normal(3.0, 2.0, (n, *shape)),
        "y_train": rng.integers(0, 3, n),
        "x_test": rng.normal(50.0, 9.0, (m, *shape)),
        "y_test": rng.integers(0, 3, m),
    }


def test_npz_standardised_on_train_only(tmp_path):
    arr = _good()
    s = mc.data.load(str(_npz(tmp_path / "d.npz", **arr)))
    x, y = s.tensors("train")
    xt, _ = s.tensors("test")
    mean, std = arr["x_train"].mean(), arr["x_train"].std()
    np.testing.assert_allclose(x.numpy(), (arr["x_train"] - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(xt.numpy(), (arr["x_test"] - mean) / std, rtol=1e-5, atol=1e-5)
    assert (
        s.input_shape == (4,)
        and s.num_classes == int(max(arr["y_train"].max(), arr["y_test"].max())) + 1
    )
    raw = mc.data.load(tmp_path / "d.npz", standardize=False)
    np.testing.assert_allclose(raw.tensors()[0].numpy(), arr["x_train"], rtol=1e-6)


def test_npz_integral_float_labels_accepted(tmp_path):
    arr = _good()
    arr["y_train"] = arr["y_train"].astype(np.float32)
    s = mc.data.load(str(_npz(tmp_path / "f.npz", **arr)))
    assert s.tensors()[1].dtype == torch.int64


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda a: a.pop("y_test"), "has no array 'y_test'"),
        (
            lambda a: a.update(y_train=a["y_train"][:-1]),
            "'x_train' has 30 rows but 'y_train' has 29",
        ),
        (lambda a: a.update(y_train=a["y_train"] + 0.5), "labels must be integers"),
        (lambda a: a.update(y_test=-a["y_test"] - 1), "labels must be >= 0"),
        (lambda a: a.update(x_test=np.zeros((10, 5))), "'x_test' examples have"),
        (lambda a: a.update(x_train=np.array(["a"] * 30)), "must be numeric"),
    ],
)
def test_npz_bad_content(tmp_path, change, match):
    arr = _good()
    change(arr)
    path = _npz(tmp_path / "bad.npz", **arr)
    with pytest.raises(mc.DataError, match=match) as e:
        mc.data.load(str(path))
    assert "bad.npz" in str(e.value)


def test_npz_object_array_not_unpickled(tmp_path):
    arr = _good()
    arr["x_train"] = np.array([{"a": 1}] * 30, dtype=object)
    path = tmp_path / "obj.npz"
    np.savez(path, **arr)
    with pytest.raises(mc.DataError, match="obj.npz"):
        mc.data.load(str(path))


def test_missing_or_unreadable_file(tmp_path):
    with pytest.raises(mc.DataError, match="does not exist"):
        mc.data.load(str(tmp_path / "nope.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(mc.DataError, match="junk.npz"):
        mc.data.load(str(tmp_path / "junk.npz"))


def test_unknown_source_lists_choices():
    with pytest.raises(mc.DataError, match="unknown data source 'cifar5'.*mnist1d, digits"):
        mc.data.load("cifar5")
    with pytest.raises(mc.DataError, match="bad option"):
        mc.data.load("digits", n_samples=3)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "mc_user_data.py").write_text(
        textwrap.dedent(
            """
            import torch
            import modeconn as mc

            def pair(n=12):
                x = torch.arange(n * 3, dtype=torch.float64).reshape(n, 3)
                y = torch.arange(n) % 4
                return (x, y), (x[:4], y[:4])

            def splits():
                s = mc.data.load("digits")
                return mc.data.Splits(s.test, s.test, s.input_shape, 10, "mine")

            def wrong():
                return 42
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "mc_user_data"
    sys.modules.pop("mc_user_data", None)


def test_import_path_sources(user_module):
    s = mc.data.load(f"{user_module}:pair", n=8)
    assert s.input_shape == (3,) and s.num_classes == 4 and len(s.train) == 8 and len(s.test) == 4
    x, y = s.tensors()
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert mc.data.load(f"{user_module}:splits").name == "mine"
    with pytest.raises(mc.DataError, match="must return a Splits"):
        mc.data.load(f"{user_module}:wrong")
    with pytest.raises(mc.DataError, match="cannot import"):
        mc.data.load(f"{user_module}:missing")


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MODECONN_CACHE", str(tmp_path / "c"))
    assert mc.data.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MODECONN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert mc.data.cache_dir() == tmp_path / "modeconn"
    assert os.fspath(mc.data.cache_dir()).endswith("modeconn")


def test_folder_and_non_npz_files_are_named_clearly(tmp_path):
    with pytest.raises(mc.DataError, match="is a folder"):
        mc.data.load(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(mc.DataError, match="not an .npz archive"):  # not numpy's pickle advice
        mc.data.load(str(tmp_path / "model.safetensors"))
