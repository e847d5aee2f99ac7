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

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            raise SystemExit(2) from None
        raise


if __name__ == "__main__":
    main()
