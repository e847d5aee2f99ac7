"""SAM, SWA, instability, AutoNEB, simplexes and subspaces on MNIST-1D MLPs (issue 12).

One table per method, mean ± std over seeds (seed pairs (2i, 2i+1) for the two-mode methods):

- SAM / SWA: test accuracy and loss of SGD, SAM, SGD + SWA and SAM + SWA (Foret et al. 2021;
  Izmailov et al. 2018), same epochs and seed;
- instability (Frankle et al. 2020): loss and error barrier between two children spawned at
  epoch k, for several k;
- AutoNEB (Draxler et al. 2018) vs the linear path between independently trained modes;
- SPRO simplexes (Benton et al. 2021): worst and mean train loss of random points of the complex,
  and the simplex ensemble;
- learning subspaces (Wortsman et al. 2021): a line trained from scratch vs a single model.

Models are small and epochs few so the whole run takes a few minutes on one CPU core; the tables
and the exact command go to ``--results`` (default ``docs/results/methods.md``).

Usage::

    python experiments/methods.py --seeds 3
    python experiments/methods.py --seeds 1 --epochs 4 --results /tmp/methods.md   # smoke run
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

import modeconn as mc
from modeconn._src.io import atomic_write


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="seeds (and seed pairs) per table")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--epochs", type=int, default=20, help="training epochs of every model")
    p.add_argument("--swa-epochs", type=int, default=5)
    p.add_argument("--spawn", default="0,1,2,4,8", help="instability spawn epochs")
    p.add_argument("--results", type=Path, default=Path("docs/results/methods.md"))
    return p.parse_args(argv)


def ms(values: Sequence[float], scale: float = 1.0, digits: int = 3) -> str:
    """``mean ± std`` (sample std; 0 for one value)."""
    v = [x * scale for x in values]
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{statistics.fmean(v):.{digits}f} ± {sd:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


class Setup:
    def __init__(self, args: argparse.Namespace) -> None:
        torch.set_num_threads(1)
        self.args = args
        self.splits = mc.data.load("mnist1d")
        self.cache: dict[tuple[int, str], torch.nn.Module] = {}

    def init(self, seed: int) -> torch.nn.Module:
        s = self.splits
        a = self.args
        return mc.models.create("mlp", input_shape=s.input_shape, num_classes=s.num_classes,
                                width=a.width, depth=a.depth, seed=seed)  # fmt: skip

    def trained(self, seed: int, optimizer: str = "sgd") -> torch.nn.Module:
        key = (seed, optimizer)
        if key not in self.cache:
            r = mc.train(self.init(seed), self.splits, epochs=self.args.epochs,
                         optimizer=optimizer, seed=seed, progress=False)  # fmt: skip
            self.cache[key] = r.model
        return self.cache[key]

    def test(self, model: torch.nn.Module, state: Any = None) -> mc.Metrics:
        return mc.evaluate(model, self.splits.test, state=state)

    def train_loss(self, model: torch.nn.Module, state: Any = None) -> float:
        return mc.evaluate(model, self.splits.train, state=state).loss

    def line(self, a: torch.nn.Module, b: torch.nn.Module) -> mc.PathEvaluation:
        return mc.evaluate_path(a, mc.LinearPath(a.state_dict(), b.state_dict()), self.splits,
                                ts=25, progress=False)  # fmt: skip


def sam_swa(s: Setup) -> str:
    rows: dict[str, list[tuple[float, float]]] = {}
    for seed in range(s.args.seeds):
        for opt in ("sgd", "sam"):
            base = s.trained(seed, opt)
            avg = mc.swa(base, s.splits, epochs=s.args.swa_epochs, lr=0.05, optimizer=opt,
                         seed=seed, progress=False)  # fmt: skip
            for name, net in ((opt.upper(), base), (f"{opt.upper()} + SWA", avg)):
                m = s.test(net)
                rows.setdefault(name, []).append((m.accuracy, m.loss))
    return table(
        ["training", "test accuracy (%)", "test loss"],
        [[k, ms([a for a, _ in v], 100, 1), ms([l for _, l in v])] for k, v in rows.items()],
    )


def instability(s: Setup) -> str:
    spawn = [int(k) for k in s.args.spawn.split(",") if int(k) < s.args.epochs]
    results = [
        mc.instability(s.init(seed), s.splits, spawn=spawn, epochs=s.args.epochs, seed=seed,
                       seeds=(100 + seed, 200 + seed), progress=False)  # fmt: skip
        for seed in range(s.args.seeds)
    ]
    rows = []
    for i, k in enumerate(spawn):
        rows.append([
            str(k), ms([r.barrier[i] for r in results]),
            ms([r.error_barrier[i] for r in results], 100, 2),
            ms([sum(r.child_accuracy[i]) / 2 for r in results], 100, 1),
        ])  # fmt: skip
    return table(["spawn epoch k", "loss barrier (train)", "error barrier (test, %)",
                  "children test acc (%)"], rows)  # fmt: skip


def _pairs(s: Setup) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    return [(s.trained(2 * i), s.trained(2 * i + 1)) for i in range(s.args.seeds)]


def autoneb(s: Setup) -> str:
    rows: dict[str, dict[str, list[float]]] = {}
    for a, b in _pairs(s):
        t0 = time.perf_counter()
        chain = mc.autoneb(a, b, s.splits, progress=False)
        took = time.perf_counter() - t0
        for name, ev, extra in (
            ("linear", s.line(a, b), {}),
            ("AutoNEB", mc.evaluate_path(a, chain, s.splits, ts=4 * chain.num_points,
                                         progress=False),
             {"pivots": chain.num_points - 2, "time": took}),
        ):  # fmt: skip
            r = rows.setdefault(name, {})
            for key, val in {
                "max train loss": ev.summary("loss", "train")["max"],
                "loss barrier": ev.barrier("loss", "train"),
                "error barrier": ev.barrier("error", "test") * 100,
                "min test acc": ev.summary("accuracy", "test")["min"] * 100,
                **extra,
            }.items():
                r.setdefault(key, []).append(float(val))
    cols = ["max train loss", "loss barrier", "error barrier", "min test acc"]
    def opt(r: dict[str, list[float]], key: str) -> str:
        return ms(r[key], 1, 1) if key in r else ""

    out = [[name] + [ms(r[c], 1, 3 if "loss" in c else 1) for c in cols]
           + [opt(r, "pivots"), opt(r, "time")] for name, r in rows.items()]  # fmt: skip
    return table(["path", "max train loss", "loss barrier (train)", "error barrier (test, %)",
                  "min test acc (%)", "inner pivots", "time (s)"], out)  # fmt: skip


def simplexes(s: Setup) -> str:
    rows: dict[str, dict[str, list[float]]] = {}
    for i, (a, b) in enumerate(_pairs(s)):
        ev = s.line(a, b)
        ends = [s.test(a).accuracy, s.test(b).accuracy]
        lin = rows.setdefault("linear path (25 points)", {})
        lin.setdefault("worst", []).append(ev.summary("loss", "train")["max"])
        lin.setdefault("mean", []).append(ev.summary("loss", "train")["mean"])
        lin.setdefault("acc", []).append(ev.summary("accuracy", "test")["mean"] * 100)
        lin.setdefault("ens", []).append(float("nan"))
        lin.setdefault("end", []).append(100 * sum(ends) / 2)
        for k in (1, 2, 3):
            sx = mc.fit_simplex(a, b, s.splits, extra_vertices=k, epochs=s.args.epochs // 2,
                                seed=i, progress=False)  # fmt: skip
            pts = sx.sample(25, seed=i)
            losses = [s.train_loss(a, sx.state(c)) for c in pts]
            accs = [s.test(a, sx.state(c)).accuracy for c in pts]
            ens = mc.simplex_ensemble(a, sx, s.splits.test, samples=5, seed=i)
            r = rows.setdefault(f"SPRO, {k} extra vertex(es) (25 random points)", {})
            for key, val in (("worst", max(losses)), ("mean", statistics.fmean(losses)),
                             ("acc", 100 * statistics.fmean(accs)), ("ens", 100 * ens.accuracy),
                             ("end", 100 * sum(ends) / 2)):  # fmt: skip
                r.setdefault(key, []).append(val)
    out = [[name, ms(r["worst"]), ms(r["mean"]), ms(r["acc"], 1, 1),
            "" if any(v != v for v in r["ens"]) else ms(r["ens"], 1, 1), ms(r["end"], 1, 1)]
           for name, r in rows.items()]  # fmt: skip
    return table(["points", "max train loss", "mean train loss", "mean test acc (%)",
                  "5-point ensemble acc (%)", "endpoints' test acc (%)"], out)  # fmt: skip


def subspaces(s: Setup) -> str:
    rows: dict[str, list[float]] = {}
    for seed in range(s.args.seeds):
        net = s.init(10 + seed)
        single = mc.train(net, s.splits, epochs=s.args.epochs, seed=seed, progress=False)
        rows.setdefault(f"single model, {s.args.epochs} epochs", []).append(
            single.metrics["test_accuracy"])
        for mult in (1, 2):
            line = mc.fit_subspace(net, s.splits, kind="line", epochs=mult * s.args.epochs,
                                   lr=0.2, seed=seed, progress=False)  # fmt: skip
            ev = mc.evaluate_path(net, line, s.splits, ts=[0.0, 0.5, 1.0], progress=False)
            acc = ev.values("accuracy", "test").tolist()
            for where, v in zip(("α = 0", "α = ½", "α = 1"), acc, strict=True):
                rows.setdefault(f"line, {mult * s.args.epochs} epochs, {where}", []).append(v)
    return table(["network", "test accuracy (%)"], [[k, ms(v, 100, 1)] for k, v in rows.items()])


SECTIONS: dict[str, tuple[str, Callable[[Setup], str], str]] = {
    "sam_swa": ("SAM and SWA", sam_swa,
                "Each model trained `--epochs` epochs (`mc.train` defaults, cosine lr 0.1); SAM: "
                "`optimizer='sam'`, ρ = 0.05; SWA: `mc.swa(model, epochs=--swa-epochs, lr=0.05)` "
                "from the trained model (extra epochs)."),
    "instability": ("Instability analysis", instability,
                    "`mc.instability(init, spawn=..., epochs=--epochs)`, children seeds (100 + s, "
                    "200 + s); barriers at 25 points on the line between the children."),
    "autoneb": ("AutoNEB", autoneb,
                "Pairs of independently trained modes (seeds 2i, 2i + 1); `mc.autoneb` defaults "
                "(3 pivots, 4 cycles × 200 steps, lr 0.1 halved each cycle, equal-spacing "
                "redistribution, up to 2 insertions per cycle); chain evaluated at 4 points per "
                "pivot."),
    "simplex": ("Simplexes (SPRO)", simplexes,
                "Same pairs; `mc.fit_simplex(extra_vertices=k, epochs=--epochs/2)`, λ = 1e-3; 25 "
                "random points of the complex (`Simplex.sample`); ensemble: "
                "`mc.simplex_ensemble(samples=5)`."),
    "subspace": ("Learning subspaces", subspaces,
                 "`mc.fit_subspace(kind='line', lr=0.2, β=1)` from one initialisation (the second "
                 "endpoint re-initialised) vs `mc.train` of the same initialisation."),
}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    setup = Setup(args)
    t0 = time.perf_counter()
    parts = []
    for title, fn, note in SECTIONS.values():
        t = time.perf_counter()
        body = fn(setup)
        parts.append(f"## {title}\n\n{note}\n\n{body}\n")
        print(f"{title}: {time.perf_counter() - t:.0f} s\n{body}\n", flush=True)
    cmd = "python experiments/methods.py " + " ".join(map(shlex.quote, argv or sys.argv[1:]))
    text = (
        "# SAM, SWA, instability, AutoNEB, simplexes and subspaces on MNIST-1D\n\n"
        f"Produced by `experiments/methods.py` (issue 12). Command:\n\n```\n{cmd.strip()}\n```\n\n"
        f"Setup: mlp (width {args.width}, depth {args.depth}), MNIST-1D (4000 train / 1000 test), "
        f"{args.epochs} training epochs, {args.seeds} seeds (pairs (2i, 2i + 1) where two modes "
        "are needed); values: mean ± std over seeds; losses in nats, accuracies and error "
        f"barriers in %. Run time: {(time.perf_counter() - t0) / 60:.1f} min on one CPU thread."
        "\n\n" + "\n".join(parts)
    )
    with atomic_write(args.results, "w") as f:
        f.write(text)
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
