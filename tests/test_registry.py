"""The shared Registry helper: register/get/names, one clear error, and its four users."""

from __future__ import annotations

import pytest

import modeconn as mc
from modeconn._src.errors import ConfigError
from modeconn._src.registry import Registry


def test_register_get_names_order_and_errors() -> None:
    reg: Registry[int] = Registry("widget")
    assert reg.register("b", 2) == 2
    reg.register("a", 1)
    reg.register("a", 1)  # the same object again: a no-op
    assert reg.names() == ["b", "a"] and reg.get("a") == 1 and "a" in reg and len(reg) == 2
    with pytest.raises(ConfigError, match=r"^unknown widget 'c'; choose one of: b, a$"):
        reg.get("c")
    with pytest.raises(ConfigError, match="already registered"):
        reg.register("a", 3)
    with pytest.raises(ConfigError, match="invalid"):
        reg.register("Bad Name", 4)
    with pytest.raises(ConfigError, match="already registered"):
        reg.check_free("b")


def test_loader_runs_once_before_first_lookup() -> None:
    calls = []
    reg: Registry[str] = Registry("thing", loader=lambda: calls.append(reg.register("x", "X")))
    assert calls == []
    assert reg.names() == ["x"] and reg.get("x") == "X" and calls == ["X"]


def test_every_registry_uses_the_helper() -> None:
    from modeconn._src.align.api import ALIGNERS
    from modeconn._src.merge.base import _REGISTRY as MERGES
    from modeconn._src.paths.base import REGISTRY as KINDS
    from modeconn.models import _REGISTRY as MODELS

    for reg in (ALIGNERS, MERGES, KINDS, MODELS):
        assert isinstance(reg, Registry)
        with pytest.raises(ConfigError, match="choose one of"):
            reg.get("no_such_thing")
    assert {"linear", "bezier", "polychain"} <= set(KINDS.names())
    assert set(mc.models.names()) == set(MODELS.names())
