"""``modeconn train``: train a zoo (or user) model on a data source and save a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import (
    CHECKPOINT_SUFFIXES,
    DeviceOpt,
    JsonOpt,
    MkdirOpt,
    ModelArgsOpt,
    ProgressOpt,
    SeedOpt,
    build_model,
    check_data_fits,
    check_outputs,
    console,
    load_data_arg,
    on_interrupt,
    parse_model_args,
    print_table,
    write_json,
)


def command(
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="Zoo model (mlp, cnn1d, cnn, resnet, transformer) or 'package.module:function'.",
        ),
    ] = "mlp",
    data: Annotated[
        str,
        typer.Option(
            "--data",
            "-d",
            help="Data source: mnist1d, digits, a path to an .npz (x_train, y_train, x_test, "
            "y_test) or 'package.module:function'.",
        ),
    ] = "mnist1d",
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Checkpoint to write (.safetensors or .pt).")
    ] = Path("model.safetensors"),
    seed: SeedOpt = 0,
    epochs: Annotated[int, typer.Option(help="Passes over the training data.")] = 40,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 0.1,
    optimizer: Annotated[
        str, typer.Option(help="sgd, adam, adamw or sam (sharpness-aware, Foret et al. 2021).")
    ] = "sgd",
    sam_rho: Annotated[float, typer.Option(help="SAM's neighbourhood radius ρ.")] = 0.05,
    swa_epochs: Annotated[
        int,
        typer.Option(help="After training, this many SWA epochs (Izmailov et al. 2018); 0: none."),
    ] = 0,
    swa_lr: Annotated[float, typer.Option(help="Constant learning rate of the SWA epochs.")] = 0.05,
    schedule: Annotated[str, typer.Option(help="cosine, constant or step.")] = "cosine",
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    weight_decay: Annotated[float, typer.Option(help="Weight decay.")] = 5e-4,
    batch_size: Annotated[int, typer.Option(help="Minibatch size.")] = 128,
    model_arg: ModelArgsOpt = None,
    adversarial: Annotated[
        bool, typer.Option("--adversarial/--no-adversarial", help="PGD-ℓ∞ adversarial training.")
    ] = False,
    eps: Annotated[float, typer.Option(help="PGD radius (with --adversarial).")] = 0.1,
    pgd_step: Annotated[float, typer.Option(help="PGD step size.")] = 0.025,
    pgd_steps: Annotated[int, typer.Option(help="PGD steps.")] = 7,
    device: DeviceOpt = None,
    json_path: JsonOpt = None,
    mkdir: MkdirOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Train a model on a data source and save it (with its metadata) as a checkpoint.

    Same --seed gives bit-identical weights on CPU. The checkpoint records the model name and
    options, the data source, the seed, the training settings and the final train/test metrics,
    so later commands need no --model.
    """
    import modeconn as mc

    check_outputs(
        {"--out": out, "--json": json_path},
        inputs=[data],
        mkdir=mkdir,
        suffixes={"--out": CHECKPOINT_SUFFIXES},
    )
    kwargs = parse_model_args(model_arg)
    splits = load_data_arg(data)
    net = build_model(model, splits, kwargs, seed=seed)
    check_data_fits(net, splits)  # a user's model and --data that do not fit: one line, no work
    pgd = {"eps": eps, "step": pgd_step, "steps": pgd_steps} if adversarial else None
    if swa_epochs < 0 or (swa_epochs > 0 and not swa_lr > 0):
        raise mc.ConfigError(
            f"need --swa-epochs >= 0 and --swa-lr > 0, got {swa_epochs} and {swa_lr}"
        )
    with on_interrupt("nothing was written (training does not resume); run the command again"):
        result = mc.train(
            net,
            splits,
            epochs=epochs,
            lr=lr,
            optimizer=optimizer,
            schedule=schedule,
            momentum=momentum,
            weight_decay=weight_decay,
            batch_size=batch_size,
            seed=seed,
            device=device,
            adversarial=pgd,
            sam_rho=sam_rho,
            progress=progress,
        )
        final = result.model
        m = dict(result.metrics)
        config = dict(result.config)
        if swa_epochs > 0:
            final = mc.swa(
                result.model, splits, epochs=swa_epochs, lr=swa_lr, optimizer=optimizer,
                momentum=momentum, weight_decay=weight_decay, batch_size=batch_size, seed=seed,
                sam_rho=sam_rho, device=device, adversarial=pgd, progress=progress,
            )  # fmt: skip
            config["swa"] = {"epochs": swa_epochs, "lr": swa_lr}
            for split, part in (("train", splits.train), ("test", splits.test)):
                ev = mc.evaluate(final, part)
                m[f"{split}_loss"], m[f"{split}_accuracy"] = ev.loss, ev.accuracy
            if pgd is not None:
                r = mc.robust_evaluate(final, splits.test, pgd, seed=seed)
                m["robust_test_loss"], m["robust_test_accuracy"] = r.loss, r.accuracy
    meta = {"data": data, "seed": seed, "train": config, "metrics": m}
    mc.save_checkpoint(out, final, meta=meta)
    rows = [["train", m["train_loss"], m["train_accuracy"]]]
    if "test_loss" in m:
        rows.append(["test", m["test_loss"], m["test_accuracy"]])
    if "robust_test_loss" in m:
        rows.append(["test (PGD)", m["robust_test_loss"], m["robust_test_accuracy"]])
    title = f"{model} on {data}, seed {seed}, {epochs} epochs"
    if swa_epochs > 0:
        title += f" + {swa_epochs} SWA epochs"
    print_table(title, ["split", "loss", "accuracy"], rows)
    console.print(f"saved {out} ({m['time_s']:.1f} s)")
    if json_path is not None:
        write_json(json_path, {"out": str(out), "model": model, **meta})
