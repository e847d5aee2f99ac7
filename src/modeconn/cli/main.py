"""The ``modeconn`` application: registers every command and turns errors into one line.

Exit codes: 0 success; 1 non-finite results (NaN/inf losses, see ``NonFiniteError``: tables and
files are written, then one ``error: ...`` line); 2 bad input (a ``ModeconnError``, a usage error,
a file that cannot be read or written), printed as one ``error: ...`` line on stderr; 130
interrupted (Ctrl-C), with a line saying what was kept and how to resume where a command can.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import typer

from .common import Interrupted

app = typer.Typer(
    name="modeconn",
    help="Mode connectivity for PyTorch: symmetry, alignment, low-loss curves and merging.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstring paragraphs re-flow instead of keeping line breaks
)


def _version(value: bool) -> None:
    if value:
        from modeconn import __version__

        print(f"modeconn {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", callback=_version, is_eager=True
    ),
) -> None:
    """Mode connectivity for PyTorch: symmetry, alignment, low-loss curves and merging."""


def _interruptible(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Let Ctrl-C inside a command reach :func:`main` (typer would turn it into a return value).

    A command that can be resumed raises :class:`Interrupted` with its own hint first.
    """

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            raise Interrupted(
                "no file was left half-written (outputs are written atomically); "
                "run the command again"
            ) from None

    return run


def _register(name: str, fn: Callable[..., Any]) -> None:
    app.command(name)(_interruptible(fn))


# --- command registration: one line per command, each command in its own module ---------------
# (each module defines `def command(...)`; import here and register with _register(name, fn))
from . import align as _align  # noqa: E402
from . import demo as _demo  # noqa: E402
from . import merge as _merge  # noqa: E402
from . import methods as _methods  # noqa: E402
from . import paths as _paths  # noqa: E402
from . import spec as _spec  # noqa: E402
from . import sweep as _sweep  # noqa: E402
from . import train as _train  # noqa: E402

_register("demo", _demo.command)
_register("train", _train.command)
_register("align", _align.command)
_register("merge", _merge.command)
_register("spec", _spec.command)
_register("instability", _methods.instability)
_register("autoneb", _methods.autoneb)
_register("simplex", _methods.simplex)
_register("subspace", _methods.subspace)
_register("interpolate", _paths.interpolate)
_register("curve", _paths.curve)
_register("evaluate", _paths.evaluate)
_register("sweep", _sweep.command)
_register("report", _sweep.report)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _usage_error(e: Any) -> str:
    """A click usage error as one line, with the command's --help to try."""
    ctx = getattr(e, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    return f"error: {_one_line(e.format_message())}{hint}"


def main() -> None:
    """Console entry point: run the app; bad input becomes one line on stderr and exit code 2."""
    import importlib

    from modeconn import ModeconnError, NonFiniteError

    # typer >= 0.20 vendors its own copy of click; older typers use the click package. Catch the
    # exceptions of whichever is importable (a plain install has only typer's).
    click_errors: tuple[type, ...] = ()
    usage_errors: tuple[type, ...] = ()
    no_args: tuple[type, ...] = ()
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            exc = importlib.import_module(name)
        except ImportError:
            continue
        click_errors += (exc.ClickException,)
        usage_errors += (exc.UsageError,)
        no_args += (exc.NoArgsIsHelpError,)

    try:
        rv = app(standalone_mode=False)
    except ModeconnError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        raise SystemExit(1 if isinstance(e, NonFiniteError) else 2) from None
    except Interrupted as e:
        print(f"interrupted: {_one_line(e)}", file=sys.stderr)
        raise SystemExit(130) from None
    except (typer.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except SystemExit:
        raise
    except OSError as e:  # a file that cannot be read or written (permissions, missing folder)
        where = f" {str(e.filename)!r}" if getattr(e, "filename", None) else ""
        print(f"error: cannot access{where}: {e.strerror or e}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as e:  # noqa: BLE001 - click usage errors land here in non-standalone mode
        if isinstance(e, no_args):
            e.show()  # type: ignore[attr-defined]  # click's or typer's bundled click
            raise SystemExit(2) from None
        if isinstance(e, usage_errors):
            print(_usage_error(e), file=sys.stderr)
            raise SystemExit(2) from None
        if isinstance(e, click_errors):
            msg = e.format_message()  # type: ignore[attr-defined]  # click's or typer's bundled click
            print(f"error: {_one_line(msg)}", file=sys.stderr)
            raise SystemExit(2) from None
        raise
    # non-standalone typer returns an exit code instead of raising (130 for a Ctrl-C that hit
    # outside a command, e.g. while parsing)
    if isinstance(rv, int) and rv != 0:
        if rv == 130:
            print("interrupted", file=sys.stderr)
        raise SystemExit(rv)


if __name__ == "__main__":
    main()
