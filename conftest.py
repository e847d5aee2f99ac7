"""Doctest set-up: docstring examples run with mc, torch and nn imported, in a temp folder."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import modeconn as mc


@pytest.fixture(autouse=True)
def _doctest_namespace(request, doctest_namespace, tmp_path, monkeypatch):
    if isinstance(request.node, pytest.DoctestItem):
        torch.manual_seed(0)
        monkeypatch.chdir(tmp_path)
        doctest_namespace.update(mc=mc, torch=torch, nn=nn)
