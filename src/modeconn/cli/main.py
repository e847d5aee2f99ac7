"""The ``modeconn`` application: registers every command and turns library errors into one line."""

from __future__ import annotations

import sys

import typer

app = typer.Typer(
    name="modeconn",
    help="Mode connectivity for PyTorch: symmetry, alignment, low-loss curves and merging.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# --- command registration: one line per command, each command in its own module ---------------
# (each module defines `def command(...)`; import here and register with app.command(name))
from . import demo as _demo; app.command("demo")(_demo.command)  # noqa: E402, E702, I001
from . import train as _train; app.command("train")(_train.command)  # noqa: E402, E702, I001
from . import align as _align; app.command("align")(_align.command)  # noqa: E402, E702, I001
from . import merge as _merge; app.command("merge")(_merge.command)  # noqa: E402, E702, I001
from . import spec as _spec; app.command("spec")(_spec.command)  # noqa: E402, E702, I001
from . import paths as _paths; app.command("interpolate")(_paths.interpolate)  # noqa: E402, E702, I001
app.command("curve")(_paths.curve)  # noqa: E402
app.command("evaluate")(_paths.evaluate)  # noqa: E402


def main() -> None:
    """Console entry point: run the app; a ``ModeconnError`` becomes one line on stderr, exit 2."""
    from .._src.errors import ModeconnError

    try:
        app(standalone_mode=False)
    except ModeconnError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (typer.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - any click usage error lands here in non-standalone mode
        import click

        click_errors: tuple[type, ...] = (click.exceptions.ClickException,)
        try:  # typer >= 0.20 vendors its own copy of click
            from typer._click.exceptions import ClickException as _TyperClickException

            click_errors += (_TyperClickException,)
        except ImportError:
            pass
        if isinstance(e, click_errors):
            e.show()
            raise SystemExit(2) from None
        raise


if __name__ == "__main__":
    main()
