"""YAML merge recipes: a validated description of a merge (models, method, align, out) and its run.

Example recipe::

    models:
      - path: a.safetensors
        weight: 1.0
      - b.safetensors            # a bare path: weight unset
    method: ties
    parameters: {density: 0.2, scale: 1.0}
    base: pretrained.safetensors
    align: null                  # or "weight", or {method: activation, options: {...}}
    data: mnist1d                # train split: Fisher/RegMean/soup/alignment/BN; test: the table
    reset_bn: false
    out: merged.safetensors

Relative paths are taken relative to the recipe file. A recipe is data: its ``model:`` and
``data:`` may name zoo models and built-in sources; a ``package.module:function`` there is refused
unless the user allows it (``from_yaml(..., allow_code=[...])``, ``merge --allow-code``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import ConfigError
from ..trust import refuse_code
from .base import _one_line, get_method


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelEntry(_Frozen):
    """One input model: a checkpoint path and an optional merge weight."""

    path: str = Field(min_length=1)
    weight: float | None = None


class AlignStep(_Frozen):
    """The alignment before merging: an aligner name and its keyword options."""

    method: str = Field(min_length=1)
    options: dict[str, Any] = Field(default_factory=dict)


class MergeRecipe(_Frozen):
    """A merge, as validated data (pydantic, frozen, unknown keys refused).

    Attributes:
        models: the input checkpoints (``path`` and optional ``weight``; a bare string is a path).
        method: a registered merge method (see ``mc.merge_methods()``).
        parameters: the method's parameters (validated against the method's parameter model).
        base: the pretrained checkpoint for task-vector methods.
        model: a zoo name or ``pkg.mod:fn`` for checkpoints that do not record their model.
        model_kwargs: options for ``model``.
        align: alignment step (an aligner name or ``{method, options}``), or ``None``.
        reset_bn: recompute BatchNorm statistics of the merged model on the training split.
        repair: REPAIR the merged model (two models).
        data: a data source for ``mc.data.load`` (train split for merging, test for evaluation).
        out: where to write the merged checkpoint (``None``: not written).
        device: where to compute.

    Example:
        >>> r = MergeRecipe(models=["a.safetensors", "b.safetensors"], method="average")
        >>> [m.path for m in r.models], r.weights()
        (['a.safetensors', 'b.safetensors'], None)
    """

    models: list[ModelEntry] = Field(min_length=1)
    method: str = "average"
    parameters: dict[str, Any] = Field(default_factory=dict)
    base: str | None = None
    model: str | None = None
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    align: AlignStep | None = None
    reset_bn: bool = False
    repair: bool = False
    data: str | None = None
    out: str | None = None
    device: str | None = None

    @field_validator("models", mode="before")
    @classmethod
    def _bare_paths(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"path": x} if isinstance(x, str | os.PathLike) else x for x in v]
        return v

    @field_validator("align", mode="before")
    @classmethod
    def _bare_align(cls, v: Any) -> Any:
        return {"method": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check_method(self) -> MergeRecipe:
        m = get_method(self.method)  # unknown name: ConfigError listing the methods
        m.parameters(**self.parameters)
        given = [e.weight is not None for e in self.models]
        if any(given) and not all(given):
            raise ConfigError("give a weight for every model or for none")
        if any(given) and not m.weighted:
            raise ConfigError(f"method {m.name!r} takes no weights; remove the models' weight")
        m.check_count(len(self.models))
        if m.needs_base and self.base is None:
            raise ConfigError(f"method {m.name!r} merges task vectors: the recipe needs base:")
        if self.base is not None and not m.needs_base:
            raise ConfigError(f"method {m.name!r} does not use base:; remove it")
        if (m.needs_data or self.reset_bn or self.repair) and self.data is None:
            what = f"method {m.name!r}" if m.needs_data else "reset_bn/repair"
            raise ConfigError(f"{what} needs data: (a source such as mnist1d)")
        return self

    def weights(self) -> list[float] | None:
        """The models' weights, or ``None`` when none were given."""
        ws = [e.weight for e in self.models]
        return None if any(w is None for w in ws) else [float(w) for w in ws]  # type: ignore[arg-type]

    @classmethod
    def validate_dict(cls, obj: Any, where: str = "recipe") -> MergeRecipe:
        """Validate a mapping; any problem is one ConfigError line prefixed by ``where``."""
        if not isinstance(obj, dict):
            raise ConfigError(
                f"{where}: expected a mapping of recipe keys, got {type(obj).__name__}"
            )
        try:
            return cls(**obj)
        except ValidationError as e:
            raise ConfigError(f"{where}: {_one_line(e)}") from None
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    @classmethod
    def from_yaml(
        cls, path: str | os.PathLike[str], *, allow_code: Iterable[str] = ()
    ) -> MergeRecipe:
        """Load a recipe with ``yaml.safe_load``; relative paths are resolved against its folder.

        A ``model:`` or ``data:`` naming ``package.module:function`` (code that building it would
        import and call) is refused with one :class:`ConfigError` line unless it is listed in
        ``allow_code``: recipes are shared files, and no file modeconn reads runs code.

        Args:
            path: the YAML file.
            allow_code: the import paths this recipe may name (the user's explicit consent).

        Returns:
            The validated recipe.

        Example:
            >>> MergeRecipe.from_yaml("recipe.yaml")  # doctest: +SKIP
        """
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe {str(p)!r} does not exist")
        try:
            obj = yaml.safe_load(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(
                f"recipe {str(p)!r} is not a text file (binary data); give a YAML recipe"
            ) from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" (line {mark.line + 1})" if mark is not None else ""
            raise ConfigError(f"recipe {str(p)!r} is not valid YAML{at}") from None
        recipe = cls.validate_dict(obj, f"recipe {str(p)!r}")
        refuse_code(f"recipe {str(p)!r}", {"model": recipe.model, "data": recipe.data}, allow_code)
        return recipe.relative_to(p.parent)

    def relative_to(self, folder: str | os.PathLike[str]) -> MergeRecipe:
        """A copy with relative paths (models, base, out, an ``.npz`` data) under ``folder``."""
        root = Path(folder)

        def fix(x: str | None) -> str | None:
            return x if x is None or Path(x).is_absolute() else str(root / x)

        data = self.data
        if data is not None and data.endswith(".npz"):
            data = fix(data)
        return self.model_copy(update={
            "models": [e.model_copy(update={"path": fix(e.path)}) for e in self.models],
            "base": fix(self.base), "out": fix(self.out), "data": data,
        })


@dataclass
class MergeRun:
    """What :func:`run_recipe` produced: the merged state, the model, and the evaluation rows."""

    state: dict[str, Any]
    model: Any
    rows: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    out: str | None = None


def run_recipe(recipe: MergeRecipe, *, progress: bool = False, write: bool = True) -> MergeRun:
    """Load the recipe's checkpoints and data, merge, evaluate, and write ``out`` atomically.

    The data source's train split feeds the data-dependent steps (Fisher, RegMean, greedy-soup
    selection, activation alignment, BN reset); the test split gives the table: loss and
    accuracy of every input (and the base) next to the merged model's.

    Args:
        recipe: a validated :class:`MergeRecipe`.
        progress: draw progress bars.
        write: write ``recipe.out`` (when set).

    Returns:
        :class:`MergeRun`.

    Example:
        >>> run = run_recipe(MergeRecipe.from_yaml("recipe.yaml"))  # doctest: +SKIP
    """
    from ... import data as data_mod
    from ..evaluation import evaluate
    from ..io import load_checkpoint, save_checkpoint
    from ..validate import check_data_fits
    from .api import merge

    _check_out_not_input(recipe)
    cks = [load_checkpoint(e.path) for e in recipe.models]
    base_ck = load_checkpoint(recipe.base) if recipe.base else None
    model = cks[0].build(recipe.model, **recipe.model_kwargs)
    splits = data_mod.load(recipe.data) if recipe.data else None
    if splits is not None:
        check_data_fits(model, splits)  # data of the wrong shape: one line before any merging
    train = splits.train if splits is not None else None
    merged = merge(
        [ck.state for ck in cks],
        method=recipe.method,
        weights=recipe.weights(),
        base=base_ck.state if base_ck else None,
        # a model folder's state omits tied copies its model has: pass the model only when used
        model=model if not cks[0].folder or recipe.align or recipe.reset_bn or recipe.repair
        or get_method(recipe.method).needs_data else None,
        data=train,
        align=recipe.align.method if recipe.align else None,
        align_options=recipe.align.options if recipe.align else None,
        reset_bn=recipe.reset_bn,
        repair=recipe.repair,
        device=recipe.device,
        progress=progress,
        **recipe.parameters,
    )
    rows: list[dict[str, Any]] = []
    if splits is not None:
        named = [(e.path, ck.state) for e, ck in zip(recipe.models, cks, strict=True)]
        if base_ck is not None:
            named.append((f"{recipe.base} (base)", base_ck.state))
        named.append(("merged", merged))
        for name, st in named:
            met = evaluate(model, splits.test, state=st, device=recipe.device)
            rows.append({"model": name, "loss": met.loss, "accuracy": met.accuracy})
    meta: dict[str, Any] = {"merge": {**merged.info, "recipe": recipe.model_dump()}}
    recorded = cks[0].meta.get("model")
    if recipe.model is not None:
        meta["model"] = {"name": recipe.model, "kwargs": recipe.model_kwargs}
    elif recorded is not None:
        meta["model"] = recorded
    if write and recipe.out and cks[0].folder:  # a model folder in, a model folder out
        from ..hf import save_model_folder

        save_model_folder(recipe.out, merged, like=cks[0].path)
    elif write and recipe.out:
        save_checkpoint(recipe.out, dict(merged), meta=meta)
    return MergeRun(dict(merged), model, rows, merged.info, recipe.out if write else None)


def _check_out_not_input(recipe: MergeRecipe) -> None:
    """``out`` must not be one of the inputs (the merge would overwrite a model it reads)."""
    if not recipe.out:
        return
    out = os.path.realpath(recipe.out)
    for src in [e.path for e in recipe.models] + ([recipe.base] if recipe.base else []):
        if os.path.realpath(src) == out:
            raise ConfigError(
                f"out {recipe.out!r} is also an input; write the merge to another file "
                "(the input is left unchanged)"
            )
