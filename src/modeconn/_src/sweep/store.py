"""Content-addressed endpoint store: a trained network is keyed by everything that determines it."""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .grid import digest

STORE_FORMAT = 1  # bump when what a stored endpoint means changes


def endpoint_key(spec: Mapping[str, Any]) -> str:
    """The store key of an endpoint: a hash of model, options, data, training config and seed.

    Example:
        >>> spec = {"model": "mlp", "model_args": {}, "data": "digits", "data_args": {},
        ...         "train": {"epochs": 1}, "seed": 0}
        >>> endpoint_key(spec) == endpoint_key(dict(spec)), endpoint_key({**spec, "seed": 1}) == \
endpoint_key(spec)
        (True, False)
    """
    return f"{spec['model'].replace(':', '_')}-s{spec['seed']}-" + digest(
        {**spec, "format": STORE_FORMAT}
    )


@functools.lru_cache(maxsize=4)
def _load_data_cached(source: str, args_json: str) -> Any:
    from ... import data

    return data.load(source, **json.loads(args_json))


def load_data(source: str, args: Mapping[str, Any]) -> Any:
    """``mc.data.load(source, **args)``, cached per process (a Ray worker runs many tasks)."""
    return _load_data_cached(source, json.dumps(dict(args), sort_keys=True))


def build_model(spec: Mapping[str, Any], splits: Any) -> Any:
    """The untrained endpoint: ``spec["model"]`` with its options, seeded with ``spec["seed"]``.

    Input shape and number of classes come from ``splits`` unless the options set them
    (``mc.models.create_for``). An import path (``pkg.mod:fn``) is built only after
    :func:`check_grid` accepted it.
    """
    from ...models import create_for

    return create_for(spec["model"], splits, spec["model_args"], seed=int(spec["seed"]))


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (fcntl; no lock where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: tasks still never train one key twice
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_endpoint(
    spec: Mapping[str, Any], store: str | os.PathLike[str], *, device: str | None = None
) -> Path:
    """The stored checkpoint of endpoint ``spec``, trained now if the store lacks it.

    Training is ``mc.train(build_model(spec), data, seed=spec["seed"], **spec["train"])``. A file
    lock per key makes concurrent callers (Ray tasks, two sweeps sharing a store) train it once;
    the checkpoint is written atomically, so an interrupted run leaves no half-written entry and
    a rerun reuses every finished one. Deterministic on CPU at a fixed thread count.

    Args:
        spec: ``model``, ``model_args``, ``data``, ``data_args``, ``train``, ``seed``.
        store: the store folder.
        device: where to train.

    Returns:
        The checkpoint path (metadata: ``store_spec``, ``metrics``, ``train``, ``data``, ``seed``).

    Example:
        >>> import tempfile
        >>> spec = {"model": "mlp", "model_args": {"width": 8, "depth": 1}, "data": "digits",
        ...         "data_args": {}, "train": {"epochs": 1}, "seed": 0}
        >>> store = tempfile.mkdtemp()
        >>> first = ensure_endpoint(spec, store)  # trained
        >>> ensure_endpoint(spec, store) == first, first.name.startswith("mlp-s0-")  # reused
        (True, True)
    """
    from ..io import save_checkpoint
    from ..train import train

    folder = Path(store)
    path = folder / f"{endpoint_key(spec)}.safetensors"
    if path.is_file():
        return path
    with _lock(folder / ".locks" / f"{path.stem}.lock"):
        if path.is_file():  # trained by another task while we waited
            return path
        splits = load_data(spec["data"], spec["data_args"])
        net = build_model(spec, splits)
        res = train(
            net, splits, seed=int(spec["seed"]), device=device, progress=False, **spec["train"]
        )
        meta = {
            "data": spec["data"],
            "seed": spec["seed"],
            "train": res.config,
            "metrics": res.metrics,
            "store_spec": dict(spec),
        }
        save_checkpoint(path, res.model, meta=meta)
    return path
