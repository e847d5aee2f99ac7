"""``modeconn merge`` for per-tensor methods: streamed file to file (``mc.merge_files``).

Used when the method is data-free and per tensor and nothing needs the models in memory (no
``--align``, ``--reset-bn``, ``--repair``, ``--config``): the inputs are read lazily and the
output written incrementally, so models larger than memory merge. Model folders in give a model
folder out. With a data source the inputs and the result are evaluated afterwards, one at a
time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import modeconn as mc

from .common import (
    check_finite_losses,
    check_outputs,
    console,
    load_model_arg,
    print_table,
    write_json,
)


def streams(method: str, models: list[Path], out: Path, *, align: Any, reset_bn: bool,
            repair: bool) -> bool:
    """True when ``modeconn merge`` streams: a per-tensor method, no in-memory step, and a
    safetensors (or folder) output; else the in-memory path runs."""
    if align or reset_bn or repair or method not in mc.streaming_methods():
        return False
    return is_folder(models[0]) or out.suffix.lower() == ".safetensors"


def is_folder(path: Path | str | None) -> bool:
    """True for a model folder given as a checkpoint."""
    return path is not None and Path(path).is_dir()


def check_out(
    out: Path, first_model: Path, suffixes: tuple[str, ...], *, inputs: Any = (),
    json_path: Path | None = None, mkdir: bool = False,
) -> None:
    """A folder output for folder inputs, else a checkpoint file with one of ``suffixes``; then
    :func:`check_outputs` (output = input, missing folders, ...)."""
    outputs = {"--out": out, "--json": json_path}
    if is_folder(first_model):
        if out.suffix.lower() in suffixes:
            raise mc.ConfigError(
                f"the inputs are model folders, so --out {str(out)!r} must be a folder name "
                "(no file suffix); it will hold config.json and the sharded weights"
            )
        check_outputs(outputs, inputs=inputs, mkdir=mkdir, folders={"--out": ()})
    else:
        check_outputs(outputs, inputs=inputs, mkdir=mkdir, suffixes={"--out": suffixes})


def run(
    models: list[Path], out: Path, *, method: str, base: Path | None,
    weights: list[float] | None, params: dict[str, Any], data: str | None, model: str | None,
    model_args: dict[str, Any], device: str | None, json_path: Path | None, progress: bool,
) -> None:
    """Stream the merge to ``out``; then, with ``data``, print the test table."""
    splits = net = None
    if data is not None and not is_folder(models[0]):  # data that does not fit: before merging
        splits = mc.data.load(data)
        net = load_model_arg(models[0], model, model_args, device=device)
        mc.check_data_fits(net, splits)
    mc.merge_files(models, out, method=method, base=base, weights=weights, progress=progress,
                   meta={"data": data} if data else None, device=device, **params)
    rows: list[dict[str, Any]] = []
    if splits is not None and net is not None:
        named = [(str(p), p) for p in models]
        if base is not None:
            named.append((f"{base} (base)", base))
        named.append(("merged", out))
        for name, p in named:
            met = mc.evaluate(net, splits.test, state=dict(mc.load_checkpoint(p).state),
                              device=device)
            rows.append({"model": name, "loss": met.loss, "accuracy": met.accuracy})
        print_table(f"merge: {method} ({len(models)} models, streamed), test split",
                    ["model", "loss", "accuracy"],
                    [[r["model"], r["loss"], r["accuracy"]] for r in rows])
    console.print(f"saved {out}")
    if json_path is not None:
        info = {"method": method, "params": params, "weights": weights, "streamed": True,
                "base": str(base) if base else None, "models": [str(p) for p in models]}
        write_json(json_path, {"out": str(out), "info": info, "evaluation": rows})
    for r in rows:
        check_finite_losses(f"model {r['model']!r} on the test split", [r["loss"]])
