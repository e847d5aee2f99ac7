"""``modeconn merge``: merge checkpoints with any method (or a YAML recipe), compare the result."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from . import stream
from .common import (
    CHECKPOINT_SUFFIXES,
    DataOpt,
    DeviceOpt,
    JsonOpt,
    MkdirOpt,
    ModelArgsOpt,
    ModelOpt,
    ProgressOpt,
    check_finite_losses,
    console,
    parse_model_args,
    print_table,
    recorded_data,
    write_json,
)


def _params(items: list[str] | None) -> dict[str, Any]:
    """``--param density=0.2`` -> ``{"density": 0.2}`` (values read as YAML)."""
    return parse_model_args(items, option="--param", example="density=0.2")


def _weights(text: str | None) -> list[float] | None:
    from modeconn import ConfigError

    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(
            f"--weights {text!r} must be comma-separated numbers, e.g. 0.3,0.7"
        ) from None


def _recorded_data(path: Path) -> str | None:
    from modeconn import load_checkpoint

    return recorded_data(load_checkpoint(path).meta)


def command(
    models: Annotated[
        list[Path] | None, typer.Argument(help="Checkpoints to merge (A B [C ...]).")
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            "--method",
            help="average (default), soup, fisher, regmean, task_arithmetic, ties, dare, slerp.",
        ),
    ] = None,
    base: Annotated[
        Path | None,
        typer.Option("--base", help="Pretrained checkpoint (task_arithmetic, ties, dare)."),
    ] = None,
    data: DataOpt = None,
    align: Annotated[
        str | None,
        typer.Option("--align", help="Align the models first: weight, activation, ste, sinkhorn."),
    ] = None,
    param: Annotated[
        list[str] | None,
        typer.Option("--param", "-p", help="Method parameter KEY=VALUE, repeatable (density=0.2)."),
    ] = None,
    weights: Annotated[
        str | None, typer.Option("--weights", help="Per-model weights, comma-separated: 0.3,0.7.")
    ] = None,
    reset_bn: Annotated[
        bool, typer.Option("--reset-bn", help="Recompute BatchNorm statistics after merging.")
    ] = False,
    repair: Annotated[
        bool, typer.Option("--repair", help="REPAIR the merged model (two models).")
    ] = False,
    config: Annotated[
        Path | None, typer.Option("--config", help="A YAML merge recipe instead of the options.")
    ] = None,
    allow_code: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-code",
            help="Let the --config recipe name this 'package.module:function' (as model: or "
            "data:), repeatable. A recipe naming code is refused otherwise.",
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Merged checkpoint (.safetensors or .pt).")
    ] = None,
    model: ModelOpt = None,
    model_arg: ModelArgsOpt = None,
    device: DeviceOpt = None,
    json_path: JsonOpt = None,
    mkdir: MkdirOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Merge checkpoints into one and print each input's test loss/accuracy next to the merged one.

    The data's train split feeds Fisher, RegMean, the greedy soup's selection, activation
    alignment and the BN reset; the test split gives the table. Per-tensor methods (average,
    task_arithmetic, ties, dare, slerp, ...) without --align/--reset-bn/--repair are streamed
    tensor by tensor (mc.merge_files), so models larger than memory merge; Hugging Face model
    folders in give a model folder out.

    Example: `modeconn merge a.safetensors b.safetensors --method ties --base pre.safetensors
    --out m.safetensors`
    """
    from modeconn import ConfigError, MergeRecipe, merge_methods, run_recipe

    if config is not None:
        clashing = [name for name, v in (
            ("checkpoints", models), ("--method", method), ("--base", base), ("--align", align),
            ("--param", param), ("--weights", weights), ("--model", model),
            ("--model-arg", model_arg), ("--reset-bn", reset_bn), ("--repair", repair),
        ) if v]
        if clashing:
            raise ConfigError(
                f"--config already describes the merge; drop {', '.join(clashing)} "
                "(only --out, --data, --device and --json may override it)"
            )
        recipe = MergeRecipe.from_yaml(config, allow_code=allow_code or ())
        updates: dict[str, Any] = {}
        if out is not None:
            updates["out"] = str(out)
        if data is not None:
            updates["data"] = data
        if device is not None:
            updates["device"] = device
        if updates:
            recipe = MergeRecipe.validate_dict({**recipe.model_dump(), **updates}, "options")
    else:
        if not models:
            raise ConfigError("give the checkpoints to merge (modeconn merge A B ...) or --config")
        if len(models) < 2:
            raise ConfigError(
                f"give at least two checkpoints to merge, got only {str(models[0])!r}"
            )
        if allow_code:
            raise ConfigError(
                "--allow-code is for a --config recipe; on the command line, --model and --data "
                "may name 'package.module:function' directly"
            )
        if out is None:
            raise ConfigError("give --out merged.safetensors (where to write the merged model)")
        stream.check_out(out, models[0], CHECKPOINT_SUFFIXES, inputs=[*models, base], mkdir=mkdir)
        name = method or "average"
        if name not in merge_methods():  # one line listing the methods, before any work
            raise ConfigError(
                f"unknown merge method {name!r}; choose one of: {', '.join(merge_methods())}"
            )
        if data is None and not stream.is_folder(models[0]):
            data = _recorded_data(models[0])
        w = _weights(weights)
        if w is not None and len(w) != len(models):
            raise ConfigError(f"--weights has {len(w)} numbers for {len(models)} checkpoints")
        recipe = MergeRecipe.validate_dict({
            "models": [
                {"path": str(p), **({"weight": w[i]} if w else {})}
                for i, p in enumerate(models)
            ],
            "method": name,
            "parameters": _params(param),
            "base": str(base) if base else None,
            "model": model,
            "model_kwargs": parse_model_args(model_arg),
            "align": align,
            "reset_bn": reset_bn,
            "repair": repair,
            "data": data,
            "out": str(out),
            "device": device,
        }, "options")
    if recipe.out is None:
        raise ConfigError("the recipe has no out: and no --out was given")
    inputs = [Path(e.path) for e in recipe.models]
    stream.check_out(
        Path(recipe.out), inputs[0], CHECKPOINT_SUFFIXES, json_path=json_path, mkdir=mkdir,
        inputs=[*inputs, recipe.base, config, recipe.data],
    )
    if stream.streams(recipe.method, inputs, Path(recipe.out), align=recipe.align,
                      reset_bn=recipe.reset_bn, repair=recipe.repair):
        stream.run(inputs, Path(recipe.out), method=recipe.method,
                   base=Path(recipe.base) if recipe.base else None, weights=recipe.weights(),
                   params=recipe.parameters, data=recipe.data, model=recipe.model,
                   model_args=recipe.model_kwargs, device=recipe.device, json_path=json_path,
                   progress=progress)
        return

    run = run_recipe(recipe, progress=progress)
    if run.rows:
        print_table(
            f"merge: {recipe.method} ({len(recipe.models)} models"
            + (f", aligned by {recipe.align.method}" if recipe.align else "")
            + "), test split",
            ["model", "loss", "accuracy"],
            [[r["model"], r["loss"], r["accuracy"]] for r in run.rows],
        )
    console.print(f"saved {recipe.out}")
    if json_path is not None:
        write_json(json_path, {"out": recipe.out, "recipe": recipe.model_dump(), "info": run.info,
                               "evaluation": run.rows})
    for r in run.rows:
        check_finite_losses(f"model {r['model']!r} on the test split", [r["loss"]])
