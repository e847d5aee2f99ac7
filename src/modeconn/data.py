"""Data sources for training and evaluation: MNIST-1D, scikit-learn digits, .npz files, imports.

``load(source)`` returns :class:`Splits`: train/test ``TensorDataset`` s (float32 inputs, int64
labels) plus the input shape and number of classes. Built-in sources and ``.npz`` files are
standardised with a mean and standard deviation computed on the training split only.
"""

from __future__ import annotations

import importlib
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from ._src.errors import DataError
from ._src.io import atomic_write

__all__ = ["Splits", "cache_dir", "load", "sources"]


@dataclass(frozen=True)
class Splits:
    """A train/test pair of datasets with what a model needs to know about them.

    Attributes:
        train: training examples ``(x, y)``.
        test: held-out examples ``(x, y)``.
        input_shape: one example's shape, without the batch axis (e.g. ``(40,)``, ``(1, 8, 8)``).
        num_classes: number of classes (labels are ``0 .. num_classes - 1``).
        name: the source it came from.
        meta: anything else (sample counts, seed, standardisation mean/std).
    """

    train: Dataset
    test: Dataset
    input_shape: tuple[int, ...]
    num_classes: int
    name: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)

    def tensors(self, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """The whole ``split`` ("train" or "test") as ``(inputs, targets)`` tensors."""
        ds = self.train if split == "train" else self.test
        if isinstance(ds, TensorDataset):
            return ds.tensors[0], ds.tensors[1]
        xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)  # type: ignore[arg-type]
        return torch.stack(xs), torch.as_tensor(ys)


