"""Merging on MNIST-1D: every merge method, with and without alignment, next to its inputs.

Two settings, both MLPs (width 128, 2 hidden layers):

A. Task vectors: one model pretrained on half of the training split (all classes), then fine-tuned
   on three class subsets ({0,1,2}, {3,4,5}, {6,7,8,9}) of the whole training split (A), or on
   three disjoint thirds of the unused half, all classes (A2); every method merges the three
   fine-tunes (the task-vector methods with the pretrained model as ``base``).
B. Independent models: three models trained from different seeds on the whole training split;
   merged without alignment, and after weight matching (merge-many for N = 3) and activation
   matching onto the first model.

Held-out data: the last 500 examples of the training split are never trained on; they serve as
the greedy soup's held-out set and to tune the task-vector scale lambda (grid below). The table
reports accuracy on the test split (all classes) and, in settings A/A2, the mean over the three
class tasks of the accuracy on that task's classes. Fisher uses 300 examples per model.
Trained models are cached under ``runs/merging/``.

Run:  .venv/bin/python experiments/merging.py            (writes runs/merging/table.md, .json)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import modeconn as mc
from modeconn._src.io import atomic_write

TASKS = [(0, 1, 2), (3, 4, 5), (6, 7, 8, 9)]
SCALES = [0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5]
MODEL_KW = {"width": 128, "depth": 2}


def _subset(x: torch.Tensor, y: torch.Tensor, classes: tuple[int, ...]) -> tuple[Any, Any]:
    keep = torch.isin(y, torch.tensor(classes))
    return x[keep], y[keep]


def _cached(path: Path, build: Any, make: Any) -> torch.nn.Module:
    """Load ``path`` if it exists, else train with ``make()`` and save it."""
    if path.is_file():
        net = build()
        net.load_state_dict(mc.load_checkpoint(path).state)
        return net.eval()
    net = make()
    mc.save_checkpoint(path, net)
    return net.eval()


def _accuracies(model: torch.nn.Module, state: Any, test: tuple[Any, Any], tasks: bool) -> dict:
    out = {"test_acc": mc.evaluate(model, test, state=state).accuracy}
    if tasks:
        out["task_acc"] = sum(
            mc.evaluate(model, _subset(*test, t), state=state).accuracy for t in TASKS
        ) / len(TASKS)
    return out


def _tuned(model: Any, states: list, val: Any, method: str, **kw: Any) -> tuple[Any, float]:
    """Merge with every scale in SCALES (each method in its paper's form: lambda * sum of task
    vectors for task arithmetic/DARE, lambda * disjoint mean for TIES), keep the best on the
    held-out set (Ilharco et al. tune lambda on validation data the same way)."""
    best = None
    for s in SCALES:
        merged = mc.merge(states, method=method, scale=s, **kw)
        acc = mc.evaluate(model, val, state=merged).accuracy
        if best is None or acc > best[2]:
            best = (merged, s, acc)
    assert best is not None
    return best[0], best[1]


def run(out: Path, epochs: int, quick: bool) -> list[dict]:
    torch.set_num_threads(2)
    splits = mc.data.load("mnist1d")
    x, y = splits.tensors("train")
    test = splits.tensors("test")
    xtr, ytr = x[:-500], y[:-500]
    val = (x[-500:], y[-500:])
    half = len(xtr) // 2
    shape, ncls = splits.input_shape, splits.num_classes

    def build(seed: int = 0) -> torch.nn.Module:
        return mc.models.create("mlp", input_shape=shape, num_classes=ncls, seed=seed, **MODEL_KW)

    def fit(net: torch.nn.Module, data: Any, ep: int, lr: float, seed: int) -> torch.nn.Module:
        return mc.train(net, data, epochs=ep, lr=lr, seed=seed, progress=False).model

    models = out / "models"
    n_fisher = 100 if quick else 300
    rows: list[dict] = []

    def add(setting: str, name: str, aligned: str, model: Any, state: Any, note: str = "") -> None:
        row = {"setting": setting, "model": name, "aligned": aligned, "note": note,
               **_accuracies(model, state, test, setting != "B")}
        rows.append(row)
        print(f"  {setting} {name:<28} {aligned:<10} " + "  ".join(
            f"{k}={v:.3f}" for k, v in row.items() if k.endswith("acc")) + f"  {note}", flush=True)

    # --- A: task vectors from one pretrained model ------------------------------------------
    t0 = time.time()
    pre = _cached(models / "pre.safetensors", build,
                  lambda: fit(build(0), (xtr[:half], ytr[:half]), epochs, 0.1, 0))
    base = pre.state_dict()
    add("A", "pretrained (base)", "-", pre, base)
    third = (len(xtr) - half) // 3
    settings = {
        "A": ("class subsets", [_subset(xtr, ytr, t) for t in TASKS]),
        "A2": ("data subsets", [(xtr[half + i * third : half + (i + 1) * third],
                                 ytr[half + i * third : half + (i + 1) * third])
                                for i in range(3)]),
    }
    for tag, (what, task_data) in settings.items():
        tuned = [
            _cached(models / f"{tag}_task{i}.safetensors", build,
                    lambda i=i, d=d: fit(pre, d, max(2, epochs // 2), 0.05, i))
            for i, d in enumerate(task_data)
        ]
        print(f"setting {tag} ({what}): models ready ({time.time() - t0:.0f}s)", flush=True)
        states = [m.state_dict() for m in tuned]
        for i, st in enumerate(states):
            if tag == "A":
                own = mc.evaluate(pre, _subset(*test, TASKS[i]), state=st).accuracy
                add(tag, f"fine-tuned on classes {TASKS[i]}", "-", pre, st,
                    f"own classes: {own:.3f}")
            else:
                add(tag, f"fine-tuned on data third {i}", "-", pre, st)
        add(tag, "average", "no", pre, mc.merge(states))
        add(tag, "soup (greedy)", "no", pre,
            mc.merge(states, method="soup", model=pre, data=val))
        add(tag, "fisher", "no", pre, mc.merge(states, method="fisher", model=pre,
                                               data=task_data, n_examples=n_fisher))
        add(tag, "regmean", "no", pre,
            mc.merge(states, method="regmean", model=pre, data=task_data))
        add(tag, "task_arithmetic (mean)", "no", pre,
            mc.merge(states, method="task_arithmetic", base=base, normalize=True))
        lams = {}
        for method, kw in (("task_arithmetic", {}), ("ties", {"density": 0.2}),
                           ("dare", {"p": 0.5}), ("dare", {"p": 0.5, "consensus": True})):
            merged, lam = _tuned(pre, states, val, method, base=base, **kw)
            label = method + ("+ties" if kw.get("consensus") else "")
            lams[label] = lam
            add(tag, f"{label} (lambda tuned)", "no", pre, merged, f"lambda={lam}")
        add(tag, "slerp (first two)", "no", pre, mc.merge(states[:2], method="slerp"))
        # alignment onto the base: fine-tunes share the base's unit order, so it should not matter
        aligned = {"align": "weight", "model": pre, "data": val}
        add(tag, "average", "weight", pre, mc.merge(states, **aligned))
        add(tag, "task_arithmetic (mean)", "weight", pre,
            mc.merge(states, method="task_arithmetic", base=base, normalize=True, **aligned))
        add(tag, "ties (lambda tuned)", "weight", pre,
            mc.merge(states, method="ties", base=base, scale=lams["ties"], **aligned),
            f"lambda={lams['ties']}")

    # --- B: independent models from different seeds -----------------------------------------
    t0 = time.time()
    seeds = [
        _cached(models / f"seed{s}.safetensors", lambda s=s: build(s),
                lambda s=s: fit(build(s), (xtr, ytr), epochs, 0.1, s))
        for s in range(3)
    ]
    print(f"setting B: models ready ({time.time() - t0:.0f}s)", flush=True)
    ref = seeds[0]
    sstates = [m.state_dict() for m in seeds]
    train = (xtr, ytr)
    for i, s in enumerate(sstates):
        add("B", f"seed {i}", "-", ref, s)
    for align in (None, "weight", "activation"):
        tag = align or "no"
        common = {"align": align, "model": ref, "data": train}
        add("B", "average", tag, ref, mc.merge(sstates, **common))
        add("B", "soup (greedy)", tag, ref,
            mc.merge(sstates, method="soup", align=align, model=ref, data=val))
        add("B", "fisher", tag, ref,
            mc.merge(sstates, method="fisher", n_examples=n_fisher, **common))
        add("B", "regmean", tag, ref, mc.merge(sstates, method="regmean", **common))
        add("B", "slerp (seeds 0,1)", tag, ref, mc.merge(sstates[:2], method="slerp", **common))
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| setting | model / merge | aligned | test acc | mean task acc | note |",
        "|---|---|---|---:|---:|---|",
    ]
    for r in rows:
        task = f"{r['task_acc']:.3f}" if "task_acc" in r else ""
        lines.append(f"| {r['setting']} | {r['model']} | {r['aligned']} | {r['test_acc']:.3f} | "
                     f"{task} | {r['note']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/merging"))
    ap.add_argument("--epochs", type=int, default=30, help="pretraining / seed-model epochs")
    ap.add_argument("--quick", action="store_true", help="fewer Fisher examples")
    args = ap.parse_args(argv)
    t0 = time.time()
    rows = run(args.out, args.epochs, args.quick)
    md = table(rows)
    print(md)
    with atomic_write(args.out / "table.md", "w") as f:
        f.write(md)
    with atomic_write(args.out / "results.json", "w") as f:
        json.dump({"rows": rows, "epochs": args.epochs, "seconds": time.time() - t0}, f, indent=2)
    print(f"done in {time.time() - t0:.0f}s; wrote {args.out / 'table.md'}")


if __name__ == "__main__":
    main()
