"""``modeconn align``: permute B's hidden units onto A's, save it, show the barrier it removes."""

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
    SeedOpt,
    check_finite_losses,
    console,
    load_data_arg,
    load_model_arg,
    load_spec_arg,
    print_table,
    write_json,
)


def _barriers(model_a: Any, sa: Any, sb: Any, splits: Any, points: int, device: Any) -> dict:
    """Loss/error barrier of the linear path between two states on the test split."""
    import modeconn as mc

    ev = mc.evaluate_path(
        model_a,
        mc.LinearPath(sa, sb),
        {"test": splits.test},
        ts=points,
        bn_data=splits.train,
        device=device,
        progress=False,
    )
    return {
        "loss_barrier": float(ev.barrier("loss")),
        "error_barrier": float(ev.barrier("error")),
        "barrier_split": "test",
        "loss": [float(v) for v in ev.loss],
        "accuracy": [float(v) for v in ev.accuracy],
        "ts": [float(t) for t in ev.ts],
    }


def command(
    model_a: Annotated[Path, typer.Argument(help="Reference checkpoint A.")],
    model_b: Annotated[Path, typer.Argument(help="Checkpoint B, to be aligned onto A.")],
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="An alignment method: weight, activation, ste, sinkhorn, pam, ot, annealing "
            "(modeconn.aligner_names()).",
        ),
    ] = "weight",
    data: DataOpt = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Aligned checkpoint of B (.safetensors or .pt; "
                           "a folder when B is a Hugging Face model folder).")
    ] = Path("B_aligned.safetensors"),
    points: Annotated[
        int, typer.Option("--points", help="Points on the linear path for the barrier table.")
    ] = 11,
    barrier: Annotated[
        bool,
        typer.Option("--barrier/--no-barrier", help="Measure the barrier before and after."),
    ] = True,
    restarts: Annotated[
        int, typer.Option("--restarts", help="Weight matching: random restarts (best kept).")
    ] = 1,
    spec_path: Annotated[
        Path | None,
        typer.Option(
            "--spec",
            help="Permutation spec JSON (as `modeconn spec --json` writes, or by hand) to use "
            "instead of inferring one: for models that cannot be traced.",
        ),
    ] = None,
    model: ModelOpt = None,
    model_arg: ModelArgsOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = None,
    json_path: JsonOpt = None,
    mkdir: MkdirOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Align checkpoint B to checkpoint A (B's function is unchanged) and save the result.

    Prints the loss and error barrier of the linear path A -> B on the test split before and after
    alignment (BatchNorm statistics are recomputed at every point).
    """
    import modeconn as mc
    from modeconn import ConfigError

    stream.check_out(  # a folder for a folder; check_outputs: output = input, missing folders
        out, model_b, CHECKPOINT_SUFFIXES, inputs=[model_a, model_b, spec_path, data],
        json_path=json_path, mkdir=mkdir,
    )
    if points < 2:
        raise ConfigError(f"--points must be >= 2, got {points}")
    if restarts < 1:
        raise ConfigError(f"--restarts must be >= 1, got {restarts}")
    aligner = mc.get_aligner(method)  # unknown method: one clear line before any work
    if restarts != 1 and not aligner.accepts("n_restarts"):
        raise ConfigError(f"--restarts applies to weight matching, not to method {method!r}")
    spec = None
    if spec_path is not None:
        spec = load_spec_arg(spec_path)
    net_a = load_model_arg(model_a, model, model_arg, device=device)
    net_b = load_model_arg(model_b, model, model_arg, device=device)
    needs_data = aligner.needs_data or barrier
    splits = load_data_arg(data, net_a, net_b) if (needs_data or data) else None
    shared = {"progress": progress, "seed": seed, "device": device, "n_restarts": restarts}
    kwargs: dict[str, Any] = {k: v for k, v in shared.items() if aligner.accepts(k)}
    if restarts == 1:
        kwargs.pop("n_restarts", None)
    aligned, perm = mc.align(
        net_a,
        net_b,
        method=method,
        data=splits.train if splits is not None else None,
        spec=spec,
        return_permutation=True,
        **kwargs,
    )
    info = {k: v for k, v in perm.info.items() if k != "history" and _jsonable(v)}
    meta = dict(getattr(net_b, "modeconn_meta", None) or {})
    meta["alignment"] = {"method": method, "reference": str(model_a), "info": info}
    if stream.is_folder(model_b):
        mc.save_model_folder(out, aligned.state_dict(), like=model_b)
    else:
        mc.save_checkpoint(out, aligned, meta=meta)

    result: dict[str, Any] = {"out": str(out), "method": method, "alignment": info}
    if barrier and splits is not None:
        sa = net_a.state_dict()
        before = _barriers(net_a, sa, net_b.state_dict(), splits, points, device)
        after = _barriers(net_a, sa, aligned.state_dict(), splits, points, device)
        result.update(before=before, after=after)
        print_table(
            f"linear path A -> B on the test split ({points} points), method {method}",
            ["", "test loss barrier", "test error barrier", "midpoint test accuracy"],
            [
                ["naive", before["loss_barrier"], before["error_barrier"], _mid(before)],
                ["aligned", after["loss_barrier"], after["error_barrier"], _mid(after)],
            ],
        )
    console.print(f"saved {out}")
    if json_path is not None:
        write_json(json_path, result)
    for when in ("before", "after"):
        if when in result:
            check_finite_losses(f"linear path A -> B {when} alignment", result[when]["loss"],
                                result[when]["ts"])  # fmt: skip


def _jsonable(v: Any) -> bool:
    """Numbers, strings and (nested) lists/dicts of them: what JSON and checkpoint metadata
    can hold (an aligner's ``info`` may also carry tensors, e.g. OT's transport maps)."""
    if v is None or isinstance(v, bool | int | float | str):
        return True
    if isinstance(v, list | tuple):
        return all(_jsonable(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _jsonable(x) for k, x in v.items())
    return False


def _mid(ev: dict) -> float:
    ts = ev["ts"]
    i = min(range(len(ts)), key=lambda j: abs(ts[j] - 0.5))
    return ev["accuracy"][i]
