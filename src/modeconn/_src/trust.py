"""Code named inside files: a ``package.module:function`` read from a file runs only if allowed.

modeconn's rule: no file it reads (merge recipes, specs, grids, checkpoint metadata) can make it
import and call code. Files name models and data from the zoo and the built-in sources only; a
``package.module:function`` is used when the user names it on the command line (``--model``,
``--data``, ``--allow-code``) or passes it in Python.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from .errors import ConfigError

_IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def is_import_path(value: object) -> bool:
    """Whether ``value`` is a ``"package.module:function"`` string (which resolving would import).

    Example:
        >>> is_import_path("os:system"), is_import_path("mlp"), is_import_path("C:/data.npz")
        (True, False, False)
    """
    return isinstance(value, str) and _IMPORT_PATH.fullmatch(value.strip()) is not None


def refuse_code(where: str, named: Mapping[str, object], allowed: Iterable[str] = ()) -> None:
    """Raise one :class:`ConfigError` line if a field read from a file names code not allowed.

    Args:
        where: the file, for the message (``"recipe 'r.yaml'"``).
        named: ``{field: value}`` of the fields that resolve models or data.
        allowed: the import paths the user allowed explicitly (``--allow-code``).

    Example:
        >>> refuse_code("recipe 'r.yaml'", {"model": "mlp", "data": "digits"})
        >>> refuse_code("recipe 'r.yaml'", {"model": "pkg.mod:fn"}, allowed=["pkg.mod:fn"])
        >>> try:
        ...     refuse_code("recipe 'r.yaml'", {"model": "os:system"})
        ... except ConfigError as e:
        ...     print(e)  # doctest: +ELLIPSIS
        recipe 'r.yaml' names code to run (model: os:system); ... pass --allow-code os:system ...
    """
    ok = {a.strip() for a in allowed}
    for key, value in named.items():
        if is_import_path(value) and str(value).strip() not in ok:
            raise ConfigError(
                f"{where} names code to run ({key}: {value}); modeconn does not run code named "
                f"in a file: if you trust it, pass --allow-code {value} (in Python: "
                f"allow_code=[{str(value)!r}])"
            )
