"""Hugging Face model folders: read one lazily, build its transformers model, write one atomically.

A model folder is ``config.json`` plus ``model.safetensors`` or ``model.safetensors.index.json``
with its shards (what ``save_pretrained`` writes). Nothing here touches a network: transformers
is always called with ``local_files_only=True`` and without remote code.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import CheckpointError
from .lazy import LazyState, StreamWriter, nbytes, shard_plan, tensor_meta

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Files of the input folder that are not copied to an output folder (the weights).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")
_WEIGHT_INDEXES = (INDEX, "pytorch_model.bin.index.json")
DEFAULT_SHARD = 2 * 1024**3  # bytes per output shard


def is_model_folder(path: str | os.PathLike[str]) -> bool:
    """True for a folder (a Hugging Face model folder or something claiming to be one)."""
    return Path(path).is_dir()


def open_folder(path: str | os.PathLike[str]) -> LazyState:
    """Open the weights of a model folder lazily (one file or every shard of its index).

    Raises:
        CheckpointError: no ``config.json``, no weights, a damaged index or a missing shard.

    Example:
        >>> open_folder("gpt2-finetuned")  # doctest: +SKIP
    """
    p = Path(path)
    if not (p / "config.json").is_file():
        raise CheckpointError(
            f"folder {str(p)!r} has no config.json; give a Hugging Face model folder (what "
            "save_pretrained writes) or a checkpoint file"
        )
    if (p / INDEX).is_file():
        try:
            weight_map = json.loads((p / INDEX).read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(
                f"{str(p / INDEX)!r} is damaged (no weight_map); re-download the folder"
            ) from None
        for shard in dict.fromkeys(weight_map.values()):
            if not (p / str(shard)).is_file():
                raise CheckpointError(
                    f"folder {str(p)!r} is missing shard {shard!r} listed in {INDEX}; "
                    "re-download the folder"
                )
        return LazyState({k: p / str(f) for k, f in weight_map.items()}, str(p))
    if (p / SINGLE).is_file():
        st = LazyState.open(p / SINGLE)
        st.where = str(p)
        return st
    bins = [n for n in ("pytorch_model.bin", "pytorch_model.bin.index.json") if (p / n).exists()]
    hint = (f" (it has {bins[0]}: convert it with save_pretrained(..., safe_serialization=True))"
            if bins else "")
    raise CheckpointError(f"folder {str(p)!r} has no {SINGLE} or {INDEX}{hint}")


def build_model(path: str | os.PathLike[str], state: Mapping[str, Tensor] | None = None) -> Any:
    """The transformers model of a folder, from local files only (no remote code).

    The class is the config's first ``architectures`` entry when transformers defines it, else
    ``AutoModel``. With ``state`` (e.g. a permuted copy), those weights replace the folder's.

    Example:
        >>> build_model("gpt2-finetuned").config.model_type  # doctest: +SKIP
        'gpt2'
    """
    try:
        import transformers
    except ImportError:
        raise CheckpointError(
            "building a Hugging Face model folder needs transformers: pip install modeconn[hf]"
        ) from None
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        archs = getattr(config, "architectures", None) or []
        cls = getattr(transformers, archs[0], None) if archs else None
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            cls = transformers.AutoModel
        net = cls.from_pretrained(str(path), local_files_only=True, trust_remote_code=False,
                                  dtype="auto")
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot build the model of folder {str(path)!r}: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                              ) from None
    if state is not None:
        missing, unexpected = net.load_state_dict(dict(state), strict=False)
        if unexpected:
            raise CheckpointError(
                f"folder {str(path)!r}: tensor {unexpected[0]!r} does not fit its model"
            )
    net.eval()
    return net


def _layout(state: Mapping[str, Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: tensor_meta(state, k) for k in state}


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` (a rename),
    on error it is removed, so no half-written output folder is ever left behind.

    Example:
        >>> with atomic_folder("merged") as tmp:  # doctest: +SKIP
        ...     (tmp / "config.json").write_text("{}")
    """
    dest = Path(path)
    if dest.exists() and not dest.is_dir():
        raise CheckpointError(f"output {str(dest)!r} is a file; give a folder name")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
            os.rmdir(old)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def copy_folder_files(src: str | os.PathLike[str], dest: Path) -> None:
    """Copy a model folder's non-weight files (config, generation config, tokenizer, ...)."""
    for f in Path(src).iterdir():
        if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and f.name not in _WEIGHT_INDEXES:
            shutil.copy2(f, dest / f.name)


