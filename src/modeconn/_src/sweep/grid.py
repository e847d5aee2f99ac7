"""The sweep grid file: a validated, frozen pydantic model and its expansion into cells."""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import ConfigError

NONE = "none"  # the alignment "method" that leaves B as it is (the naive baseline)
LINEAR = "linear"
# Columns every results row has; grid keys may not take these names.
RESERVED = frozenset({
    "cell", "config_hash", "seed_a", "seed_b", "align", "path", "loss_barrier", "error_barrier",
    "train_loss_barrier", "test_acc_mean", "test_acc_min", "test_loss_max", "a_test_loss",
    "a_test_accuracy", "b_test_loss", "b_test_accuracy", "time_align_s", "time_path_s",
    "time_cell_s", "artifact", "modeconn_version", "torch_version", "barrier_split",
})  # fmt: skip
_KEY_RE = re.compile(r"^(train\.)?[A-Za-z_][A-Za-z0-9_]*$")
# mc.train keywords a grid may not set: the sweep supplies them.
_TRAIN_FIXED = ("model", "data", "seed", "device", "test_data", "progress")


def digest(obj: Any, n: int = 16) -> str:
    """A stable content hash of JSON-able ``obj`` (sorted keys), ``n`` hex digits.

    Example:
        >>> digest({"b": 1, "a": [2]}) == digest({"a": [2], "b": 1})
        True
    """
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def train_options() -> list[str]:
    """Keywords of ``mc.train`` a grid's ``train:`` section (or a ``train.KEY`` grid key) may set.

    Read from ``mc.train``'s signature, so new training options work in grids without changes
    here.

    Example:
        >>> {"epochs", "lr"} <= set(train_options())
        True
    """
    from ..train import train

    params = inspect.signature(train).parameters
    return [
        k
        for k, p in params.items()
        if k not in _TRAIN_FIXED and p.kind is inspect.Parameter.KEYWORD_ONLY
    ]


class CurveOptions(BaseModel):
    """Settings of the curves fitted for ``paths: [bezier | polychain]`` (``mc.fit_curve``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    epochs: int = Field(default=20, ge=1)
    bends: int = Field(default=1, ge=1)
    lr: float = Field(default=0.05, gt=0)


class Grid(BaseModel):
    """A sweep: every combination of ``grid`` values times every seed pair is one cell.

    Attributes:
        data: data source (``mnist1d``, ``digits``, an ``.npz`` path; an import path only when
            the user names it, see :func:`check_grid`).
        data_args: keywords of ``mc.data.load``.
        model: zoo model name (an import path only when the user names it).
        model_args: model options shared by all cells.
        grid: ``{key: [values]}``; a key is a model option, or a training option (a name of
            :func:`train_options`, or ``train.KEY``).
        seeds: endpoint seed pairs ``[[a, b], ...]`` (initialisation and data order).
        train: ``mc.train`` options shared by all cells.
        align: alignment methods (``none`` = unaligned, or any ``mc.aligner_names()``).
        paths: path kinds: ``linear``, ``bezier``, ``polychain``.
        merge: merge methods (``mc.merge_methods()``) applied to A and each aligned B.
        points: evaluation points along each path.
        curve: curve-fitting settings.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    data: str
    data_args: dict[str, Any] = Field(default_factory=dict)
    model: str
    model_args: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    seeds: list[tuple[int, int]] = Field(min_length=1)
    train: dict[str, Any] = Field(default_factory=dict)
    align: list[str] = Field(default_factory=lambda: [NONE], min_length=1)
    paths: list[str] = Field(default_factory=lambda: [LINEAR], min_length=1)
    merge: list[str] = Field(default_factory=list)
    points: int = Field(default=25, ge=2)
    curve: CurveOptions = Field(default_factory=lambda: CurveOptions())

    @field_validator("grid")
    @classmethod
    def _keys(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in v.items():
            if not _KEY_RE.match(key):
                raise ValueError(f"grid key {key!r} must be a name like width or train.lr")
            if column(key) in RESERVED:
                raise ValueError(f"grid key {key!r} clashes with the results column of that name")
            if not values:
                raise ValueError(f"grid key {key!r} has no values")
            if len({json.dumps(x, sort_keys=True) for x in values}) != len(values):
                raise ValueError(f"grid key {key!r} repeats a value")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[tuple[int, int]]) -> list[tuple[int, int]]:
        for a, b in v:
            if a == b:
                raise ValueError(f"seed pair [{a}, {b}] trains the same model twice; use two seeds")
        if len(set(v)) != len(v):
            raise ValueError("a seed pair is listed twice")
        return v

    @field_validator("align", "paths", "merge")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"{v} lists a name twice")
        return v

    def cells(self) -> list[Cell]:
        """Every cell, in grid order (keys as written, values as listed, then seed pairs)."""
        keys = list(self.grid)
        out = []
        for values in itertools.product(*(self.grid[k] for k in keys)):
            point = dict(zip(keys, values, strict=True))
            for pair in self.seeds:
                out.append(Cell.make(self, point, (int(pair[0]), int(pair[1]))))
        return out

    def is_train_key(self, key: str) -> bool:
        """Whether grid key ``key`` sets a training option (else a model option)."""
        return key.startswith("train.") or key in train_options()


def column(key: str) -> str:
    """The results column of a grid key (``train.lr`` -> ``train_lr``)."""
    return key.replace(".", "_")


