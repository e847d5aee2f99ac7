"""Curve experiments on MNIST-1D: does aligning the endpoints help low-loss curves? (issue 5).

Reproduces, on small data, the pattern of Tatro et al., "Optimizing Mode Connectivity via Neuron
Alignment" (NeurIPS 2020) and Garipov et al. 2018. For each seed pair (A, B) of MLPs:

- linear path, naive and after activation matching (neuron alignment);
- quadratic Bezier curves (one bend), all trained for the same epochs: unaligned, aligned by
  activation matching, and PAM-aligned (proximal alternating minimisation over relaxed
  permutations, started from the identity and from the activation-matching permutation);
- the fraction of hidden units on which PAM's permutation agrees with activation matching (the
  paper's claim: alignment is locally optimal, so PAM started there stays there);
- robust endpoints (PGD-ℓ∞ training): robust accuracy along the linear path and along unaligned
  vs aligned (on adversarial inputs) curves trained adversarially.

Every model, permutation, curve and evaluation is cached under ``--out`` (default
``runs/curves``), so an interrupted run resumes where it stopped (curve training resumes from its
last epoch). The tables (mean ± std over pairs) and the exact command go to ``--results``
(default ``docs/results/curves.md``).

Usage::

    python experiments/curves.py --pairs 3
    python experiments/curves.py --pairs 1 --model-epochs 5 --curve-epochs 3 --out /tmp/smoke
"""

from __future__ import annotations

import argparse
import json
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
from modeconn._src.align.api import resolve_spec
from modeconn._src.evaluation import with_state
from modeconn._src.io import atomic_write
from modeconn._src.progress import progress_bar

# PGD-ℓ∞ for MNIST-1D. Its inputs are standardised (per-feature std ≈ 1), so ε = 0.1 is a tenth
# of a feature's spread: about the relative size of the seed paper's 8/255 on CIFAR pixels
# (std ≈ 0.25). Step ε/4 and 5 steps with a random start, as the seed paper's 2/255 and 5 steps.
PGD = {"eps": 0.1, "step": 0.025, "steps": 5}

CLEAN_METHODS = {
    "linear": "Linear path, unaligned",
    "linear_act": "Linear path, activation-aligned",
    "bezier": "Bezier, unaligned",
    "bezier_act": "Bezier, activation-aligned",
    "bezier_pam": "Bezier, PAM (from identity)",
    "bezier_pam_act": "Bezier, PAM (from activation)",
}
ROBUST_METHODS = {
    "linear": "Linear path, unaligned",
    "linear_act": "Linear path, aligned (adversarial inputs)",
    "bezier": "Bezier (adversarial training), unaligned",
    "bezier_act": "Bezier (adversarial training), aligned",
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=3, help="number of seed pairs (seeds 2i, 2i+1)")
    p.add_argument("--model", default="mlp", help="zoo model name")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--model-epochs", type=int, default=30, help="endpoint training epochs")
    p.add_argument("--curve-epochs", type=int, default=20, help="epochs for every curve")
    p.add_argument("--pam-epochs", type=int, default=20, help="PAM phase-1 epochs")
    p.add_argument("--pam-lr", type=float, default=1.0, help="PAM phase-1 learning rate")
    p.add_argument("--ts", type=int, default=25, help="points evaluated along each path")
    p.add_argument("--no-robust", action="store_true", help="skip the robust (PGD) part")
    p.add_argument("--robust-pairs", type=int, default=None, help="default: --pairs")
    p.add_argument("--out", default="runs/curves", help="cache directory")
    p.add_argument("--results", default="docs/results/curves.md", help="markdown output")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


