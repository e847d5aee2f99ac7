"""Optional dependencies: import a package of an extra, or say in one line how to install it."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import ModeconnError


class MissingExtraError(ModeconnError, ImportError):
    """A feature needs a package of an optional extra that is not installed (``pip install
    'modeconn[EXTRA]'``). It is also an ``ImportError``, so ``except ImportError`` catches it."""


def require(module: str, extra: str, *, feature: str | None = None) -> ModuleType:
    """Import ``module`` (a package of the ``extra`` extra) or raise :class:`MissingExtraError`.

    Every import of an extra's package in modeconn goes through here (or through a ``try`` whose
    ``except ImportError`` names ``modeconn[extra]``); ``tests/test_dependencies.py`` checks it.

    Args:
        module: the module to import, e.g. ``"ot"``.
        extra: the extra that provides it (``[project.optional-dependencies]``), e.g. ``"ot"``.
        feature: what needs it, for the message (default: ``module``).

    Returns:
        The imported module.

    Example:
        >>> require("json", "none").__name__
        'json'
        >>> try:
        ...     require("no_such_module_xyz", "ot", feature="exact OT")
        ... except MissingExtraError as e:
        ...     print(e)
        exact OT needs no_such_module_xyz, which is not installed: pip install 'modeconn[ot]'
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        if e.name is not None and e.name.split(".")[0] != top:
            raise  # the package is there but broken inside: its own error says more
        raise MissingExtraError(
            f"{feature or module} needs {top}, which is not installed: "
            f"pip install 'modeconn[{extra}]'"
        ) from None
