"""Safe file output (atomic writes) and model checkpoints (safetensors first, guarded .pt)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _final_mode(dest: Path) -> int:
    """The permissions a plain ``open(dest, "w")`` would give: those of the file it replaces,
    else ``0o666`` minus the umask (``mkstemp`` alone would leave the file private, 0o600)."""
    try:
        return dest.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike[str], mode: str = "wb", **open_kwargs: Any
) -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success it atomically replaces ``path``.

    The temporary file lives in the same directory (so ``os.replace`` is atomic) and is removed
    if the block raises, so a reader never sees a half-written file. Parent directories are
    created as needed.

    Args:
        path: The final destination.
        mode: ``"wb"`` (default) or ``"w"`` (text; ``encoding`` defaults to UTF-8).
        **open_kwargs: Passed to :func:`open` (e.g. ``encoding``, ``newline``).

    Returns:
        A context manager yielding the open temporary file object.

    Example:
        >>> with atomic_write("out/report.json", "w") as f:  # doctest: +SKIP
        ...     f.write("{}")
    """
    if mode not in ("w", "wb", "wt"):
        raise ValueError(f"atomic_write supports modes 'w'/'wt'/'wb', got {mode!r}")
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if "b" not in mode:
        open_kwargs.setdefault("encoding", "utf-8")
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _final_mode(dest))
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` for libraries that write by filename.

    On success the temporary file replaces ``path`` atomically; on error it is removed. Use this
    for writers such as ``matplotlib.savefig`` or ``safetensors.torch.save_file``.

    Args:
        path: The final destination (its suffix is kept on the temporary name).

    Returns:
        A context manager yielding the temporary :class:`pathlib.Path`.

    Example:
        >>> with atomic_path("report/path.png") as tmp:  # doctest: +SKIP
        ...     fig.savefig(tmp)
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{dest.stem}.", suffix=f".tmp{dest.suffix}", dir=dest.parent
    )
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _final_mode(dest))
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --- checkpoints --------------------------------------------------------------------------------

_META_KEY = "modeconn"
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def _json_default(obj: Any) -> Any:
    """``json.dumps(..., default=)`` hook: tensors, numpy values, paths, sets, pydantic models.

    Example:
        >>> json.dumps({"w": torch.ones(2)}, default=_json_default)  # doctest: +SKIP
        '{"w": [1.0, 1.0]}'
    """
    import numpy as np
    import torch

    if isinstance(obj, torch.Tensor | np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    if hasattr(obj, "model_dump"):  # pydantic models
        return obj.model_dump()
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _state_of(model_or_state: Any, where: str) -> dict[str, Any]:
    import torch
    from torch import nn

    from .errors import CheckpointError

    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"cannot save {type(model_or_state).__name__} to {where}: need a model or state dict"
        )
    out: dict[str, Any] = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(
                f"cannot save {where}: entry {k!r} is a {type(v).__name__}, not a tensor"
            )
        # clone: tied/shared tensors become independent copies (safetensors refuses shared memory)
        out[str(k)] = v.detach().to("cpu", copy=True).contiguous()
    return out


def save_checkpoint(
    path: str | os.PathLike[str], model_or_state: Any, *, meta: Mapping[str, Any] | None = None
) -> Path:
    """Write a model's weights and metadata, atomically.

    ``.safetensors`` (recommended; any suffix other than .pt/.pth/.bin/.ckpt) stores the tensors
    and the metadata as a JSON string under the header key ``"modeconn"``. ``.pt``/``.pth``
    store ``{"state_dict": ..., "modeconn_meta": json}``, which ``torch.load(weights_only=True)``
    reads. The metadata always records ``modeconn_version`` and, for a zoo model (or any module
    with ``modeconn_config``), ``model = {"name", "kwargs"}`` so :meth:`Checkpoint.build` can
    rebuild it. Put the data source, seed, metrics, ... in ``meta``.

    Args:
        path: destination file; parent folders are created.
        model_or_state: an ``nn.Module`` or a state dict (tensors only; copied to CPU).
        meta: JSON-serialisable metadata merged over the automatic entries.

    Returns:
        The path written.

    Example:
        >>> save_checkpoint("a.safetensors", mc.models.create("mlp"), meta={"seed": 0}).name
        'a.safetensors'
    """
    import json

    import torch
    from torch import nn

    from .._version import __version__
    from .errors import CheckpointError

    dest = Path(path)
    tensors = _state_of(model_or_state, str(dest))
    full: dict[str, Any] = {"modeconn_version": __version__}
    if isinstance(model_or_state, nn.Module) and hasattr(model_or_state, "modeconn_config"):
        full["model"] = model_or_state.modeconn_config
    full.update(dict(meta or {}))
    try:
        text = json.dumps(full, default=_json_default, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"cannot save {str(dest)!r}: metadata is not JSON-serialisable ({e})"
        ) from None
    if dest.suffix.lower() in _TORCH_SUFFIXES:
        with atomic_write(dest) as f:
            torch.save({"state_dict": tensors, "modeconn_meta": text}, f)
    else:
        from safetensors.torch import save

        with atomic_write(dest) as f:
            f.write(save(tensors, metadata={_META_KEY: text, "format": "pt"}))
    return dest


@dataclass
class Checkpoint:
    """Weights and metadata read by :func:`load_checkpoint`.

    Attributes:
        state: the state dict (CPU tensors; from safetensors a read-only mapping that reads each
            tensor when it is accessed).
        meta: the metadata (``{}`` for a checkpoint not written by modeconn).
        path: where it was read from.
        folder: read from a Hugging Face model folder (``build()`` gives the transformers model).
    """

    state: Mapping[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    path: str = ""
    folder: bool = False

    @property
    def model_name(self) -> str | None:
        """The recorded model name (a zoo name or ``pkg.mod:fn``), if any."""
        model = self.meta.get("model")
        return model.get("name") if isinstance(model, Mapping) else None

    def build(self, model: str | None = None, **override: Any) -> Any:
        """Rebuild the recorded model (or ``model``) and load these weights into it.

        Args:
            model: a zoo name or ``"pkg.mod:fn"``; default: the one recorded in the metadata.
                A recorded ``"pkg.mod:fn"`` is only used when passed here explicitly (building
                it imports and calls that code); its recorded options still apply.
            **override: model keywords replacing the recorded ones.

        Returns:
            The ``nn.Module`` in eval mode, holding exactly ``state``.

        Example:
            >>> load_checkpoint("a.safetensors").build()  # doctest: +SKIP
        """
        from ..models import resolve
        from .errors import CheckpointError
        from .validate import check_build_fits

        if self.folder:
            from .hf import build_model
            from .lazy import LazyState

            net = build_model(self.path, None if isinstance(self.state, LazyState) else self.state)
            net.modeconn_meta = self.meta
            return net
        recorded = self.meta.get("model") if isinstance(self.meta.get("model"), Mapping) else None
        name = model or (recorded or {}).get("name")
        if not name or not isinstance(name, str):
            raise CheckpointError(
                f"checkpoint {self.path!r} does not record its model; pass --model NAME "
                "(a zoo name or 'package.module:function')"
            )
        if model is None and ":" in name:
            # Never import and call code named inside a file: a crafted checkpoint could name
            # any function ("os:system"). Naming the factory yourself is the consent.
            raise CheckpointError(
                f"checkpoint {self.path!r} records the model factory {name!r}; modeconn does not "
                f"run code named in a file: pass it yourself (--model {name}, or "
                f"build({name!r}) in Python) to build it with the recorded options"
            )
        kwargs: dict[str, Any] = {}
        if recorded and recorded.get("name") == name:
            kwargs.update(recorded.get("kwargs") or {})
        kwargs.update(override)
        # shapes first, on the meta device: metadata asking for an absurd size is refused here
        check_build_fits(lambda: resolve(name, **kwargs), self.state, where=self.path, name=name)
        net = resolve(name, **kwargs)
        load_state_into(net, self.state, where=self.path)
        net.eval()
        net.modeconn_meta = self.meta  # type: ignore[assignment]  # nn.Module.__setattr__ is typed for tensors/modules
        return net


def load_state_into(model: Any, state: Mapping[str, Any], *, where: str = "checkpoint") -> None:
    """``model.load_state_dict(state)`` with a :class:`CheckpointError` naming the first misfit.

    Args:
        model: the module to fill (modified in place; callers pass a fresh one).
        state: the weights.
        where: the file name for the message.

    Example:
        >>> load_state_into(nn.Linear(2, 1), nn.Linear(2, 1).state_dict())  # doctest: +SKIP
    """
    from .validate import state_shapes_fit

    name = getattr(model, "modeconn_config", {}).get("name", type(model).__name__)
    state_shapes_fit(model.state_dict(), state, where=where, name=name)
    model.load_state_dict(dict(state), strict=True)


def _load_safetensors(p: Path) -> Checkpoint:
    import json

    from .errors import CheckpointError
    from .lazy import LazyState

    state = LazyState.open(p)  # the header now, each tensor when it is used
    meta: dict[str, Any] = {}
    if _META_KEY in state.metadata:
        try:
            meta = json.loads(state.metadata[_META_KEY])
        except ValueError:
            raise CheckpointError(f"checkpoint {str(p)!r} has corrupt modeconn metadata") from None
    return Checkpoint(state, meta, str(p))


def _load_torch(p: Path) -> Checkpoint:
    import json
    import pickle
    import warnings

    import torch

    from .errors import CheckpointError

    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it then refuses
            warnings.simplefilter("ignore")
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"refusing to load {str(p)!r}: it needs unpickling arbitrary Python objects, which "
            "can run code; re-save the weights as .safetensors (modeconn.save_checkpoint) or as a "
            "plain state_dict"
        ) from None
    except Exception as e:  # noqa: BLE001 - truncated zip, bad magic number, ...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"cannot read checkpoint {str(p)!r} (corrupt or truncated?): {msg}"
        ) from None
    meta: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model", "state"):
            if key in obj and isinstance(obj[key], Mapping):
                raw = obj.get("modeconn_meta")
                if isinstance(raw, str):
                    try:
                        meta = json.loads(raw)
                    except ValueError:
                        raise CheckpointError(
                            f"checkpoint {str(p)!r} has corrupt modeconn metadata"
                        ) from None
                elif isinstance(obj.get("meta"), Mapping):
                    meta = dict(obj["meta"])
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"checkpoint {str(p)!r} holds no state dict (got {type(obj).__name__})"
        )
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"checkpoint {str(p)!r}: entry {bad[0]!r} is not a tensor; expected a state dict"
        )
    return Checkpoint({str(k): v for k, v in obj.items()}, meta, str(p))


def load_checkpoint(path: str | os.PathLike[str], *, finite: bool = True) -> Checkpoint:
    """Read a checkpoint safely: safetensors, or .pt/.pth via ``torch.load(weights_only=True)``.

    A pickle that needs arbitrary Python objects (and so could run code) is refused, never
    executed. Missing, corrupt or truncated files raise :class:`CheckpointError`, and so do
    weights holding NaN or inf (modeconn refuses non-finite inputs) unless ``finite=False``.

    Args:
        path: a ``.safetensors`` file (modeconn's format), a ``.pt``/``.pth``/``.bin``/
            ``.ckpt`` file holding a state dict (optionally under ``"state_dict"``), or a local
            Hugging Face model folder (``config.json`` + ``model.safetensors`` or a sharded
            index; read lazily, ``build()`` gives the transformers model, nothing is fetched).
        finite: refuse NaN/inf in a floating tensor (default; ``False`` to inspect a diverged
            run). A folder is read lazily and not scanned.

    Returns:
        :class:`Checkpoint` with ``.state``, ``.meta`` and ``.build()``.

    Example:
        >>> _ = save_checkpoint("a.safetensors", mc.models.create("mlp"), meta={"seed": 0})
        >>> ck = load_checkpoint("a.safetensors")
        >>> ck.meta["seed"], type(ck.build()).__name__
        (0, 'MLP')
    """
    from .errors import CheckpointError
    from .validate import check_finite_state

    p = Path(path)
    if p.is_dir():
        from .hf import open_folder

        return Checkpoint(open_folder(p), {}, str(p), folder=True)
    if not p.is_file():
        raise CheckpointError(
            f"checkpoint {str(p)!r} does not exist"
            + ("" if not p.is_dir() else " (it is a folder)")
        )
    ck = _read_checkpoint(p)
    if finite:
        check_finite_state(ck.state, ck.path)
    return ck


def _read_checkpoint(p: Path) -> Checkpoint:
    from .errors import CheckpointError

    if p.suffix.lower() in _TORCH_SUFFIXES:
        return _load_torch(p)
    try:
        return _load_safetensors(p)
    except CheckpointError:
        if p.suffix.lower() == ".safetensors":
            raise
        with open(p, "rb") as f:
            head = f.read(4)
        if head[:2] == b"PK" or head[:1] == b"\x80":  # a zip or raw pickle saved by torch.save
            return _load_torch(p)
        raise


def load_model(
    path: str | os.PathLike[str],
    model: Any = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """Load a checkpoint into a model: the one it records, or the one named by ``model``.

    Used by every CLI command: a modeconn checkpoint needs no ``--model``; a state dict from
    elsewhere needs ``--model NAME`` (a zoo name or ``"pkg.mod:fn"``) and maybe its options.

    Args:
        path: the checkpoint.
        model: ``None`` (use the recorded model), a zoo name / ``"pkg.mod:fn"``, or an
            ``nn.Module`` whose copy receives the weights.
        model_kwargs: model options (override the recorded ones for the same model).

    Returns:
        The ``nn.Module`` in eval mode; ``.modeconn_meta`` holds the checkpoint's metadata.

    Example:
        >>> net = load_model("a.safetensors")  # doctest: +SKIP
    """
    import copy

    from torch import nn

    ck = load_checkpoint(path)
    if isinstance(model, nn.Module):
        net = copy.deepcopy(model)
        load_state_into(net, ck.state, where=ck.path)
        net.eval()
        net.modeconn_meta = ck.meta  # type: ignore[assignment]  # nn.Module.__setattr__ is typed for tensors/modules
        return net
    return ck.build(model, **dict(model_kwargs or {}))