class Runner:
    """Cached steps of the experiment: each result is stored under ``out`` once computed."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.splits = mc.data.load("mnist1d")
        self.model_kwargs = {"width": args.width, "depth": args.depth}

    # --- endpoints ---------------------------------------------------------------------------
    def endpoint(self, seed: int, robust: bool) -> nn.Module:
        tag = "robust" if robust else "clean"
        name = f"{self.args.model}_{tag}_e{self.args.model_epochs}_s{seed}.safetensors"
        path = self.out / "models" / name
        if path.exists():
            return mc.load_checkpoint(path).build()
        s = self.splits
        model = mc.models.create(self.args.model, input_shape=s.input_shape,
                                 num_classes=s.num_classes, seed=seed, **self.model_kwargs)
        res = mc.train(model, s, epochs=self.args.model_epochs, seed=seed, progress=False,
                       adversarial=PGD if robust else None)
        mc.save_checkpoint(path, res.model, meta={"seed": seed, "robust": robust,
                                                  "metrics": res.metrics})
        return res.model.eval()

    # --- permutations ------------------------------------------------------------------------
    def permutation(self, key: str, compute: Callable[[], mc.Permutation]) -> mc.Permutation:
        path = self.out / "perms" / f"{key}.json"
        if path.exists():
            d = json.loads(path.read_text())
            return mc.Permutation({g: torch.tensor(v) for g, v in d["perm"].items()},
                                  info=d.get("info", {}))
        perm = compute()
        plain = (int, float, str, list, dict)
        info = {k: v for k, v in perm.info.items() if isinstance(v, plain)}
        with atomic_write(path, "w") as f:
            json.dump({"perm": {g: p.tolist() for g, p in perm.items()}, "info": info}, f)
        return perm

    # --- curves ------------------------------------------------------------------------------
    def curve(self, key: str, a: nn.Module, b_state: dict, input_transform: Any = None) -> Any:
        d = self.out / "curves" / key
        file = d / "curve.safetensors"
        if file.exists():
            return mc.load_path(file)
        b = with_state(a, b_state)
        curve = mc.fit_curve(a, b, self.splits.train, kind="bezier", bends=1,
                             epochs=self.args.curve_epochs, seed=0, checkpoint_dir=d / "ckpt",
                             resume=True, progress=False, input_transform=input_transform)
        curve.save(file)
        return curve

    # --- evaluation --------------------------------------------------------------------------
    def evaluate(self, key: str, model: nn.Module, path: Any, robust: bool) -> dict[str, float]:
        file = self.out / "evals" / f"{key}.json"
        if file.exists():
            return json.loads(file.read_text())
        ev = mc.evaluate_path(model, path, self.splits, ts=self.args.ts, progress=False,
                              robust=PGD if robust else None)
        acc = ev.summary("accuracy", "test")
        loss = ev.summary("loss", "test")
        out = {
            "mean_acc": acc["mean"], "min_acc": acc["min"], "max_loss": loss["max"],
            "loss_barrier": ev.barrier("loss", "test"),
            "error_barrier": ev.barrier("error", "test"),
            "train_loss_barrier": ev.barrier("loss", "train"),
        }
        if robust:
            racc = ev.summary("robust_accuracy", "test")
            out.update({"robust_mean_acc": racc["mean"], "robust_min_acc": racc["min"],
                        "robust_loss_barrier": ev.barrier("robust_loss", "test")})
        with atomic_write(file, "w") as f:
            json.dump(out, f, indent=1)
        return out


def _pgd_transform(model_fn: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # the random start is drawn from the global RNG, which fit_curve seeds per epoch (resumable)
    seed = int(torch.randint(0, 2**31 - 1, ()))
    return mc.pgd_attack(model_fn, x, y, **PGD, seed=seed)


def _agreement(p: dict, q: dict) -> float:
    return sum(int((p[g] == q[g]).sum()) for g in p) / sum(len(v) for v in p.values())


def run_pair(r: Runner, i: int, advance: Callable[[str | None], None]) -> dict[str, Any]:
    """The clean experiment for seed pair i: paths, curves, PAM agreement."""
    a, b = r.endpoint(2 * i, False), r.endpoint(2 * i + 1, False)
    train = r.splits.train
    spec = resolve_spec(a, None, data=train)
    sa, sb = a.state_dict(), b.state_dict()
    act = r.permutation(f"clean_p{i}_act", lambda: mc.activation_matching(a, b, train, spec=spec))
    pam_opts = {"epochs": r.args.pam_epochs, "lr": r.args.pam_lr, "progress": False}
    pam_id = r.permutation(f"clean_p{i}_pam_e{r.args.pam_epochs}",
                           lambda: mc.pam_align(a, b, train, spec=spec, **pam_opts))
    pam_act = r.permutation(f"clean_p{i}_pam_act_e{r.args.pam_epochs}",
                            lambda: mc.pam_align(a, b, train, spec=spec, init=act, **pam_opts))
    advance("alignments")
    b_act = mc.apply_permutation(spec, act, sb)
    paths = {
        "linear": mc.LinearPath(sa, sb),
        "linear_act": mc.LinearPath(sa, b_act),
        "bezier": r.curve(f"clean_p{i}_bezier_e{r.args.curve_epochs}", a, sb),
        "bezier_act": r.curve(f"clean_p{i}_bezier_act_e{r.args.curve_epochs}", a, b_act),
        "bezier_pam": r.curve(f"clean_p{i}_bezier_pam_e{r.args.curve_epochs}", a,
                              mc.apply_permutation(spec, pam_id, sb)),
        "bezier_pam_act": r.curve(f"clean_p{i}_bezier_pam_act_e{r.args.curve_epochs}", a,
                                  mc.apply_permutation(spec, pam_act, sb)),
    }
    advance("curves")
    res = {name: r.evaluate(f"clean_p{i}_{name}_e{r.args.curve_epochs}", a, p, False)
           for name, p in paths.items()}
    res["endpoints"] = {"acc_a": mc.evaluate(a, r.splits.test).accuracy,
                        "acc_b": mc.evaluate(b, r.splits.test).accuracy}
    res["pam"] = {
        "agree_pam_act_vs_act": _agreement(pam_act, act),
        "agree_pam_id_vs_act": _agreement(pam_id, act),
        "agree_pam_id_vs_identity": _agreement(pam_id, mc.identity_permutation(spec)),
        "objective_pam_id": pam_id.info.get("objective"),
        "objective_pam_act": pam_act.info.get("objective"),
        "objective_act": pam_act.info.get("objectives", {}).get("previous"),
        "objective_identity": pam_id.info.get("objectives", {}).get("previous"),
    }
    advance("evaluations")
    return res


def run_robust_pair(r: Runner, i: int, advance: Callable[[str | None], None]) -> dict[str, Any]:
    """The robust experiment for seed pair i: PGD-trained endpoints, adversarial curves."""
    a, b = r.endpoint(2 * i, True), r.endpoint(2 * i + 1, True)
    train = r.splits.train
    spec = resolve_spec(a, None, data=train)
    sa, sb = a.state_dict(), b.state_dict()
    act = r.permutation(f"robust_p{i}_act_adv", lambda: mc.activation_matching(
        a, b, train, spec=spec, adversarial=PGD))
    advance("robust alignment")
    b_act = mc.apply_permutation(spec, act, sb)
    ep = r.args.curve_epochs
    paths = {
        "linear": mc.LinearPath(sa, sb),
        "linear_act": mc.LinearPath(sa, b_act),
        "bezier": r.curve(f"robust_p{i}_bezier_e{ep}", a, sb, _pgd_transform),
        "bezier_act": r.curve(f"robust_p{i}_bezier_act_e{ep}", a, b_act, _pgd_transform),
    }
    advance("robust curves")
    res = {name: r.evaluate(f"robust_p{i}_{name}_e{ep}", a, p, True) for name, p in paths.items()}
    res["endpoints"] = {"acc_a": mc.evaluate(a, r.splits.test).accuracy,
                        "robust_acc_a": mc.robust_evaluate(a, r.splits.test, PGD).accuracy}
    advance("robust evaluations")
    return res


def _ms(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    v = [x * scale for x in values]
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{statistics.mean(v):.{digits}f} ± {sd:.{digits}f}"


def render(args: argparse.Namespace, clean: list[dict], robust: list[dict], command: str,
           seconds: float) -> str:
    lines = [
        "# Curves between independently trained MLPs on MNIST-1D",
        "",
        "Produced by `experiments/curves.py` (issue 5). Command:",
        "",
        "```",
        command,
        "```",
        "",
        f"Setup: {args.model} (width {args.width}, depth {args.depth}), MNIST-1D (4000 train / "
        f"1000 test), endpoints trained {args.model_epochs} epochs with `mc.train` defaults; "
        f"every curve is a quadratic Bezier (one bend) trained {args.curve_epochs} epochs with "
        f"`mc.fit_curve` defaults; PAM phase 1: {args.pam_epochs} epochs, lr {args.pam_lr}. "
        f"Paths evaluated at {args.ts} evenly spaced t on the test split. Pairs: seeds (2i, 2i+1), "
        f"i < {args.pairs}. Values: mean ± std over pairs; accuracies and barriers in %, losses "
        f"in nats. Run time: {seconds / 60:.1f} min.",
        "",
    ]
    if clean:
        ends = [e["endpoints"][k] for e in clean for k in ("acc_a", "acc_b")]
        lines += [
            f"## Clean endpoints (test accuracy {_ms(ends)} %)",
            "",
            "| path | mean acc | min acc | max loss | loss barrier | error barrier |",
            "|---|---|---|---|---|---|",
        ]
        for key, label in CLEAN_METHODS.items():
            rows = [c[key] for c in clean]
            lines.append(
                f"| {label} | {_ms([r['mean_acc'] for r in rows])} "
                f"| {_ms([r['min_acc'] for r in rows])} "
                f"| {_ms([r['max_loss'] for r in rows], 1.0, 3)} "
                f"| {_ms([r['loss_barrier'] for r in rows], 1.0, 3)} "
                f"| {_ms([r['error_barrier'] for r in rows])} |"
            )
        pam = [c["pam"] for c in clean]
        lines += [
            "",
            "Loss barrier: max over t of the loss above the straight line between the endpoints' "
            "losses; where it is 0, the max loss along the path is an endpoint's.",
            "",
            "### PAM vs activation matching (fraction of hidden units assigned alike)",
            "",
            "| PAM start | agrees with activation matching | PAM objective | start objective |",
            "|---|---|---|---|",
            f"| activation matching | {_ms([p['agree_pam_act_vs_act'] for p in pam])} % "
            f"| {_ms([p['objective_pam_act'] for p in pam], 1.0, 3)} "
            f"| {_ms([p['objective_act'] for p in pam], 1.0, 3)} |",
            f"| identity | {_ms([p['agree_pam_id_vs_act'] for p in pam])} % "
            f"| {_ms([p['objective_pam_id'] for p in pam], 1.0, 3)} "
            f"| {_ms([p['objective_identity'] for p in pam], 1.0, 3)} |",
            "",
            "Objective: mean train cross-entropy on the segment (1−t)θ_A + t·π(θ_B) at "
            "t ∈ {¼, ½, ¾} (PAM's rounding criterion). PAM from the identity kept "
            f"{_ms([p['agree_pam_id_vs_identity'] for p in pam])} % of units in place.",
            "",
        ]
    if robust:
        ends = [e["endpoints"] for e in robust]
        lines += [
            f"## Robust endpoints (PGD-ℓ∞ ε = {PGD['eps']}, step {PGD['step']}, "
            f"{PGD['steps']} steps, random start)",
            "",
            f"Endpoints: clean test accuracy {_ms([e['acc_a'] for e in ends])} %, robust "
            f"{_ms([e['robust_acc_a'] for e in ends])} % (model A of each pair). Curves trained "
            "on PGD inputs against the current point of the curve; the aligned curve's endpoint B "
            "is permuted by activation matching on adversarial inputs.",
            "",
            "| path | clean mean acc | clean min acc | robust mean acc | robust min acc "
            "| robust loss barrier |",
            "|---|---|---|---|---|---|",
        ]
        for key, label in ROBUST_METHODS.items():
            rows = [c[key] for c in robust]
            lines.append(
                f"| {label} | {_ms([r['mean_acc'] for r in rows])} "
                f"| {_ms([r['min_acc'] for r in rows])} "
                f"| {_ms([r['robust_mean_acc'] for r in rows])} "
                f"| {_ms([r['robust_min_acc'] for r in rows])} "
                f"| {_ms([r['robust_loss_barrier'] for r in rows], 1.0, 3)} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the experiment (cached under ``--out``) and write the markdown tables."""
    args = parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    start = time.time()
    r = Runner(args)
    n_robust = 0 if args.no_robust else (args.robust_pairs if args.robust_pairs is not None
                                         else args.pairs)
    total = 3 * args.pairs + 3 * n_robust
    clean, robust = [], []
    with progress_bar(not args.no_progress, total=total, description="curves") as advance:
        for i in range(args.pairs):
            clean.append(run_pair(r, i, lambda t, i=i: advance(f"pair {i}: {t}")))
        for i in range(n_robust):
            robust.append(run_robust_pair(r, i, lambda t, i=i: advance(f"robust pair {i}: {t}")))
    seconds = time.time() - start
    command = "python experiments/curves.py " + " ".join(shlex.quote(a) for a in (
        sys.argv[1:] if argv is None else argv))
    text = render(args, clean, robust, command.strip(), seconds)
    with atomic_write(args.results, "w") as f:
        f.write(text)
    with atomic_write(Path(args.out) / "results.json", "w") as f:
        json.dump({"args": vars(args), "clean": clean, "robust": robust, "seconds": seconds}, f,
                  indent=1)
    print(text)


if __name__ == "__main__":
    main()
