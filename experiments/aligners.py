"""OT fusion, simulated annealing, ZipIt! and the newer task-vector merges on MNIST-1D (issue 12).

Three tables, each mean ± std over seeds (MLPs, width 128, 3 hidden layers, ``mc.train``
defaults otherwise):

1. **Barriers** — pairs (A, B) trained from seeds (2i, 2i+1): the test-loss barrier of the linear
   path A → π(B) (11 points) and its midpoint test accuracy, for π from weight matching,
   activation matching, OT fusion's alignment (weight and activation cost, exact OT; Singh &
   Jaggi 2020) and simulated annealing (Entezari et al. 2022) from the identity; and the accuracy
   of OT fusion's soft fused model (entropic OT, ``reg``).
2. **ZipIt! vs averaging** — the same pairs merged by plain averaging, by weight matching then
   averaging, and by ZipIt! (default β = 0.125; β = 0: no same-model merges).
3. **Three models** — the pair plus a model from seed 100 + i: plain average, weight matching
   (merge-many) then average, OT fusion as a Wasserstein barycenter (Akash et al. 2023; weight
   and activation cost) and ZipIt!.
4. **Task-vector merges** — per seed: a model pretrained on half of the training split,
   fine-tuned (a) on the classes {0,1,2}, {3,4,5}, {6,...,9} (different tasks) or (b) on three
   disjoint thirds of the other half, all classes (one task: Model Stock's setting); the three
   fine-tunes merged with ``base`` = the pretrained model, every method at its defaults (task
   arithmetic with ``normalize=True``: the mean task vector). Test accuracy, and in (a) the mean
   over the three tasks of the accuracy on that task's classes.

Models are cached under ``--out`` (default ``runs/aligners``); the tables go to ``--results``.

Usage::

    python experiments/aligners.py                 # 3 seeds, writes docs/results/aligners.md
    python experiments/aligners.py --seeds 1 --epochs 3 --anneal-steps 100 --out /tmp/smoke \
        --results /tmp/smoke/aligners.md
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import modeconn as mc
from modeconn._src.io import atomic_write

TASKS = [(0, 1, 2), (3, 4, 5), (6, 7, 8, 9)]
MERGES = ["average", "task_arithmetic", "ties", "dare", "model_stock", "breadcrumbs", "della"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="pairs / task-vector seeds")
    p.add_argument("--epochs", type=int, default=20, help="training epochs of every model")
    p.add_argument("--anneal-steps", type=int, default=3000, help="annealing moves")
    p.add_argument("--reg", type=float, default=0.01, help="entropic OT for the soft fusion")
    p.add_argument("--out", type=Path, default=Path("runs/aligners"))
    p.add_argument("--results", type=Path, default=Path("docs/results/aligners.md"))
    return p.parse_args(argv)


def cached(path: Path, make: Callable[[], nn.Module], like: nn.Module) -> nn.Module:
    """``make()``'s model, saved at ``path`` (loaded on a rerun)."""
    if path.is_file():
        like.load_state_dict(mc.load_checkpoint(path).state)
        return like.eval()
    net = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    mc.save_checkpoint(path, net)
    return net.eval()


def fresh(splits: Any, seed: int) -> nn.Module:
    return mc.models.create("mlp", input_shape=splits.input_shape,
                            num_classes=splits.num_classes, seed=seed)


def trained(args: argparse.Namespace, splits: Any, name: str, seed: int, data: Any,
            start: nn.Module | None = None, epochs: int | None = None) -> nn.Module:
    init = start if start is not None else fresh(splits, seed)
    return cached(args.out / f"{name}.safetensors",
                  lambda: mc.train(init, data, epochs=epochs or args.epochs, seed=seed,
                                   progress=False).model, fresh(splits, seed))


def barrier_rows(args: argparse.Namespace, splits: Any, a: nn.Module, b: nn.Module,
                 spec: mc.PermutationSpec) -> dict[str, dict[str, float]]:
    sa, sb = a.state_dict(), b.state_dict()

    def path(state_b: dict) -> dict[str, float]:
        ev = mc.evaluate_path(a, mc.LinearPath(sa, state_b), splits.test, ts=11, progress=False)
        return {"barrier": ev.barrier("loss"), "mid_acc": float(ev.accuracy[5])}

    rows: dict[str, dict[str, float]] = {"none": path(sb)}
    methods: dict[str, dict[str, Any]] = {
        "weight": {}, "activation": {}, "ot": {}, "ot_activation": {"cost": "activation"},
        "annealing": {"steps": args.anneal_steps},
    }
    for label, kw in methods.items():
        t0 = time.perf_counter()
        perm = mc.align(a, b, method=label.split("_")[0], data=splits.train, spec=spec,
                        return_permutation=True, **kw)[1]
        secs = time.perf_counter() - t0
        rows[label] = {**path(mc.apply_permutation(spec, perm, sb)), "seconds": secs}
    fused = mc.ot_fusion(spec, sa, sb, reg=args.reg)
    rows["ot_fusion_soft"] = {"mid_acc": mc.evaluate(a, splits.test, state=fused).accuracy}
    return rows


def zipit_rows(splits: Any, a: nn.Module, b: nn.Module) -> dict[str, dict[str, float]]:
    def acc(state: Any) -> dict[str, float]:
        return {"acc": mc.evaluate(a, splits.test, state=state).accuracy}

    merge = mc.merge
    return {
        "endpoints (mean)": {"acc": (acc(a.state_dict())["acc"] + acc(b.state_dict())["acc"]) / 2},
        "average": acc(merge([a, b])),
        "weight matching + average": acc(merge([a, b], align="weight", model=a)),
        "zipit": acc(merge([a, b], method="zipit", model=a, data=splits.train)),
        "zipit (beta=0)": acc(merge([a, b], method="zipit", model=a, data=splits.train, beta=0)),
    }


