"""Doctest set-up: docstring examples run with mc, torch and nn imported, in a temp folder."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

import modeconn as mc

# Docstring examples of an optional extra run only where the extra is installed (the test-torch
# venvs install fewer extras than `make test`).
collect_ignore = [
    path
    for module, path in (("ot", "src/modeconn/_src/align/ot.py"),)
    if importlib.util.find_spec(module) is None
]


@pytest.fixture(autouse=True)
def _doctest_namespace(request, doctest_namespace, tmp_path, monkeypatch):
    if isinstance(request.node, pytest.DoctestItem):
        torch.manual_seed(0)
        monkeypatch.chdir(tmp_path)
        doctest_namespace.update(mc=mc, torch=torch, nn=nn)
