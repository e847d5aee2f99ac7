"""A progress bar that can be switched off: ``with progress_bar(on, total=n) as advance: ...``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


def _no_advance(text: str | None = None) -> None:
    """The ``advance`` of a bar that is not drawn."""

@contextlib.contextmanager
def progress_bar(
    enabled: bool, *, total: int, description: str = "working", eta: bool = False
) -> Iterator[Callable[[str | None], None]]:
    """Yield ``advance(text=None)``: one step forward (and an optional new description).

    With ``enabled=False``, or when stderr is not a terminal (a log file, a pipe, a test), nothing
    is drawn and ``advance`` does nothing. The bar is drawn on stderr by rich and removed when
    the block ends.

    Args:
        enabled: draw the bar.
        total: number of steps.
        description: label shown beside the bar.
        eta: also show the estimated time remaining.

    Returns:
        A context manager yielding ``advance``.

    Example:
        >>> with progress_bar(False, total=3) as advance:
        ...     for _ in range(3):
        ...         advance(None)
    """
    if not enabled:
        yield _no_advance
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    if not console.is_terminal:  # rich would only leave a stray blank line behind
        yield _no_advance
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn()]  # fmt: skip
    if eta:
        columns += [TextColumn("eta"), TimeRemainingColumn()]
    with Progress(
        *columns,
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=total)

        def advance(text: str | None = None) -> None:
            # rich keeps the current description when given None.
            bar.update(task, advance=1, description=f"{description}: {text}" if text else None)

        yield advance
