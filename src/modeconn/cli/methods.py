"""``modeconn instability | autoneb | simplex | subspace``: the methods of issue 12 as commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .common import (
    DataOpt,
    DeviceOpt,
    JsonOpt,
    MkdirOpt,
    ModelArgsOpt,
    ModelOpt,
    ProgressOpt,
    ResumeOpt,
    SeedOpt,
    build_model,
    check_outputs,
    console,
    load_data_arg,
    load_model_arg,
    on_interrupt,
    parse_model_args,
    print_table,
    write_json,
)


def _check_folder_outputs(
    out: Path, json_path: Path | None, inputs: list[Any], mkdir: bool
) -> None:
    """The output check of the commands that write a folder (a path file + evaluation.json)."""
    import modeconn as mc

    check_outputs(
        {"--out": out, "--json": json_path},
        inputs=[i for i in inputs if i is not None],
        mkdir=mkdir,
        folders={"--out": (mc.PATH_FILENAME, "evaluation.json")},
    )


def _ints(text: str, option: str) -> list[int]:
    import modeconn as mc

    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        msg = f"{option} takes comma-separated integers, e.g. 0,1,2; got {text!r}"
        raise mc.ConfigError(msg) from None


def instability(
    model: Annotated[
        str, typer.Option("--model", "-m", help="Zoo model or 'package.module:function'.")
    ] = "mlp",
    data: Annotated[str, typer.Option("--data", "-d", help="Data source.")] = "mnist1d",
    spawn: Annotated[
        str, typer.Option("--spawn", help="Spawn epochs k, comma-separated (each < --epochs).")
    ] = "0,1,2,4",
    epochs: Annotated[int, typer.Option("--epochs", help="Total training epochs.")] = 10,
    seeds: Annotated[
        str, typer.Option("--seeds", help="The two children's seeds, e.g. 0,1.")
    ] = "0,1",
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate.")] = 0.1,
    optimizer: Annotated[str, typer.Option(help="sgd, adam, adamw or sam.")] = "sgd",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Minibatch size.")] = 128,
    points: Annotated[int, typer.Option("--points", help="Points on each line.")] = 25,
    model_arg: ModelArgsOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = None,
    json_path: JsonOpt = None,
    mkdir: MkdirOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Instability analysis (Frankle et al. 2020): train to epoch k, spawn two copies that differ
    only in SGD noise, finish both, and measure the barrier on the line between them.

    --seed sets the initialisation and the shared first k epochs; --seeds the two children.
    Loss and error barriers on the test split.
    """
    import modeconn as mc

    check_outputs({"--json": json_path}, mkdir=mkdir)
    ks, pair = _ints(spawn, "--spawn"), _ints(seeds, "--seeds")
    if len(pair) != 2:
        raise mc.ConfigError(f"--seeds takes two seeds, e.g. 0,1; got {seeds!r}")
    splits = load_data_arg(data)
    net = build_model(model, splits, parse_model_args(model_arg), seed=seed)
    with on_interrupt("nothing was written; run the command again"):
        r = mc.instability(
            net, splits, spawn=ks, epochs=epochs, seeds=(pair[0], pair[1]), seed=seed, lr=lr,
            optimizer=optimizer, batch_size=batch_size, ts=points, device=device,
            progress=progress,
        )  # fmt: skip
    rows = [
        [k, lb, eb, f"{a:.3f} / {b:.3f}"]
        for k, lb, eb, (a, b) in zip(
            r.spawn, r.barrier, r.error_barrier, r.child_accuracy, strict=True
        )
    ]
    print_table(
        f"instability of {model} on {data}, {epochs} epochs, children seeds {pair}",
        ["spawn epoch", "test loss barrier", "test error barrier", "children test acc"],
        rows,
    )
    if json_path is not None:
        write_json(json_path, {"model": model, "data": data, **r.to_dict()})


