"""Safetensors read lazily (one tensor or row block at a time) and written incrementally.

:class:`LazyState` is a read-only ``{name: Tensor}`` mapping over one safetensors file or the
shards of a Hugging Face model folder: the header is read at open, each tensor only when asked
for (``safe_open``), and :meth:`LazyState.rows` reads a block of rows. :class:`StreamWriter`
writes a safetensors file (or a set of shards) whose layout is known up front, tensor by tensor
or row block by row block, so an output never has to sit in memory whole.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import CheckpointError

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_CODES = {v: k for k, v in _DTYPES.items()}

# Elements per row block when tensors are processed in pieces (4 MiB of float32): a TIES block
# step holds about 20 such arrays, so blocks bound the working set, not the model's size.
BLOCK_ELEMENTS = 1 << 20


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


class LazyState(Mapping[str, Tensor]):
    """A read-only state dict whose tensors are read from safetensors files on access.

    Args:
        files: ``{tensor name: file}``; every file is opened once with ``safe_open``.
        where: the checkpoint's name, for error messages.

    Example:
        >>> _ = mc.save_checkpoint("a.safetensors", {"fc.weight": torch.ones(3, 2)})
        >>> st = LazyState.open("a.safetensors")
        >>> st.shape("fc.weight"), st.rows("fc.weight", 1, 3).shape
        ((3, 2), torch.Size([2, 2]))
    """

    def __init__(self, files: Mapping[str, str | os.PathLike[str]], where: str = "") -> None:
        from safetensors import safe_open

        self.where = where
        self.device: torch.device | None = None  # where tensors go when read (None: CPU)
        self._handles: dict[str, Any] = {}
        self._file_of: dict[str, str] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self.metadata: dict[str, str] = {}
        for name in dict.fromkeys(str(f) for f in files.values()):
            try:
                h = safe_open(name, framework="pt", device="cpu")
            except Exception as e:  # noqa: BLE001 - any parse failure means corrupt/truncated
                raise CheckpointError(
                    f"cannot read checkpoint {name!r}: not a valid safetensors file (corrupt or "
                    f"truncated?): {_first_line(e)}"
                ) from None
            self._handles[name] = h
            self.metadata.update(h.metadata() or {})
        wanted = {str(k): str(f) for k, f in files.items()}
        for name, h in self._handles.items():
            for k in h.keys():  # noqa: SIM118 - safe_open has no __iter__
                if wanted.get(k, name) == name:
                    sl = h.get_slice(k)
                    code = sl.get_dtype()
                    if code not in _DTYPES:
                        raise CheckpointError(
                            f"checkpoint {where or name!r}: tensor {k!r} has dtype {code}, which "
                            "modeconn does not read"
                        )
                    self._meta[k] = (tuple(sl.get_shape()), _DTYPES[code])
                    self._file_of[k] = name
        missing = [k for k in wanted if k not in self._meta]
        if missing:
            raise CheckpointError(
                f"checkpoint {where!r}: tensor {missing[0]!r} is listed in its index but missing "
                f"from {wanted[missing[0]]!r} ({len(missing)} missing); re-download the folder"
            )

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> LazyState:
        """Open one safetensors file (every tensor in it)."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as h:
                keys = list(h.keys())  # noqa: SIM118
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(
                f"cannot read checkpoint {str(path)!r}: not a valid safetensors file (corrupt or "
                f"truncated?): {_first_line(e)}"
            ) from None
        return cls(dict.fromkeys(keys, str(path)), str(path))

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._file_of:
            raise KeyError(key)
        try:
            t = self._handles[self._file_of[key]].get_tensor(key)
        except Exception as e:  # noqa: BLE001 - a file truncated after its header was read
            raise CheckpointError(
                f"cannot read tensor {key!r} of {self.where!r} (truncated?): {_first_line(e)}"
            ) from None
        return t if self.device is None else t.to(self.device)

    def rows(self, key: str, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` (along dim 0) of tensor ``key``, read without the rest."""
        shape, _ = self._meta[key]
        if not shape:
            return self[key]
        try:
            t = self._handles[self._file_of[key]].get_slice(key)[start:stop]
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(
                f"cannot read tensor {key!r} of {self.where!r} (truncated?): {_first_line(e)}"
            ) from None
        return t if self.device is None else t.to(self.device)

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of ``key`` (from the header; nothing is read)."""
        return self._meta[key][0]

    def dtype(self, key: str) -> torch.dtype:
        """The dtype of ``key`` (from the header)."""
        return self._meta[key][1]

    def __iter__(self) -> Iterator[str]:
        return iter(self._meta)

    def __len__(self) -> int:
        return len(self._meta)

    def __repr__(self) -> str:
        return f"LazyState({self.where!r}, {len(self)} tensors)"


def tensor_meta(state: Mapping[str, Tensor], key: str) -> tuple[tuple[int, ...], torch.dtype]:
    """``(shape, dtype)`` of ``state[key]`` without reading a lazy tensor."""
    if isinstance(state, LazyState):
        return state.shape(key), state.dtype(key)
    t = state[key]
    return tuple(t.shape), t.dtype


def meta_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The state as ``meta``-device tensors (shapes and dtypes only, no data), for checks.

    Example:
        >>> meta_state({"w": torch.zeros(2, 3)})["w"].shape
        torch.Size([2, 3])
    """
    out = {}
    for k in state:
        shape, dt = tensor_meta(state, k)
        out[k] = torch.empty(shape, dtype=dt, device="meta")
    return out


def row_blocks(shape: Sequence[int], block: int = BLOCK_ELEMENTS) -> list[tuple[int, int]]:
    """Split dim 0 of ``shape`` into ``(start, stop)`` row ranges of at most ``block`` elements
    (at least one row each); a 0-d tensor is one block.

    Example:
        >>> row_blocks((5, 2), block=4)
        [(0, 2), (2, 4), (4, 5)]
    """
    if not shape:
        return [(0, 1)]
    n = int(shape[0])
    row = 1
    for s in shape[1:]:
        row *= int(s)
    step = max(1, block // max(row, 1))
    return [(i, min(n, i + step)) for i in range(0, n, step)] or [(0, 0)]


def read_rows(state: Mapping[str, Tensor], key: str, start: int, stop: int) -> Tensor:
    """Rows ``start:stop`` of ``state[key]`` (a 0-d tensor whole); lazy states read only them."""
    if isinstance(state, LazyState):
        return state.rows(key, start, stop)
    t = state[key]
    return t if t.dim() == 0 else t[start:stop]


# --- writing ------------------------------------------------------------------------------------


def nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes of a tensor of ``shape`` and ``dtype``."""
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


def shard_plan(
    layout: Mapping[str, tuple[Sequence[int], torch.dtype]], max_shard_bytes: int | None
) -> list[list[str]]:
    """Group tensor names (in order) into shards of at most ``max_shard_bytes`` (a tensor larger
    than that gets a shard of its own); ``None``: one file.

    Example:
        >>> shard_plan({"a": ((4,), torch.float32), "b": ((4,), torch.float32)}, 20)
        [['a'], ['b']]
    """
    if max_shard_bytes is None:
        return [list(layout)]
    shards: list[list[str]] = [[]]
    size = 0
    for k, (shape, dt) in layout.items():
        nb = nbytes(shape, dt)
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nb
    return shards


class StreamWriter:
    """Write safetensors files whose layout (names, shapes, dtypes) is known before the data.

    Each file's header is written first, then the tensors' bytes in layout order, as they are
    produced (:meth:`write`, possibly several row blocks per tensor). Readers of the result
    (``safe_open``, ``safetensors.torch.load_file``, ``from_pretrained``) see ordinary files.

    Args:
        files: ``[(path, [names...]), ...]`` in the order the tensors will be written.
        layout: ``{name: (shape, dtype)}``.
        metadata: the ``__metadata__`` strings of every file.

    Example:
        >>> w = StreamWriter([("o.safetensors", ["w"])], {"w": ((2, 1), torch.float32)})
        >>> w.write("w", torch.ones(1, 1)); w.write("w", torch.zeros(1, 1)); w.close()
        >>> LazyState.open("o.safetensors")["w"].flatten().tolist()
        [1.0, 0.0]
    """

    def __init__(self, files: Sequence[tuple[str | os.PathLike[str], Sequence[str]]],
                 layout: Mapping[str, tuple[Sequence[int], torch.dtype]],
                 metadata: Mapping[str, str] | None = None) -> None:
        self._files = [(Path(p), list(names)) for p, names in files]
        self._layout = {k: (tuple(int(s) for s in shape), dt) for k, (shape, dt) in layout.items()}
        self._metadata = dict(metadata or {})
        self._order = [k for _, names in self._files for k in names]
        self._i = -1  # index into _order of the tensor being written
        self._left = 0  # bytes of it still to come
        self._file_i = -1
        self._fh: Any = None

    def _open_next_file(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._file_i += 1
        path, names = self._files[self._file_i]
        header: dict[str, Any] = {"__metadata__": self._metadata} if self._metadata else {}
        off = 0
        for k in names:
            shape, dt = self._layout[k]
            nb = nbytes(shape, dt)
            header[k] = {"dtype": _CODES[dt], "shape": list(shape), "data_offsets": [off, off + nb]}
            off += nb
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._fh = open(path, "wb")  # noqa: SIM115 - closed in _open_next_file / close
        self._fh.write(len(raw).to_bytes(8, "little"))
        self._fh.write(raw)

    def write(self, key: str, data: Tensor) -> None:
        """Append ``data`` (the whole tensor ``key`` or its next block of rows)."""
        if self._left and key != self._order[self._i]:
            raise RuntimeError(f"StreamWriter: {self._order[self._i]!r} is incomplete")
        if self._left == 0:
            self._i += 1
            if self._i >= len(self._order) or self._order[self._i] != key:
                want = self._order[self._i] if self._i < len(self._order) else "nothing"
                raise RuntimeError(f"StreamWriter: got {key!r}, expected {want}")
            nxt = self._file_i + 1
            if nxt < len(self._files) and self._files[nxt][1] and key == self._files[nxt][1][0]:
                self._open_next_file()
            shape, dt = self._layout[key]
            self._left = nbytes(shape, dt)
        shape, dt = self._layout[key]
        if data.dtype != dt:
            raise RuntimeError(f"StreamWriter: {key!r} is {data.dtype}, expected {dt}")
        raw = data.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        if raw.nbytes > self._left:
            raise RuntimeError(f"StreamWriter: too much data for {key!r}")
        self._fh.write(raw.tobytes() if raw.nbytes < 1 << 20 else memoryview(raw))  # type: ignore[arg-type]
        self._left -= raw.nbytes

    def close(self) -> None:
        """Check that every tensor was written in full and close the last file."""
        if self._left or self._i != len(self._order) - 1:
            raise RuntimeError("StreamWriter closed before every tensor was written")
        while self._file_i < len(self._files) - 1:  # shards with no tensors (none planned)
            self._open_next_file()
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    def abort(self) -> None:
        """Close without checks (the caller removes the files)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
