"""Shared test fixtures: data splits, a session cache of small trained models, the CLI runner."""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pytest
import torch
from torch import nn

import modeconn as mc

# One intra-op thread: the test models are tiny, and on a shared 2-core machine OpenMP threads
# spin-waiting for each other made training ~13x slower than a single thread (measured).
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Generated data and demo checkpoints go to a per-session folder, not ~/.cache."""
    old = os.environ.get("MODECONN_CACHE")
    os.environ["MODECONN_CACHE"] = str(tmp_path_factory.mktemp("modeconn-cache"))
    yield
    if old is None:
        os.environ.pop("MODECONN_CACHE", None)
    else:
        os.environ["MODECONN_CACHE"] = old


@pytest.fixture(scope="session")
def mnist1d_splits(_isolated_cache: None) -> mc.data.Splits:
    """MNIST-1D, the package's default 5000 samples (4000 train, 1000 test), input (40,)."""
    return mc.data.load("mnist1d")


@pytest.fixture(scope="session")
def digits_splits() -> mc.data.Splits:
    """scikit-learn digits as (1, 8, 8) images: 1347 train, 450 test."""
    return mc.data.load("digits")


TrainedFactory = Callable[..., nn.Module]


@pytest.fixture(scope="session")
def trained(mnist1d_splits: mc.data.Splits, digits_splits: mc.data.Splits) -> TrainedFactory:
    """``trained(model_name, data_name="mnist1d", seed=0, epochs=10, **model_kwargs)``.

    Returns a (fresh copy of a) zoo model trained with ``mc.train`` defaults apart from
    ``epochs``; both the initialisation and the shuffling use ``seed``. Results are cached for
    the session by the arguments, so tests sharing a configuration pay for it once.
    """
    splits = {"mnist1d": mnist1d_splits, "digits": digits_splits}
    cache: dict[Any, nn.Module] = {}

    def make(
        model_name: str,
        data_name: str = "mnist1d",
        seed: int = 0,
        epochs: int = 10,
        **model_kwargs: Any,
    ) -> nn.Module:
        key = (model_name, data_name, seed, epochs, tuple(sorted(model_kwargs.items())))
        if key not in cache:
            s = splits[data_name]
            model = mc.models.create(
                model_name,
                input_shape=s.input_shape,
                num_classes=s.num_classes,
                seed=seed,
                **model_kwargs,
            )
            cache[key] = mc.train(model, s, epochs=epochs, seed=seed, progress=False).model
        return copy.deepcopy(cache[key])

    return make


class CliResult(NamedTuple):
    """What one ``modeconn ...`` invocation gave: exit code, stdout, stderr."""

    code: int
    out: str
    err: str


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """``run_cli(*args) -> CliResult(code, out, err)``: the console entry point, in-process.

    Arguments are converted with ``str`` (paths welcome); what the command printed is captured
    (and consumed) per call.
    """
    from modeconn.cli.main import main

    def run(*args: object) -> CliResult:
        capsys.readouterr()  # drop anything printed before this call
        monkeypatch.setattr(sys, "argv", ["modeconn", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run