def three_rows(splits: Any, ms: list[nn.Module]) -> dict[str, dict[str, float]]:
    a = ms[0]
    spec = mc.infer_spec(a, torch.zeros(2, *splits.input_shape))
    states = [m.state_dict() for m in ms]

    def acc(state: Any) -> dict[str, float]:
        return {"acc": mc.evaluate(a, splits.test, state=state).accuracy}

    return {
        "endpoints (mean)": {"acc": statistics.mean(acc(s)["acc"] for s in states)},
        "average": acc(mc.merge(ms)),
        "merge-many (weight) + average": acc(mc.merge(ms, align="weight", model=a)),
        "ot_barycenter (weight)": acc(mc.ot_barycenter(spec, states)),
        "ot_barycenter (activation)": acc(mc.ot_barycenter(spec, states, cost="activation",
                                                           model=a, data=splits.train)),
        "zipit": acc(mc.merge(ms, method="zipit", model=a, data=splits.train)),
    }


def subset(x: torch.Tensor, y: torch.Tensor, classes: tuple[int, ...]) -> tuple[Any, Any]:
    keep = torch.isin(y, torch.tensor(classes))
    return x[keep], y[keep]


def task_rows(args: argparse.Namespace, splits: Any, seed: int,
              setting: str) -> dict[str, dict[str, float]]:
    x, y = splits.train.tensors
    half = len(x) // 2
    pre = trained(args, splits, f"pre_{seed}", seed, (x[:half], y[:half]))
    if setting == "classes":
        parts = [subset(x, y, t) for t in TASKS]
    else:
        third = (len(x) - half) // 3
        parts = [(x[half + i * third: half + (i + 1) * third],
                  y[half + i * third: half + (i + 1) * third]) for i in range(3)]
    fts = [trained(args, splits, f"ft_{setting}_{seed}_{i}", seed + i, part, start=pre,
                   epochs=max(args.epochs // 4, 1)) for i, part in enumerate(parts)]

    def score(state: Any) -> dict[str, float]:
        test = splits.test.tensors
        out = {"acc": mc.evaluate(pre, splits.test, state=state).accuracy}
        if setting == "classes":
            out["task_acc"] = statistics.mean(
                mc.evaluate(pre, subset(*test, t), state=state).accuracy for t in TASKS)
        return out

    rows = {"pretrained": score(pre.state_dict()),
            "fine-tuned (mean)": {k: statistics.mean(score(f.state_dict())[k] for f in fts)
                                  for k in score(pre.state_dict())}}
    for name in MERGES:
        kw: dict[str, Any] = {} if name == "average" else {"base": pre}
        if name == "task_arithmetic":
            kw["normalize"] = True
        rows[name] = score(mc.merge(fts, method=name, **kw))
    return rows


def table(title: str, runs: list[dict[str, dict[str, float]]], cols: dict[str, str]) -> str:
    def cell(label: str, key: str) -> str:
        vals = [r[label][key] for r in runs if key in r[label]]
        if not vals:
            return "-"
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{statistics.mean(vals):.3f} ± {sd:.3f}"

    lines = [f"### {title}", "", "| method | " + " | ".join(cols.values()) + " |",
             "|---|" + "---:|" * len(cols)]
    lines += [f"| {label} | " + " | ".join(cell(label, k) for k in cols) + " |"
              for label in runs[0]]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    splits = mc.data.load("mnist1d")
    bars: list[dict] = []
    zips: list[dict] = []
    threes: list[dict] = []
    tasks: dict[str, list[dict]] = {"classes": [], "thirds": []}
    for i in range(args.seeds):
        a = trained(args, splits, f"seed_{2 * i}", 2 * i, splits.train)
        b = trained(args, splits, f"seed_{2 * i + 1}", 2 * i + 1, splits.train)
        spec = mc.infer_spec(a, torch.zeros(2, *splits.input_shape))
        bars.append(barrier_rows(args, splits, a, b, spec))
        zips.append(zipit_rows(splits, a, b))
        c = trained(args, splits, f"seed_{100 + i}", 100 + i, splits.train)
        threes.append(three_rows(splits, [a, b, c]))
        for setting, runs in tasks.items():
            runs.append(task_rows(args, splits, i, setting))
        print(f"seed {i} done", file=sys.stderr)
    cmd = "python " + " ".join(shlex.quote(c) for c in ["experiments/aligners.py",
                                                          *(argv or sys.argv[1:])])
    text = (
        "# OT fusion, annealing, ZipIt! and newer merges on MNIST-1D (issue 12)\n\n"
        f"Produced by `{cmd}` (mean ± std over {args.seeds} seeds; models: MLP width 128, "
        f"3 hidden layers, {args.epochs} epochs; see the script's docstring).\n\n"
        + table("Linear-path barrier after alignment (test loss, 11 points)", bars,
                {"barrier": "loss barrier", "mid_acc": "midpoint test acc",
                 "seconds": "align seconds"})
        + "\n`ot_fusion_soft`: accuracy of OT fusion's fused model ½(θ_A + P(θ_B)) with "
          f"entropic OT (reg = {args.reg}).\n\n"
        + table("ZipIt! vs averaging two independently trained models (test accuracy)", zips,
                {"acc": "test acc"})
        + "\n"
        + table("Three independently trained models (test accuracy)", threes,
                {"acc": "test acc"})
        + "\n"
        + table("Task-vector merges (a): fine-tunes on class subsets (defaults)",
                tasks["classes"], {"acc": "test acc", "task_acc": "mean task acc"})
        + "\n"
        + table("Task-vector merges (b): fine-tunes on disjoint data thirds (defaults)",
                tasks["thirds"], {"acc": "test acc"})
    )
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.results, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
