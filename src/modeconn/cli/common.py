"""Shared CLI options and helpers, so every command takes its options and loads checkpoints alike.

Options: ``--model``, ``--model-arg``, ``--data``, ``--device``, ``--json PATH``, ``--seed``,
``--progress/--no-progress``, ``--mkdir`` (Annotated aliases below).

Convention: each command lives in its own module ``modeconn/cli/<name>.py`` and defines
``def command(...)`` with typer-annotated parameters (use the aliases below); ``cli/main.py``
registers it with ``app.command("<name>")(module.command)``. Commands raise
``modeconn`` exceptions for bad input (main turns them into one line, exit 2). Before any work a
command passes every file it writes and every file it reads to :func:`check_outputs` (output =
input, missing folders without ``--mkdir``, wrong suffixes, unwritable folders are refused), then
writes only through :func:`write_json` / ``modeconn.atomic_write``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from modeconn import ConfigError, DataError, atomic_write, check_data_fits, json_default

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
ResumeOpt = Annotated[
    bool, typer.Option("--resume/--no-resume", help="Continue an interrupted run in --out.")
]
MkdirOpt = Annotated[
    bool, typer.Option("--mkdir", help="Create missing output folders (else they are refused).")
]


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
    from modeconn import load_model, resolve_device

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
    from modeconn import data as _data

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
    from modeconn import data as _data

    src = (meta or {}).get("data")
    if not isinstance(src, str) or not src:
        return None
    if ":" in src and src not in _data.sources() and not os.path.exists(src):
        raise DataError(
            f"the checkpoint records the data source {src!r}, an import path; modeconn does not "
            f"run code named in a file: pass --data {src} to use it"
        )
    return src


def build_model(name: str, splits: Any, model_args: Mapping[str, Any], *, seed: int) -> Any:
    """Build ``--model`` for ``splits`` (``mc.models.create_for``: shapes from the data, size
    checked first, initialisation seeded with ``seed``).

    Example:
        >>> import modeconn as mc
        >>> build_model("mlp", mc.data.load("digits"), {}, seed=0).modeconn_config["name"]
        'mlp'
    """
    from modeconn.models import create_for

    return create_for(name, splits, model_args, seed=seed)


def check_finite_losses(
    what: str, losses: Sequence[float], ts: Sequence[float] | None = None
) -> None:
    """The non-finite rule for results: call after the tables and files are written; NaN or inf
    in ``losses`` ends the command with :class:`NonFiniteError` (one line, exit code 1).

    Example:
        >>> check_finite_losses("linear path", [0.1, 0.2])
    """
    from modeconn import NonFiniteError

    bad = [i for i, v in enumerate(losses) if not math.isfinite(float(v))]
    if bad:
        at = f" (first t = {ts[bad[0]]:.3f})" if ts is not None else ""
        raise NonFiniteError(
            f"{what}: the loss is NaN or inf at {len(bad)} of {len(losses)} points{at}; reported "
            "as NaN (null in JSON): the weights overflow there"
        )


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
        plain = json.loads(json.dumps(obj, default=json_default))  # tensors etc. -> plain
        text = json.dumps(_finite_or_none(plain), indent=2, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"cannot write {str(path)!r}: results are not JSON-serialisable ({e})"
        ) from None
    with atomic_write(path, "w") as f:
        f.write(text + "\n")
    return Path(path)


CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth")
PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".eps", ".ps", ".tif", ".tiff", ".webp")
_DEFAULT_SUFFIXES = {"--plot": PLOT_SUFFIXES}
_WRONG_SUFFIXES = {"--json": CHECKPOINT_SUFFIXES + PLOT_SUFFIXES}  # JSON under another type's name

Paths = Iterable[str | Path | None]


def _same_file(a: Path, b: Path) -> bool:
    """``a`` and ``b`` name one file (after resolving links; hard links too when both exist)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs(
    outputs: Mapping[str, str | Path | None],
    *,
    inputs: Paths = (),
    mkdir: bool = False,
    suffixes: Mapping[str, Sequence[str]] | None = None,
    folders: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """The one output check every command calls before any work (then writes atomically).

    Refuses, each as one :class:`ConfigError` line: an output that is one of ``inputs`` (the
    same file after resolving links: the input would be destroyed); two outputs that are one
    file (``--out o.safetensors --json o.safetensors``); an output file that is a folder or has
    the wrong suffix (``--plot`` must be an image format matplotlib writes, ``--json`` must not
    look like a checkpoint or an image); an output in a folder
    that does not exist, unless ``mkdir`` (the command's ``--mkdir``); a folder that cannot be
    written (a real probe, so a long run never fails only at its last step).

    Args:
        outputs: ``{option: path}`` for every file the command writes (``None``: not asked for),
            e.g. ``{"--out": out, "--json": json_path}``.
        inputs: every file the command reads (checkpoints, ``--config``, ``--spec``, an .npz).
        mkdir: create missing folders (else refuse them).
        suffixes: ``{option: allowed suffixes}``; ``--plot`` defaults to :data:`PLOT_SUFFIXES`.
        folders: ``{option: names written inside}`` for outputs that are folders (``curve
            --out``); those files are checked against the inputs too.

    Example:
        >>> check_outputs({"--out": "b.safetensors", "--json": None}, inputs=["a.safetensors"],
        ...               suffixes={"--out": CHECKPOINT_SUFFIXES})
        >>> try:
        ...     check_outputs({"--out": "a.safetensors"}, inputs=["./a.safetensors"])
        ... except ConfigError as e:
        ...     print(e)  # doctest: +ELLIPSIS
        --out 'a.safetensors' is also an input; write the result to another file ...
    """
    allowed = {**_DEFAULT_SUFFIXES, **(suffixes or {})}
    dirs = dict(folders or {})
    ins = [Path(p) for p in inputs if p is not None and str(p)]
    given = {opt: Path(raw) for opt, raw in outputs.items() if raw is not None}
    files: list[tuple[str, Path]] = []  # every file the command will write
    for opt, p in given.items():
        if opt in dirs:
            files += [(f"{opt} file", p / name) for name in dirs[opt]]
        else:
            files.append((opt, p))
    # first what would destroy data: an output that is an input, two outputs on one file
    for opt, p in [*((o, q) for o, q in given.items() if o in dirs), *files]:
        for src in ins:
            if _same_file(p, src):
                raise ConfigError(
                    f"{opt} {str(p)!r} is also an input; write the result to another "
                    f"{'folder' if opt in dirs else 'file'} (the input is left unchanged)"
                )
    for i, (opt, p) in enumerate(files):
        for opt2, q in files[:i]:
            if _same_file(p, q):
                raise ConfigError(f"{opt2} and {opt} are the same file {str(p)!r}; give two names")
    # then the kind of each output and the folder it goes to
    for opt, p in given.items():
        if opt in dirs:
            if p.exists() and not p.is_dir():
                raise ConfigError(f"{opt} {str(p)!r} is a file; give a folder")
            _check_folder(p.parent, f"{opt} {str(p)!r}", mkdir)
            continue
        if p.is_dir():
            raise ConfigError(f"{opt} {str(p)!r} is a folder; give a file name")
        ok = allowed.get(opt, ())
        if ok and p.suffix.lower() not in ok:
            raise ConfigError(f"{opt} {str(p)!r} must end with one of {', '.join(ok)}")
        if p.suffix.lower() in _WRONG_SUFFIXES.get(opt, ()):
            raise ConfigError(
                f"{opt} {str(p)!r} would hold JSON under a {p.suffix} name; give a .json file"
            )
        _check_folder(p.parent, f"{opt} {str(p)!r}", mkdir)


def check_out_path(
    path: str | Path, *, suffixes: Sequence[str] = (), inputs: Paths = (), mkdir: bool = False
) -> Path:
    """:func:`check_outputs` for one output file (kept for single-output callers).

    Example:
        >>> check_out_path("a.safetensors", suffixes=[".safetensors", ".pt"]).name
        'a.safetensors'
    """
    check_outputs({"output": path}, inputs=inputs, mkdir=mkdir, suffixes={"output": suffixes})
    return Path(path)


def check_out_dir(path: str | Path, *, inputs: Paths = (), mkdir: bool = False) -> Path:
    """:func:`check_outputs` for one output folder (kept for single-output callers).

    Example:
        >>> check_out_dir("curve").name
        'curve'
    """
    check_outputs({"--out": path}, inputs=inputs, mkdir=mkdir, folders={"--out": ()})
    return Path(path)


def _check_folder(folder: Path, what: str, mkdir: bool) -> None:
    """``folder`` exists (or ``mkdir`` and it can be created) and accepts a new file (a probe)."""
    anc = Path(os.path.abspath(folder))
    while not anc.exists() and anc.parent != anc:
        anc = anc.parent
    if not anc.is_dir():
        raise ConfigError(f"cannot write {what}: {str(anc)!r} is a file, not a folder")
    if anc != Path(os.path.abspath(folder)) and not mkdir:
        raise ConfigError(
            f"cannot write {what}: folder {str(folder)!r} does not exist; create it or pass --mkdir"
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".modeconn-probe-", dir=anc)
    except OSError as e:
        raise ConfigError(
            f"cannot write {what}: folder {str(anc)!r} is not writable ({e.strerror or e})"
        ) from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def read_text_arg(path: str | Path, option: str, kind: str) -> str:
    """The text of a file given on the command line (``--spec``, ``--config``); a missing,
    unreadable or binary file is one :class:`ConfigError` line.

    Example:
        >>> read_text_arg("spec.json", "--spec", "JSON")  # doctest: +SKIP
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{option} {str(p)!r} does not exist" + (" (a folder)" * p.is_dir()))
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(
            f"{option} {str(p)!r} is not a text file (binary data); give a {kind} file"
        ) from None
    except OSError as e:
        raise ConfigError(f"cannot read {option} {str(p)!r}: {e.strerror or e}") from None


def load_spec_arg(path: str | Path) -> Any:
    """Read ``--spec`` (JSON as ``modeconn spec --json`` writes it): a missing or binary file, bad
    JSON, or a group with no slots (it would permute nothing, yet report success) is one line.

    Example:
        >>> load_spec_arg("spec.json").groups  # doctest: +SKIP
        {'h': 64}
    """
    from modeconn import PermutationSpec, SpecError

    spec = PermutationSpec.from_json(read_text_arg(path, "--spec", "JSON"))
    empty = [g for g in spec.groups if not spec.slots.get(g)]
    if empty:
        raise SpecError(
            f"--spec {str(path)!r}: group {empty[0]!r} has no slots, so it permutes nothing; "
            "list its slots (param, axis) or remove the group"
        )
    return spec