def cache_dir() -> Path:
    """Where generated data and demo checkpoints are cached.

    ``$MODECONN_CACHE`` if set, else ``$XDG_CACHE_HOME/modeconn``, else ``~/.cache/modeconn``.

    Example:
        >>> cache_dir().name in ("modeconn",) or True
        True
    """
    if os.environ.get("MODECONN_CACHE"):
        return Path(os.environ["MODECONN_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "modeconn"


def _standardise(
    x_train: np.ndarray, x_test: np.ndarray, enabled: bool
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Scale by one mean/std computed on the training inputs only."""
    if not enabled:
        return x_train, x_test, {}
    mean = float(x_train.mean())
    std = float(x_train.std()) or 1.0
    return (x_train - mean) / std, (x_test - mean) / std, {"mean": mean, "std": std}


def _labels(y: np.ndarray, where: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"{where}: labels must be a 1-D array, got shape {y.shape}")
    if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        y = y.astype(np.int64)
    if y.dtype.kind not in "iu":
        raise DataError(f"{where}: labels must be integers, got dtype {y.dtype}")
    if y.size and y.min() < 0:
        raise DataError(f"{where}: labels must be >= 0, found {int(y.min())}")
    return y.astype(np.int64)


def _make_splits(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    standardize: bool,
    num_classes: int | None = None,
    meta: dict[str, Any] | None = None,
) -> Splits:
    x_train, x_test = np.asarray(x_train, dtype=np.float64), np.asarray(x_test, dtype=np.float64)
    for split, x in (("x_train", x_train), ("x_test", x_test)):
        if not np.isfinite(x).all():  # modeconn refuses non-finite inputs (README)
            raise DataError(f"{name}: {split} holds NaN or inf; clean the data first")
    x_train, x_test, stats = _standardise(x_train, x_test, standardize)
    k = int(max(y_train.max(initial=-1), y_test.max(initial=-1))) + 1
    if num_classes is not None:
        if k > num_classes:
            raise DataError(f"{name}: a label is {k - 1} but num_classes is {num_classes}")
        k = num_classes
    train = TensorDataset(torch.from_numpy(x_train.astype(np.float32)), torch.from_numpy(y_train))
    test = TensorDataset(torch.from_numpy(x_test.astype(np.float32)), torch.from_numpy(y_test))
    info = {"n_train": len(y_train), "n_test": len(y_test), **(meta or {})}
    if stats:
        info["standardize"] = stats
    return Splits(train, test, tuple(int(s) for s in x_train.shape[1:]), k, name, info)


# --- built-in sources --------------------------------------------------------------------------


def _mnist1d_arrays(n_samples: int, seed: int) -> dict[str, np.ndarray]:
    path = cache_dir() / f"mnist1d_n{n_samples}_seed{seed}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in ("x", "y", "x_test", "y_test")}
        except Exception:  # noqa: BLE001 - a broken cache entry is regenerated
            pass
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = int(n_samples), int(seed)
    np_state, py_state = np.random.get_state(), random.getstate()
    try:  # make_dataset seeds numpy's and Python's global RNGs; leave them as they were
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    arrays = {"x": d["x"], "y": d["y"], "x_test": d["x_test"], "y_test": d["y_test"]}
    try:
        with atomic_write(path) as f:
            np.savez(f, **arrays)
    except OSError:  # a read-only cache is not fatal
        pass
    return arrays


def load_mnist1d(*, n_samples: int = 5000, seed: int = 42, standardize: bool = True) -> Splits:
    """MNIST-1D (Greydanus, 2020): 1-D signals of length 40, ten classes, generated locally.

    The ``mnist1d`` package's ``make_dataset`` builds the data (no download); its 80/20 split is
    kept. Arrays are cached under :func:`cache_dir` keyed by ``n_samples`` and ``seed``.

    Args:
        n_samples: total examples (train + test); the package's default is 5000.
        seed: the generator's seed (the package's default is 42).
        standardize: scale by the training split's mean/std.

    Returns:
        :class:`Splits` with ``input_shape == (40,)``, ``num_classes == 10``.

    Example:
        >>> load_mnist1d(n_samples=500).input_shape  # doctest: +SKIP
        (40,)
    """
    if n_samples < 20:
        raise DataError(f"mnist1d needs n_samples >= 20, got {n_samples}")
    a = _mnist1d_arrays(n_samples, seed)
    return _make_splits(
        "mnist1d",
        a["x"],
        _labels(a["y"], "mnist1d"),
        a["x_test"],
        _labels(a["y_test"], "mnist1d"),
        standardize=standardize,
        num_classes=10,
        meta={"n_samples": n_samples, "seed": seed},
    )


def load_digits(*, test_fraction: float = 0.25, seed: int = 0, standardize: bool = True) -> Splits:
    """scikit-learn's 8x8 handwritten digits (1797 images) as ``(1, 8, 8)`` images.

    A stratified split with a fixed seed: ``test_fraction`` of each class goes to the test set.

    Args:
        test_fraction: fraction held out for testing.
        seed: seed of the split.
        standardize: scale by the training split's mean/std.

    Returns:
        :class:`Splits` with ``input_shape == (1, 8, 8)``, ``num_classes == 10``.

    Example:
        >>> load_digits().input_shape
        (1, 8, 8)
    """
    from sklearn.datasets import load_digits as _sk_digits
    from sklearn.model_selection import train_test_split

    if not 0 < test_fraction < 1:
        raise DataError(f"digits test_fraction must be in (0, 1), got {test_fraction}")
    d = _sk_digits()
    x = d.data.reshape(-1, 1, 8, 8)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, d.target, test_size=test_fraction, random_state=seed, stratify=d.target
    )
    return _make_splits(
        "digits",
        x_tr,
        _labels(y_tr, "digits"),
        x_te,
        _labels(y_te, "digits"),
        standardize=standardize,
        num_classes=10,
        meta={"seed": seed, "test_fraction": test_fraction},
    )


_BUILTIN: dict[str, Callable[..., Splits]] = {"mnist1d": load_mnist1d, "digits": load_digits}


def sources() -> list[str]:
    """Names of the built-in data sources (``.npz`` paths and ``pkg.mod:fn`` also work).

    Example:
        >>> sources()
        ['mnist1d', 'digits']
    """
    return list(_BUILTIN)


def load_npz(
    path: str | os.PathLike[str], *, standardize: bool = True, num_classes: int | None = None
) -> Splits:
    """An ``.npz`` file with arrays ``x_train``, ``y_train``, ``x_test``, ``y_test``.

    Args:
        path: the file (read with ``allow_pickle=False``).
        standardize: scale by the training split's mean/std.
        num_classes: default ``max(label) + 1``.

    Returns:
        :class:`Splits`.

    Example:
        >>> load_npz("my_data.npz").num_classes  # doctest: +SKIP
        10
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {str(p)!r} does not exist")
    try:
        z = np.load(p, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a DataError
        # numpy falls back to unpickling unknown formats, and says so; say what it means
        why = "not an .npz archive" if "pickle" in str(e) else str(e).splitlines()[0]
        raise DataError(f"cannot read {str(p)!r} as an .npz file: {why}") from None
    with z:
        if not hasattr(z, "files"):
            raise DataError(
                f"{str(p)!r} is a single .npy array, not an .npz with x_train, y_train, ..."
            )
        arrays = {}
        for key in ("x_train", "y_train", "x_test", "y_test"):
            if key not in z.files:
                raise DataError(
                    f"{str(p)!r} has no array {key!r} (it has {sorted(z.files)}); an .npz needs "
                    "x_train, y_train, x_test, y_test"
                )
            try:
                arrays[key] = z[key]
            except Exception as e:  # noqa: BLE001 - e.g. object arrays refused without pickle
                raise DataError(f"{str(p)!r}: cannot read {key!r}: {e}") from None
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype.kind not in "biuf":
            raise DataError(f"{str(p)!r}: 'x_{split}' must be numeric, got dtype {x.dtype}")
        if x.ndim < 2 or len(x) != len(y):
            raise DataError(
                f"{str(p)!r}: 'x_{split}' has {len(x) if x.ndim else 0} rows but 'y_{split}' has "
                f"{len(y) if np.ndim(y) else 0}; they must match"
            )
        arrays[f"y_{split}"] = _labels(y, f"{str(p)!r} key 'y_{split}'")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise DataError(
            f"{str(p)!r}: 'x_train' examples have shape {arrays['x_train'].shape[1:]} but 'x_test' "
            f"examples have {arrays['x_test'].shape[1:]}"
        )
    if len(arrays["x_train"]) == 0:
        raise DataError(f"{str(p)!r}: 'x_train' is empty")
    return _make_splits(
        p.name,
        arrays["x_train"],
        arrays["y_train"],
        arrays["x_test"],
        arrays["y_test"],
        standardize=standardize,
        num_classes=num_classes,
        meta={"path": str(p)},
    )


def _as_tensor_dataset(obj: Any, where: str) -> Dataset:
    if isinstance(obj, Dataset):
        return obj
    if isinstance(obj, tuple | list) and len(obj) == 2:
        x, y = (
            torch.as_tensor(np.asarray(t)) if not isinstance(t, torch.Tensor) else t for t in obj
        )
        if len(x) != len(y):
            raise DataError(f"{where}: inputs have {len(x)} rows but targets have {len(y)}")
        return TensorDataset(x.float(), y.long())
    raise DataError(
        f"{where}: expected a Dataset or an (inputs, targets) pair, got {type(obj).__name__}"
    )


def load_import(spec: str, **kwargs: Any) -> Splits:
    """Call ``"package.module:function"`` and wrap what it returns.

    The function returns a :class:`Splits`, or ``(train, test)`` where each is a ``Dataset`` or
    an ``(inputs, targets)`` pair. Its data is used as given (no standardisation).

    Args:
        spec: ``"package.module:function"``.
        **kwargs: passed to the function.

    Returns:
        :class:`Splits`.

    Example:
        >>> load_import("mypkg.data:make").num_classes  # doctest: +SKIP
        3
    """
    mod_name, _, fn_name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError, ValueError) as e:
        raise DataError(f"cannot import data source {spec!r}: {e}") from None
    out = fn(**kwargs)
    if isinstance(out, Splits):
        return out
    if not (isinstance(out, tuple | list) and len(out) == 2):
        raise DataError(
            f"data source {spec!r} must return a Splits or (train, test), got {type(out).__name__}"
        )
    train, test = (_as_tensor_dataset(o, f"data source {spec!r}") for o in out)
    if len(train) == 0:  # type: ignore[arg-type]
        raise DataError(f"data source {spec!r} returned an empty training set")
    x0, _ = train[0]
    ys = [int(train[i][1]) for i in range(len(train))] + [int(test[i][1]) for i in range(len(test))]  # type: ignore[arg-type]
    return Splits(train, test, tuple(x0.shape), max(ys) + 1, spec, {"import": spec})


def load(source: str | os.PathLike[str], **kwargs: Any) -> Splits:
    """Load a data source by name, path or import path.

    Args:
        source: ``"mnist1d"``, ``"digits"``, a path to an ``.npz`` file (``x_train``,
            ``y_train``, ``x_test``, ``y_test``) or ``"package.module:function"``.
        **kwargs: passed to the source (e.g. ``n_samples=2000`` for mnist1d, ``seed``,
            ``standardize=False``).

    Returns:
        :class:`Splits` with ``.train``, ``.test``, ``.input_shape``, ``.num_classes``.

    Example:
        >>> s = load("digits")
        >>> s.input_shape, s.num_classes
        ((1, 8, 8), 10)
    """
    src = os.fspath(source)
    if src in _BUILTIN:
        fn = _BUILTIN[src]
    elif os.path.isdir(src):
        raise DataError(f"data source {src!r} is a folder; give an .npz file")
    elif src.endswith(".npz") or os.path.isfile(src):
        fn = lambda **kw: load_npz(src, **kw)  # noqa: E731
    elif ":" in src:
        return load_import(src, **kwargs)
    else:
        raise DataError(
            f"unknown data source {src!r}; use one of {', '.join(sources())}, a path to an .npz "
            "file, or 'package.module:function'"
        )
    try:
        return fn(**kwargs)
    except TypeError as e:
        raise DataError(f"bad option for data source {src!r}: {e}") from None
