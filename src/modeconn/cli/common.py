"""Shared CLI options and helpers, so every command takes its options and loads checkpoints alike.

Options: ``--model``, ``--model-arg``, ``--data``, ``--device``, ``--json PATH``, ``--seed``,
``--progress/--no-progress`` (Annotated aliases below).

Convention: each command lives in its own module ``modeconn/cli/<name>.py`` and defines
``def command(...)`` with typer-annotated parameters (use the aliases below); ``cli/main.py``
registers it with ``app.command("<name>")(module.command)``. Commands raise
``modeconn._src.errors`` exceptions for bad input (main turns them into one line, exit 2) and
write files only through :func:`write_json` / ``modeconn._src.io.atomic_write``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from .._src.errors import ConfigError, DataError
from .._src.io import _json_default, atomic_write

console = Console()
err_console = Console(stderr=True)

# --- the shared options (use these aliases as parameter annotations) -----------------------------

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Zoo model name (see `modeconn train --help`) or 'package.module:function'. "
        "Not needed for checkpoints written by modeconn.",
    ),
]
ModelArgsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--model-arg",
        help="Model option KEY=VALUE (YAML value), repeatable: --model-arg width=256 "
        "--model-arg 'input_shape=[1,8,8]'.",
    ),
]
DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        "-d",
        help="Data source: mnist1d, digits, a path to an .npz (x_train, y_train, x_test, y_test) "
        "or 'package.module:function'. Default: the source recorded in the checkpoint.",
    ),
]
DeviceOpt = Annotated[
    str | None, typer.Option("--device", help="cpu (default), cuda, cuda:1, mps.")
]
JsonOpt = Annotated[
    Path | None,
    typer.Option("--json", help="Also write machine-readable results to this JSON file."),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]


# --- helpers ----------------------------------------------------------------------------------


class Interrupted(Exception):
    """Ctrl-C inside a command; the message says what was kept and how to resume.

    ``cli.main`` prints ``interrupted: <message>`` and exits with 130.
    """


@contextlib.contextmanager
def on_interrupt(message: str | Callable[[], str]) -> Iterator[None]:
    """Turn Ctrl-C inside the block into :class:`Interrupted` with ``message`` (or its result).

    Example:
        >>> with on_interrupt("nothing was written"):
        ...     pass
    """
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(message() if callable(message) else message) from None


def parse_model_args(
    items: Sequence[str] | None, *, option: str = "--model-arg", example: str = "width=256"
) -> dict[str, Any]:
    """``["width=256", "norm=bn"]`` -> ``{"width": 256, "norm": "bn"}`` (values read as YAML).

    Args:
        items: ``KEY=VALUE`` strings.
        option: the option's name, for error messages.
        example: a valid item, for error messages.

    Returns:
        The options as a dict.

    Example:
        >>> parse_model_args(["width=8", "input_shape=[1,8,8]"])
        {'width': 8, 'input_shape': [1, 8, 8]}
    """
    import yaml

    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{option} {item!r} must look like KEY=VALUE, e.g. {example}")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"{option} {item!r}: cannot read the value {raw!r}") from None
    return out


def load_model_arg(
    path: str | Path,
    model: str | None = None,
    model_args: Sequence[str] | Mapping[str, Any] | None = None,
    *,
    device: str | None = None,
) -> Any:
    """Load a checkpoint given on the command line into its model (see ``mc.load_model``).

    Args:
        path: the checkpoint file.
        model: ``--model`` (needed only for checkpoints not written by modeconn).
        model_args: ``--model-arg`` strings or an already parsed dict.
        device: ``--device``.

    Returns:
        The ``nn.Module`` in eval mode, on ``device``; ``.modeconn_meta`` holds the metadata.

    Example:
        >>> net = load_model_arg("a.safetensors")  # doctest: +SKIP
    """
    from .._src.evaluation import resolve_device
    from .._src.io import load_model

    kwargs = dict(model_args) if isinstance(model_args, Mapping) else parse_model_args(model_args)
    dev = resolve_device(device)
    net = load_model(path, model, kwargs)
    return net.to(dev)


def load_data_arg(source: str | None, *models: Any, **kwargs: Any) -> Any:
    """Load ``--data``; without it, the data source recorded in the first model's checkpoint.

    Args:
        source: the ``--data`` value, or ``None``.
        *models: models loaded by :func:`load_model_arg` (their ``modeconn_meta["data"]``).
        **kwargs: passed to ``mc.data.load``.

    Returns:
        ``mc.data.Splits``.

    Example:
        >>> load_data_arg("digits").input_shape
        (1, 8, 8)
    """
    from .. import data as _data

    if source is None:
        for m in models:
            source = recorded_data(getattr(m, "modeconn_meta", None))
            if source is not None:
                break
    if source is None:
        raise DataError("no --data given and the checkpoint does not record its data; pass --data")
    splits = _data.load(source, **kwargs)
    if models:
        check_data_fits(models[0], splits)
    return splits


def recorded_data(meta: Mapping[str, Any] | None) -> str | None:
    """The data source a checkpoint's metadata records, if any.

    A recorded ``"package.module:function"`` is refused: modeconn never imports and runs code
    named inside a file (a crafted checkpoint could name any function); pass it as ``--data``.

    Args:
        meta: checkpoint metadata (``Checkpoint.meta`` or ``model.modeconn_meta``).

    Returns:
        The source (a built-in name or a file path), or ``None``.

    Example:
        >>> recorded_data({"data": "digits"})
        'digits'
    """
    from .. import data as _data

    src = (meta or {}).get("data")
    if not isinstance(src, str) or not src:
        return None
    if ":" in src and src not in _data.sources() and not os.path.exists(src):
        raise DataError(
            f"the checkpoint records the data source {src!r}, an import path; modeconn does not "
            f"run code named in a file: pass --data {src} to use it"
        )
    return src


def check_data_fits(model: Any, splits: Any) -> None:
    """Run two training examples through ``model``: a data set of the wrong shape or with more
    classes than the model's outputs is one clear :class:`DataError` before any work.

    Example:
        >>> import modeconn as mc
        >>> check_data_fits(mc.models.create("mlp", input_shape=(1, 8, 8)), mc.data.load("digits"))
    """
    import torch

    from .._src.evaluation import model_device

    try:
        x = torch.as_tensor(splits.train[0][0]).unsqueeze(0)
    except Exception:  # noqa: BLE001 - an unusual dataset: let the real run speak for itself
        return
    x = torch.cat([x, x]).to(model_device(model))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:  # noqa: BLE001 - any failure here means the data does not fit
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"data {splits.name!r} (inputs of shape {tuple(splits.input_shape)}) does not fit "
            f"the model: {msg}; pass the --data it was trained on"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        return
    if out.shape[-1] < splits.num_classes:
        raise DataError(
            f"data {splits.name!r} has {splits.num_classes} classes but the model has "
            f"{out.shape[-1]} outputs; pass the --data it was trained on"
        )


def build_model(name: str, splits: Any, model_args: Mapping[str, Any], *, seed: int) -> Any:
    """Build ``--model`` for ``splits``: ``input_shape``/``num_classes`` come from the data
    (unless given in ``model_args``); the initialisation is seeded with ``seed``.

    Example:
        >>> import modeconn as mc
        >>> build_model("mlp", mc.data.load("digits"), {}, seed=0).modeconn_config["name"]
        'mlp'
    """
    import importlib

    import torch

    from ..models import create, resolve

    kwargs = dict(model_args)
    if ":" not in name:
        kwargs.setdefault("input_shape", list(splits.input_shape))
        kwargs.setdefault("num_classes", splits.num_classes)
        return create(name, seed=seed, **kwargs)
    mod, _, fn = name.partition(":")
    with contextlib.suppress(Exception):
        params = inspect.signature(getattr(importlib.import_module(mod), fn)).parameters
        if "input_shape" in params:
            kwargs.setdefault("input_shape", list(splits.input_shape))
        if "num_classes" in params:
            kwargs.setdefault("num_classes", splits.num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return resolve(name, **kwargs)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.3g}"
    return str(v)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a rich table on stdout (floats to 4 decimals).

    Args:
        title: shown above the table.
        columns: header names.
        rows: one sequence of cells per row.

    Example:
        >>> print_table("metrics", ["split", "acc"], [["test", 0.91]])  # doctest: +SKIP
    """
    from rich.markup import escape

    table = Table()
    for i, c in enumerate(columns):
        table.add_column(str(c), justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(_cell(v) for v in row))
    # the title on its own line: as a table title it wraps to the (narrow) table's width
    console.print(f"[bold]{escape(title)}[/bold]")
    console.print(table)


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as strict, indented JSON, atomically.

    Tensors, numpy values and paths are converted; NaN and infinities (a diverged run) become
    ``null``, so every JSON parser reads the file.

    Args:
        path: destination.
        obj: JSON-serialisable data.

    Returns:
        The path written.

    Example:
        >>> write_json("out.json", {"barrier": 0.1})  # doctest: +SKIP
    """
    try:
        plain = json.loads(json.dumps(obj, default=_json_default))  # tensors etc. -> plain
        text = json.dumps(_finite_or_none(plain), indent=2, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"cannot write {str(path)!r}: results are not JSON-serialisable ({e})"
        ) from None
    with atomic_write(path, "w") as f:
        f.write(text + "\n")
    return Path(path)


def check_out_path(path: str | Path, *, suffixes: Sequence[str] = ()) -> Path:
    """Validate an output file before any work: not a folder, one of ``suffixes`` if given, and
    somewhere files can be written (so a long run never fails only at its last step).

    Example:
        >>> check_out_path("a.safetensors", suffixes=[".safetensors", ".pt"]).name
        'a.safetensors'
    """
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"output {str(p)!r} is a folder; give a file name")
    if suffixes and p.suffix.lower() not in suffixes:
        raise ConfigError(f"output {str(p)!r} must end with one of {', '.join(suffixes)}")
    _check_writable(p.parent, f"output {str(p)!r}")
    return p


def check_out_dir(path: str | Path) -> Path:
    """Validate an output folder before any work: not a file, and writable (or creatable).

    Example:
        >>> check_out_dir("curve").name
        'curve'
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"--out {str(p)!r} is a file; give a folder")
    _check_writable(p, f"output folder {str(p)!r}")
    return p


def _check_writable(folder: Path, what: str) -> None:
    """The nearest existing folder at or above ``folder`` accepts a new file (a real probe)."""
    anc = Path(os.path.abspath(folder))
    while not anc.exists() and anc.parent != anc:
        anc = anc.parent
    if not anc.is_dir():
        raise ConfigError(f"cannot write {what}: {str(anc)!r} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".modeconn-probe-", dir=anc)
    except OSError as e:
        raise ConfigError(
            f"cannot write {what}: folder {str(anc)!r} is not writable ({e.strerror or e})"
        ) from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
