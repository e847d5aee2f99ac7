"""``modeconn spec``: infer and print a model's permutation symmetry (groups, sizes, tensors)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .common import (
    JsonOpt,
    MkdirOpt,
    ModelArgsOpt,
    ModelOpt,
    check_outputs,
    console,
    parse_model_args,
    recorded_data,
    write_json,
)


def _input_shape(net: Any, given: str | None) -> list[int]:
    """``--input-shape``, else the ``input_shape`` the model records, else the recorded data's."""
    import yaml

    from modeconn import ConfigError

    if given:
        try:
            shape = yaml.safe_load(given)
        except yaml.YAMLError:
            shape = None
        if isinstance(shape, int):
            shape = [shape]
        if not isinstance(shape, list) or not all(isinstance(s, int) and s > 0 for s in shape):
            raise ConfigError(f"--input-shape {given!r} must look like 40 or [1,8,8]")
        return shape
    cfg = getattr(net, "modeconn_config", None) or {}
    shape = (cfg.get("kwargs") or {}).get("input_shape")
    if shape:
        return [int(s) for s in shape]
    data = recorded_data(getattr(net, "modeconn_meta", None))
    if data is not None:
        from modeconn import data as _data

        return list(_data.load(data).input_shape)
    raise ConfigError(
        "cannot tell the model's input shape; pass --input-shape, e.g. --input-shape '[1,8,8]'"
    )


def command(
    source: Annotated[
        str, typer.Argument(help="A checkpoint path, or a zoo model name with --zoo.")
    ],
    zoo: Annotated[
        bool, typer.Option("--zoo", help="SOURCE is a zoo model name (random weights).")
    ] = False,
    input_shape: Annotated[
        str | None,
        typer.Option(
            "--input-shape", help="One example's shape, e.g. 40 or '[1,8,8]' (default: recorded)."
        ),
    ] = None,
    sites: Annotated[
        bool, typer.Option("--sites/--no-sites", help="Also list each group's activation sites.")
    ] = False,
    model: ModelOpt = None,
    model_arg: ModelArgsOpt = None,
    json_path: JsonOpt = None,
    mkdir: MkdirOpt = False,
) -> None:
    """Infer the permutation spec of a model and print its groups (`--json` writes the spec).

    Example: `modeconn spec resnet --zoo --input-shape '[1,8,8]'`.
    """
    import torch

    import modeconn as mc
    import modeconn.models  # noqa: F401  (mc.models)
    from modeconn import CheckpointError

    check_outputs({"--json": json_path}, inputs=[] if zoo else [source], mkdir=mkdir)
    kwargs = parse_model_args(model_arg)
    if zoo:
        shape = _input_shape(None, input_shape) if input_shape else None
        if shape is not None:
            kwargs.setdefault("input_shape", shape)
        mc.check_model_size(lambda: mc.models.create(source, seed=0, **kwargs), name=source)
        net = mc.models.create(source, seed=0, **kwargs)
    else:
        if not Path(source).exists():
            raise CheckpointError(
                f"checkpoint {source!r} not found (for a zoo model, add --zoo: "
                f"modeconn spec {source} --zoo)"
            )
        net = mc.load_model(source, model, kwargs)
    shape = _input_shape(net, input_shape)
    p = next(iter(net.parameters()), None)
    x = torch.randn(2, *shape, device=p.device if p is not None else None)
    spec = mc.infer_spec(net, x)
    console.print(spec.table())
    if sites:
        for g, ss in spec.sites.items():
            console.print(f"  {g}: " + ", ".join(f"{s.node}[{s.axis}]" for s in ss))
    if json_path is not None:
        write_json(json_path, spec.to_dict())
        console.print(f"spec written to {json_path}")