def write_tensors(
    out: str | os.PathLike[str],
    layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    chunks: Iterable[tuple[str, Tensor]],
    *,
    metadata: Mapping[str, str] | None = None,
    folder_from: str | os.PathLike[str] | None = None,
    max_shard_bytes: int = DEFAULT_SHARD,
) -> Path:
    """Write tensors produced one (row block) at a time, atomically, without holding them.

    With ``folder_from`` the output is a model folder: the weights sharded like
    ``save_pretrained`` (``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` and
    ``model.safetensors.index.json``), the other files of ``folder_from`` (``config.json``,
    tokenizer, ...) copied. Else ``out`` is one ``.safetensors`` file.

    Args:
        out: the output file or folder.
        layout: ``{name: (shape, dtype)}`` of every tensor, in the order they will come.
        chunks: ``(name, tensor or next row block)`` pairs in layout order.
        metadata: safetensors header strings.
        folder_from: the model folder whose config the output shares.
        max_shard_bytes: shard size of a folder output.

    Returns:
        The path written.

    Example:
        >>> write_tensors("o.safetensors", {"w": ((2,), torch.float32)}, [("w", torch.ones(2))])
        PosixPath('o.safetensors')
    """
    from .io import atomic_path

    meta = {"format": "pt", **dict(metadata or {})}
    dest = Path(out)
    if folder_from is None:
        with atomic_path(dest) as tmp:
            _stream(StreamWriter([(tmp, list(layout))], layout, meta), chunks)
        return dest
    plan = shard_plan(layout, max_shard_bytes)
    names = ([SINGLE] if len(plan) == 1 else
             [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
    with atomic_folder(dest) as tmp:
        copy_folder_files(folder_from, tmp)
        _stream(StreamWriter([(tmp / n, ks) for n, ks in zip(names, plan, strict=True)],
                             layout, meta), chunks)
        if len(plan) > 1:
            total = sum(nbytes(*layout[k]) for k in layout)
            index = {"metadata": {"total_size": total},
                     "weight_map": {k: n for n, ks in zip(names, plan, strict=True) for k in ks}}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return dest


def _stream(writer: StreamWriter, chunks: Iterable[tuple[str, Tensor]]) -> None:
    try:
        for k, t in chunks:
            writer.write(k, t)
        writer.close()
    except BaseException:
        writer.abort()
        raise


def save_state(
    out: str | os.PathLike[str], state: Mapping[str, Tensor], *,
    folder_from: str | os.PathLike[str] | None = None,
    metadata: Mapping[str, str] | None = None, max_shard_bytes: int = DEFAULT_SHARD,
) -> Path:
    """Write ``state`` (tensors or a lazy state, read one at a time) as a file or model folder.

    Example:
        >>> save_state("out", merged, folder_from="gpt2-finetuned")  # doctest: +SKIP
    """
    layout = _layout(state)
    return write_tensors(out, layout, ((k, state[k]) for k in layout), metadata=metadata,
                         folder_from=folder_from, max_shard_bytes=max_shard_bytes)


def permuted_tensors(state: Mapping[str, Tensor], spec: Any, perm: Mapping[str, Tensor]
                     ) -> Iterator[tuple[str, Tensor]]:
    """``apply_permutation(spec, perm, state)`` one tensor at a time (a lazy state is read one
    tensor at a time; dtypes are kept: a gather is exact in any dtype).

    Spec slots naming tensors the state does not hold (the tied ``lm_head.weight`` a model
    folder omits) are skipped; the folder's loader re-ties them to their permuted source.

    Example:
        >>> spec = mc.PermutationSpec.from_axes({"h": 2}, {"w": ("h", None)})
        >>> dict(permuted_tensors({"w": torch.eye(2)}, spec, {"h": torch.tensor([1, 0])}))["w"]
        tensor([[0., 1.],
                [1., 0.]])
    """
    from .spec import PermutationSpec, apply_permutation

    for k in state:
        slots = {g: tuple(s for _, s in spec.slots_of(k) if _ == g) for g in spec.groups}
        if not any(slots.values()):
            yield k, state[k]
            continue
        one = PermutationSpec(groups=dict(spec.groups), slots=slots)
        yield k, apply_permutation(one, perm, {k: state[k]})[k]


def save_permuted(
    out: str | os.PathLike[str], state: Mapping[str, Tensor], spec: Any,
    perm: Mapping[str, Tensor], *, folder_from: str | os.PathLike[str] | None = None,
    metadata: Mapping[str, str] | None = None, max_shard_bytes: int = DEFAULT_SHARD,
) -> Path:
    """Write ``state`` permuted by ``perm``, streamed tensor by tensor (see :func:`save_state`).

    Example:
        >>> spec = mc.PermutationSpec.from_axes({"h": 2}, {"w": ("h", None)})
        >>> perm = {"h": torch.tensor([1, 0])}
        >>> out = save_permuted("p.safetensors", {"w": torch.eye(2)}, spec, perm)
        >>> mc.load_checkpoint(out).state["w"].tolist()
        [[0.0, 1.0], [1.0, 0.0]]
    """
    layout = _layout(state)
    return write_tensors(out, layout, permuted_tensors(state, spec, perm), metadata=metadata,
                         folder_from=folder_from, max_shard_bytes=max_shard_bytes)


def save_model_folder(
    path: str | os.PathLike[str], state: Mapping[str, Tensor], like: str | os.PathLike[str], *,
    max_shard_bytes: int = DEFAULT_SHARD,
) -> Path:
    """Write ``state`` as a Hugging Face model folder shaped like the folder ``like``.

    The tensors ``like`` stores are written (a model's tied copies, such as GPT-2's
    ``lm_head.weight``, are left out as ``save_pretrained`` does), sharded, with ``like``'s
    config and tokenizer files; atomically (no half-written folder on error). ``from_pretrained``
    loads the result.

    Args:
        path: the output folder.
        state: the weights (a state dict, a model's ``state_dict()``, or a lazy state).
        like: the model folder whose layout and config the output takes.
        max_shard_bytes: shard size.

    Returns:
        The folder written.

    Example:
        >>> mc.save_model_folder("gpt2-aligned", net.state_dict(), like="gpt2-b")  # doctest: +SKIP
    """
    keys = list(open_folder(like))
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(
            f"cannot write a folder like {str(like)!r}: the state has no tensor {missing[0]!r}"
        )
    sub = {k: state[k] for k in keys} if not isinstance(state, LazyState) else state
    return save_state(path, sub, folder_from=like, max_shard_bytes=max_shard_bytes)


def permute_checkpoint(
    path: str | os.PathLike[str], spec: Any, perm: Mapping[str, Tensor],
    out: str | os.PathLike[str], *, max_shard_bytes: int = DEFAULT_SHARD,
) -> Path:
    """Apply ``perm`` to a checkpoint file or model folder, streamed tensor by tensor.

    A folder gives a folder (its config copied, sharded); a file gives a ``.safetensors`` file
    with the same modeconn metadata. Each tensor keeps its dtype.

    Args:
        path: the checkpoint (file or model folder).
        spec: the permutation spec of its model.
        perm: ``{group: permutation}`` (e.g. from ``mc.weight_matching``).
        out: where to write.
        max_shard_bytes: shard size of a folder output.

    Returns:
        The path written.

    Example:
        >>> mc.permute_checkpoint("gpt2-b", spec, perm, "gpt2-b-aligned")  # doctest: +SKIP
    """
    from .io import load_checkpoint

    ck = load_checkpoint(path)
    meta = None
    if not ck.folder:
        meta = {"modeconn": json.dumps(ck.meta)} if ck.meta else None
    return save_permuted(out, ck.state, spec, perm, folder_from=ck.path if ck.folder else None,
                         metadata=meta, max_shard_bytes=max_shard_bytes)
