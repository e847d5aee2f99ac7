"""Saving and loading paths: one safetensors file, points under prefixed keys, JSON metadata."""

from __future__ import annotations

import json
from pathlib import Path as FsPath
from typing import Any

from ..errors import CheckpointError
from ..io import atomic_write
from .base import REGISTRY, Path

PATH_FILENAME = "curve.safetensors"
FORMAT = "modeconn.path"
META_KEY = "modeconn_path"


def resolve_path_file(path: str | FsPath) -> FsPath:
    """A ``.safetensors`` file as it is; anything else is a folder holding ``curve.safetensors``."""
    p = FsPath(path)
    return p if p.suffix == ".safetensors" else p / PATH_FILENAME


def save_path(path_obj: Path, path: str | FsPath, *, meta: dict[str, Any] | None = None) -> FsPath:
    """Write ``path_obj`` to a safetensors file atomically.

    Tensors are stored as ``point{i}.{state key}``; the metadata entry ``modeconn_path`` holds
    JSON ``{"format", "version", "kind", "num_points", "keys", "meta"}`` (``meta``: e.g. the
    model name and arguments, so the file can be evaluated without naming the model again).

    Args:
        path_obj: the path to save.
        path: a ``.safetensors`` file or a directory (then ``DIR/curve.safetensors``).
        meta: extra metadata merged over ``path_obj.meta``.

    Returns:
        The file written.

    Example:
        >>> save_path(mc.LinearPath(sa, sb), "out/")  # doctest: +SKIP
    """
    from safetensors.torch import save

    dest = resolve_path_file(path)
    info = {
        "format": FORMAT,
        "version": 1,
        "kind": path_obj.kind,
        "num_points": path_obj.num_points,
        "keys": list(path_obj._points[0]),
        "meta": {**path_obj.meta, **(meta or {})},
    }
    try:
        header = json.dumps(info)
    except TypeError as e:
        raise CheckpointError(
            f"path metadata is not JSON-serialisable ({e}); pass plain values"
        ) from None
    tensors = {
        f"point{i}.{k}": v.detach().to("cpu").contiguous().clone()
        for i, p in enumerate(path_obj._points)
        for k, v in p.items()
    }
    blob = save(tensors, metadata={META_KEY: header})
    with atomic_write(dest, "wb") as f:
        f.write(blob)
    return dest


def load_path(path: str | FsPath) -> Path:
    """Read a path written by :func:`save_path` (file or directory).

    Args:
        path: the ``.safetensors`` file or the directory holding ``curve.safetensors``.

    Returns:
        A :class:`LinearPath`, :class:`BezierCurve` or :class:`PolyChain` (by the stored kind),
        with ``.meta`` restored.

    Example:
        >>> curve = load_path("out/")  # doctest: +SKIP
    """
    from safetensors import safe_open

    src = resolve_path_file(path)
    if not src.is_file():
        raise CheckpointError(
            f"no path file at {src}; give a directory written by `modeconn curve` "
            "or a .safetensors file written by path.save()"
        )
    try:
        with safe_open(str(src), framework="pt") as f:
            header = (f.metadata() or {}).get(META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for corrupt files
        raise CheckpointError(f"{src} is not a readable safetensors file ({e})") from None
    if header is None:
        raise CheckpointError(f"{src} is a safetensors file but not a modeconn path (no metadata)")
    try:
        info = json.loads(header)
        if info.get("format") != FORMAT or info.get("kind") not in REGISTRY:
            raise CheckpointError(f"{src} holds an unknown path kind {info.get('kind')!r}")
        n = int(info["num_points"])
        points: list[dict] = [{} for _ in range(n)]
        for key, t in tensors.items():
            head, _, name = key.partition(".")
            points[int(head.removeprefix("point"))][name] = t
        order = info.get("keys") or sorted(points[0])
        points = [{k: p[k] for k in order} for p in points]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{src} is a damaged modeconn path file ({e!r})") from None
    return REGISTRY[info["kind"]].from_points(points, meta=info.get("meta") or {})
