"""Console entry point of ``modeconn``: a Ctrl-C while the libraries load is one line, not a trace.

It lives outside the ``modeconn`` package because importing ``modeconn.cli.main`` first imports
``modeconn`` (and torch): a ``try`` inside the package could not catch an interrupt during that.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

_STARTING_UP = "interrupted: while starting up; nothing was done\n"


def _interrupted_while_starting(signum: int, frame: FrameType | None) -> None:
    # A KeyboardInterrupt raised inside numpy's or scipy's C-extension imports comes out as an
    # ImportError or RecursionError from a half-imported library, so it cannot be caught as one:
    # nothing has been done yet, so end the process here.
    os.write(2, _STARTING_UP.encode())
    os._exit(130)


def main() -> None:
    """Import the application, then run it (``modeconn.cli.main.main``); exit 130 on Ctrl-C."""
    previous = None
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not ignored (background)
        previous = signal.signal(signal.SIGINT, _interrupted_while_starting)
    try:
        from modeconn.cli.main import main as run
    except KeyboardInterrupt:  # raised before the handler above was installed
        print(_STARTING_UP, end="", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)  # the commands handle Ctrl-C themselves
    run()


if __name__ == "__main__":
    main()
