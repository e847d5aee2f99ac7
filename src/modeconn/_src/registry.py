"""One small typed registry of named things (zoo models, aligners, merge methods, path kinds).

How to register (one line per thing, explicit, in the module that owns the registry's users)::

    from modeconn._src.registry import Registry

    KINDS: Registry[type[Path]] = Registry("path kind")
    KINDS.register("autoneb", AutoNebChain)          # returns the item (usable as a decorator:
                                                      # @KINDS.decorator("autoneb"))
    KINDS.get("autoneb")                              # unknown name: ConfigError listing names
    KINDS.names()                                     # registration order

A name is taken once: registering another object under a taken name raises ``ConfigError``
(registering the very same object again is a no-op, so re-imports are harmless). A registry is
also a read-only ``Mapping`` (``name in reg``, ``reg[name]``, iteration in registration order).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Reference:
    """Where a registered method comes from: ``paper`` (authors, title), ``year`` and ``url``."""

    paper: str
    year: int
    url: str

    def __str__(self) -> str:
        return f"{self.paper} ({self.year}) {self.url}"


class Registry(Mapping[str, T], Generic[T]):
    """Named items of one kind: ``register(name, item)``, ``get(name)``, ``names()``.

    Args:
        what: what the items are, for messages (``"alignment method"``, ``"model"``).
        loader: called once before the first lookup or listing (lazy built-in registration,
            e.g. importing the modules that register the built-ins); ``None``: nothing.
        check_names: names must be lowercase identifiers (``[a-z][a-z0-9_]*``).

    Example:
        >>> reg: Registry[int] = Registry("number")
        >>> reg.register("one", 1)
        1
        >>> reg.get("one"), reg.names(), "two" in reg
        (1, ['one'], False)
        >>> reg.get("two")
        Traceback (most recent call last):
        ...
        modeconn._src.errors.ConfigError: unknown number 'two'; choose one of: one
    """

    def __init__(
        self,
        what: str,
        *,
        loader: Callable[[], None] | None = None,
        check_names: bool = True,
    ) -> None:
        self.what = what
        self._items: dict[str, T] = {}
        self._loader = loader
        self._loaded = loader is None
        self._check_names = check_names

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True  # set first: the loader registers through this registry
            assert self._loader is not None
            try:
                self._loader()
            except BaseException:
                self._loaded = False
                raise

    def check_free(self, name: str) -> None:
        """Raise ``ConfigError`` unless ``name`` is a valid name that holds nothing yet."""
        self._check_name(name)
        if name in self._items:
            raise ConfigError(f"{self.what} {name!r} is already registered; pick another name")

    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or (self._check_names and not _NAME_RE.match(name)):
            raise ConfigError(
                f"{self.what} name {name!r} is invalid: use a lowercase identifier like 'my_name'"
            )

    def register(self, name: str, item: T) -> T:
        """Add ``item`` under ``name`` and return it (the same item twice is a no-op).

        Raises:
            ConfigError: ``name`` is invalid or already holds another item.
        """
        self._check_name(name)
        old = self._items.get(name)
        if old is not None and old is not item:
            raise ConfigError(f"{self.what} {name!r} is already registered; pick another name")
        self._items[name] = item
        return item

    def decorator(self, name: str) -> Callable[[T], T]:
        """``@reg.decorator(name)``: register the decorated object under ``name``."""

        def deco(item: T) -> T:
            return self.register(name, item)

        return deco

    def get(self, name: str) -> T:  # type: ignore[override]  # Mapping.get's default: not wanted
        """The item registered as ``name``; an unknown name raises one ``ConfigError`` line."""
        self._load()
        if name not in self._items:
            known = ", ".join(self._items) or "(none registered)"
            raise ConfigError(f"unknown {self.what} {name!r}; choose one of: {known}")
        return self._items[name]

    def names(self) -> list[str]:
        """The registered names, in registration order."""
        self._load()
        return list(self._items)

    def __getitem__(self, name: str) -> T:
        self._load()
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(list(self._items))

    def __len__(self) -> int:
        self._load()
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}, names={list(self._items)})"