@dataclass(frozen=True)
class Cell:
    """One grid point and one seed pair: the unit of work (and of resumption).

    Attributes:
        point: ``{grid key: value}``.
        seeds: ``(seed_a, seed_b)``.
        model_args: the model's options (shared ones updated by the point's model keys).
        train: the training options (shared ones updated by the point's training keys).
        id: content hash of everything that determines the cell's rows.
    """

    point: Mapping[str, Any]
    seeds: tuple[int, int]
    model_args: Mapping[str, Any]
    train: Mapping[str, Any]
    id: str

    @classmethod
    def make(cls, grid: Grid, point: Mapping[str, Any], seeds: tuple[int, int]) -> Cell:
        model_args, train = dict(grid.model_args), dict(grid.train)
        for key, value in point.items():
            if grid.is_train_key(key):
                train[key.removeprefix("train.")] = value
            else:
                model_args[key] = value
        config = {
            **grid.model_dump(exclude={"grid", "seeds", "model_args", "train"}),
            "model_args": model_args,
            "train": train,
            "seeds": list(seeds),
        }
        return cls(dict(point), seeds, model_args, train, digest(config))

    def endpoint(self, grid: Grid, which: int) -> dict[str, Any]:
        """What determines endpoint ``which`` (0: A, 1: B): its content-addressed store entry."""
        return {
            "model": grid.model,
            "model_args": dict(self.model_args),
            "data": grid.data,
            "data_args": dict(grid.data_args),
            "train": dict(self.train),
            "seed": self.seeds[which],
        }

    def label(self) -> str:
        """``width=16 seeds=0,1``: for progress lines and error messages."""
        parts = [f"{k}={v}" for k, v in self.point.items()]
        return " ".join([*parts, f"seeds={self.seeds[0]},{self.seeds[1]}"])


def _one_line(e: ValidationError, where: str) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or "grid"
    msg = str(err["msg"]).removeprefix("Value error, ")
    extra = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return f"{where}: {loc}: {msg}{extra}"


def load_grid(grid: Grid | Mapping[str, Any] | str | os.PathLike[str]) -> Grid:
    """Read and validate a grid: a :class:`Grid`, a dict, or a YAML file (``yaml.safe_load``).

    Raises :class:`ConfigError` (one line naming the field) for a malformed grid.

    Example:
        >>> g = load_grid({"data": "digits", "model": "mlp", "seeds": [[0, 1]],
        ...                "grid": {"width": [8, 16]}})
        >>> len(g.cells()), g.cells()[0].model_args
        (2, {'width': 8})
    """
    if isinstance(grid, Grid):
        return grid
    where = "grid"
    if not isinstance(grid, Mapping):
        import yaml

        where = str(grid)
        try:
            text = Path(grid).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read grid file {where!r}: {e.strerror or e}") from None
        try:
            grid = yaml.safe_load(text)
        except yaml.YAMLError as e:
            first = " ".join(str(e).split())
            raise ConfigError(f"{where}: not valid YAML: {first}") from None
        if not isinstance(grid, Mapping):
            raise ConfigError(
                f"{where}: a grid file is a YAML mapping (data:, model:, seeds:, ...)"
            )
    try:
        return Grid.model_validate(dict(grid))
    except ValidationError as e:
        raise ConfigError(_one_line(e, where)) from None


def _names(what: str, given: Iterable[str], known: Iterable[str]) -> None:
    known = list(known)
    for name in given:
        if name not in known:
            raise ConfigError(f"grid: unknown {what} {name!r}; choose from {', '.join(known)}")


def check_grid(grid: Grid, allow_code: Iterable[str] = ()) -> Any:
    """Check a grid against the registries and the data before any work; returns the data.

    Models come from the zoo; a ``package.module:function`` model or data source is used only
    when the user allows it in ``allow_code`` (on the command line: ``--allow-code``), the
    rule checkpoints follow: modeconn never runs code named inside a file. Every distinct model
    configuration is built once and every training configuration is checked by ``mc.train``
    (zero epochs on two examples).

    Args:
        grid: from :func:`load_grid`.
        allow_code: import paths the user allowed.

    Returns:
        The loaded ``mc.data.Splits``.

    Example:
        >>> g = load_grid({"data": "digits", "model": "mlp", "seeds": [[0, 1]]})
        >>> check_grid(g).input_shape
        (1, 8, 8)
    """
    from ... import models
    from ..align import aligner_names
    from ..merge import merge_methods
    from ..paths.curves import COEFFICIENTS
    from ..train import train
    from ..trust import is_import_path, refuse_code
    from .store import build_model, load_data

    refuse_code("grid", {"model": grid.model, "data": grid.data}, allow_code)
    if not is_import_path(grid.model):
        _names("model", [grid.model], models.names())
    _names("alignment method", grid.align, [NONE, *aligner_names()])
    _names("path kind", grid.paths, [LINEAR, *sorted(COEFFICIENTS)])
    _names("merge method", grid.merge, merge_methods())
    allowed = train_options()
    for key in [
        *grid.train,
        *(k.removeprefix("train.") for k in grid.grid if grid.is_train_key(k)),
    ]:
        if key not in allowed:
            raise ConfigError(f"grid: unknown training option {key!r}; choose from {allowed}")
    splits = load_data(grid.data, grid.data_args)
    built: dict[str, Any] = {}
    checked: set[str] = set()
    x, y = splits.tensors("train")
    for cell in grid.cells():
        spec = cell.endpoint(grid, 0)
        try:
            mkey = digest(spec["model_args"])
            if mkey not in built:
                built[mkey] = build_model(spec, splits)
            tkey = digest(spec["train"])
            if tkey not in checked:
                checked.add(tkey)
                opts = {**spec["train"], "epochs": 0}
                train(built[mkey], (x[:2], y[:2]), progress=False, **opts)
        except (ConfigError, TypeError, ValueError) as e:
            msg = " ".join(str(e).split())
            raise ConfigError(f"grid: cell {cell.label()}: {msg}") from None
    return splits