def autoneb(
    model_a: Annotated[Path, typer.Argument(help="Checkpoint A (fixed end).")],
    model_b: Annotated[Path, typer.Argument(help="Checkpoint B (fixed end).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("autoneb"),
    data: DataOpt = None,
    pivots: Annotated[int, typer.Option("--pivots", help="Inner pivots to start with.")] = 3,
    cycles: Annotated[int, typer.Option("--cycles", help="NEB cycles.")] = 4,
    steps: Annotated[int, typer.Option("--steps", help="Minibatch steps per cycle.")] = 200,
    lr: Annotated[float, typer.Option("--lr", help="First cycle's learning rate.")] = 0.1,
    insert: Annotated[int, typer.Option("--insert", help="Most pivots added per cycle.")] = 2,
    max_pivots: Annotated[int, typer.Option("--max-pivots", help="Cap on pivots.")] = 20,
    points: Annotated[int, typer.Option("--points", help="Evaluation points.")] = 25,
    model: ModelOpt = None,
    model_arg: ModelArgsOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = None,
    json_path: JsonOpt = None,
    mkdir: MkdirOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """A low-loss polygonal chain between A and B by AutoNEB (Draxler et al. 2018).

    Writes OUT/curve.safetensors (a polychain; `modeconn evaluate OUT` evaluates it again) and
    OUT/evaluation.json (chain and linear path, train and test).
    """
    import modeconn as mc

    _check_folder_outputs(out, json_path, [model_a, model_b, data], mkdir)
    if points < 2:
        raise mc.ConfigError(f"--points must be >= 2, got {points}")
    net_a = load_model_arg(model_a, model, model_arg, device=device)
    net_b = load_model_arg(model_b, model, model_arg, device=device)
    splits = load_data_arg(data, net_a, net_b)
    with on_interrupt("nothing was written (AutoNEB does not resume); run the command again"):
        chain = mc.autoneb(
            net_a, net_b, splits, pivots=pivots, cycles=cycles, steps=steps, lr=lr,
            insert=insert, max_pivots=max_pivots, seed=seed, device=device, progress=progress,
        )  # fmt: skip
    source = data or (getattr(net_a, "modeconn_meta", None) or {}).get("data") or splits.name
    chain.meta.update(data=source, endpoints=[str(model_a), str(model_b)])
    out.mkdir(parents=True, exist_ok=True)
    file = chain.save(out / mc.PATH_FILENAME)
    evs = {}
    named = {"train": splits.train, "test": splits.test}
    for label, path in (
        ("linear", mc.LinearPath(net_a.state_dict(), net_b.state_dict())),
        (f"autoneb ({chain.num_points - 2} pivots)", chain),
    ):
        evs[label] = mc.evaluate_path(
            net_a, path, named, ts=points, bn_data=splits.train, device=device, progress=progress
        )
    rows = [
        [label, ev.barrier("loss", "test"), ev.barrier("error", "test"),
         ev.barrier("loss", "train"), ev.summary("loss", "test")["max"],
         ev.summary("accuracy", "test")["min"]]
        for label, ev in evs.items()
    ]  # fmt: skip
    print_table(
        f"AutoNEB {model_a.name} -> {model_b.name}",
        ["path", "test loss barrier", "test error barrier", "train loss barrier",
         "max test loss", "min test acc"],
        rows,
    )
    result = {
        "autoneb": evs[next(k for k in evs if k != "linear")].to_dict(),
        "linear": evs["linear"].to_dict(),
        "settings": chain.meta,
    }
    write_json(out / "evaluation.json", result)
    console.print(f"wrote {file}, {out / 'evaluation.json'}")
    if json_path is not None:
        write_json(json_path, result)



def _evaluate_points(net: Any, path: Any, splits: Any, samples: int) -> dict[str, Any]:
    """Train loss and test accuracy at ``samples`` random points of a Simplex (BN reset)."""
    import copy

    import modeconn as mc

    out: dict[str, Any] = {"coords": [], "train_loss": [], "test_accuracy": []}
    for c in path.sample(samples, seed=0):
        point = copy.deepcopy(net)
        point.load_state_dict(path.state(c))
        if mc.needs_bn_reset(point):
            point = mc.reset_bn(point, splits.train)
        out["coords"].append(c.tolist())
        out["train_loss"].append(mc.evaluate(point, splits.train).loss)
        out["test_accuracy"].append(mc.evaluate(point, splits.test).accuracy)
    return out


def _finish(out: Path, path: Any, net: Any, splits: Any, points: int, samples: int,
            device: Any, progress: bool, title: str, json_path: Path | None) -> None:  # fmt: skip
    """Save ``path`` to OUT, evaluate it (and random simplex points), print, write JSON."""
    import modeconn as mc

    out.mkdir(parents=True, exist_ok=True)
    file = path.save(out / mc.PATH_FILENAME)
    ev = mc.evaluate_path(net, path, {"train": splits.train, "test": splits.test}, ts=points,
                          bn_data=splits.train, device=device, progress=progress)  # fmt: skip
    acc = ev.summary("accuracy", "test")
    rows = [[f"{path.kind} path (θ(t), {points} points)", ev.summary("loss", "train")["max"],
             acc["min"], acc["mean"]]]  # fmt: skip
    result: dict[str, Any] = {"path": ev.to_dict(), "settings": path.meta}
    if isinstance(path, mc.Simplex) and samples > 0:
        pts = _evaluate_points(net, path, splits, samples)
        rows.append([f"{samples} random points", max(pts["train_loss"]),
                     min(pts["test_accuracy"]), sum(pts["test_accuracy"]) / samples])  # fmt: skip
        result["random_points"] = pts
    print_table(title, ["where", "max train loss", "min test acc", "mean test acc"], rows)
    write_json(out / "evaluation.json", result)
    console.print(f"wrote {file}, {out / 'evaluation.json'}")
    if json_path is not None:
        write_json(json_path, result)


EpochsOpt = Annotated[int, typer.Option("--epochs", help="Training epochs.")]
SamplesOpt = Annotated[
    int, typer.Option("--samples", help="Random points of the simplex to evaluate.")
]


def simplex(
    model_a: Annotated[Path, typer.Argument(help="Checkpoint A (a fixed vertex).")],
    model_b: Annotated[Path, typer.Argument(help="Checkpoint B (a fixed vertex).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("simplex"),
    data: DataOpt = None,
    extra_vertices: Annotated[
        int, typer.Option("--extra-vertices", help="Trainable shared vertices k.")
    ] = 1,
    volume_weight: Annotated[
        float, typer.Option("--volume-weight", help="λ of the log-volume bonus.")
    ] = 1e-3,
    epochs: EpochsOpt = 20,
    lr: Annotated[float, typer.Option("--lr", help="Base learning rate.")] = 0.05,
    resume: ResumeOpt = False,
    samples: SamplesOpt = 10,
    points: Annotated[int, typer.Option("--points", help="Points on θ(t).")] = 25,
    model: ModelOpt = None,
    model_arg: ModelArgsOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = None,
    json_path: JsonOpt = None,
    mkdir: MkdirOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """A low-loss simplicial complex between A and B (SPRO, Benton et al. 2021).

    Writes OUT/curve.safetensors (a simplex; `modeconn evaluate OUT` evaluates its path
    A -> centroid -> B), OUT/evaluation.json (that path and random points of the complex) and
    OUT/fit_state.pt (per-epoch checkpoint for --resume).
    """
    import modeconn as mc

    _check_folder_outputs(out, json_path, [model_a, model_b, data], mkdir)
    if points < 2 or samples < 0:
        raise mc.ConfigError(f"need --points >= 2 and --samples >= 0, got {points}, {samples}")
    net_a = load_model_arg(model_a, model, model_arg, device=device)
    net_b = load_model_arg(model_b, model, model_arg, device=device)
    splits = load_data_arg(data, net_a, net_b)
    with on_interrupt(f"finished epochs are kept in {out}; rerun with --resume to continue"):
        path = mc.fit_simplex(
            net_a, net_b, splits, extra_vertices=extra_vertices, volume_weight=volume_weight,
            epochs=epochs, lr=lr, seed=seed, device=device, checkpoint_dir=out, resume=resume,
            progress=progress,
        )  # fmt: skip
    source = data or (getattr(net_a, "modeconn_meta", None) or {}).get("data") or splits.name
    path.meta.update(data=source, endpoints=[str(model_a), str(model_b)])
    _finish(out, path, net_a, splits, points, samples, device, progress,
            f"SPRO simplex {model_a.name} -> {model_b.name}, {extra_vertices} extra vertex(es)",
            json_path)  # fmt: skip


def subspace(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("subspace"),
    model: Annotated[
        str, typer.Option("--model", "-m", help="Zoo model or 'package.module:function'.")
    ] = "mlp",
    data: Annotated[str, typer.Option("--data", "-d", help="Data source.")] = "mnist1d",
    kind: Annotated[str, typer.Option("--kind", help="line, curve or simplex.")] = "line",
    vertices: Annotated[int, typer.Option("--vertices", help="Vertices of a simplex.")] = 3,
    beta: Annotated[float, typer.Option("--beta", help="β of the cos² regulariser.")] = 1.0,
    epochs: EpochsOpt = 40,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (cosine).")] = 0.1,
    resume: ResumeOpt = False,
    samples: SamplesOpt = 10,
    points: Annotated[int, typer.Option("--points", help="Points on θ(t).")] = 25,
    model_arg: ModelArgsOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = None,
    json_path: JsonOpt = None,
    mkdir: MkdirOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Train a line, curve or simplex of networks from scratch (Wortsman et al. 2021).

    Writes OUT/curve.safetensors, OUT/evaluation.json and OUT/fit_state.pt (for --resume).
    """
    import modeconn as mc

    _check_folder_outputs(out, json_path, [data], mkdir)
    if points < 2 or samples < 0:
        raise mc.ConfigError(f"need --points >= 2 and --samples >= 0, got {points}, {samples}")
    splits = load_data_arg(data)
    net = build_model(model, splits, parse_model_args(model_arg), seed=seed)
    with on_interrupt(f"finished epochs are kept in {out}; rerun with --resume to continue"):
        path = mc.fit_subspace(
            net, splits, kind=kind, vertices=vertices, beta=beta, epochs=epochs, lr=lr,
            seed=seed, device=device, checkpoint_dir=out, resume=resume, progress=progress,
        )  # fmt: skip
    path.meta.update(data=data)
    _finish(out, path, net, splits, points, samples, device, progress,
            f"{kind} subspace of {model} on {data}, {epochs} epochs", json_path)  # fmt: skip
