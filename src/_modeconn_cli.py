"""Console entry point of ``modeconn``: a Ctrl-C while the libraries load is one line, not a trace.

It lives outside the ``modeconn`` package because importing ``modeconn.cli.main`` first imports
``modeconn`` (and torch): a ``try`` inside the package could not catch an interrupt during that.
"""

from __future__ import annotations

import sys


def main() -> None:
    """Import the application, then run it (``modeconn.cli.main.main``); exit 130 on Ctrl-C."""
    try:
        from modeconn.cli.main import main as run
    except KeyboardInterrupt:
        print("interrupted: while starting up; nothing was done", file=sys.stderr)
        raise SystemExit(130) from None
    run()


if __name__ == "__main__":
    main()
