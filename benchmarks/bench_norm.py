"""Normalisation repair and learned alignments: midpoint barriers on MNIST-1D MLP pairs.

Two MLPs (zoo defaults, 10 epochs, seeds 0 and 1) are aligned (identity, weight matching, STE,
Sinkhorn with the weight and the task loss); for each alignment the test-set barrier at the
midpoint, ``L(1/2 A + 1/2 pi(B)) - (L(A) + L(B)) / 2`` (loss, and error in points), is printed
before and after the repair: REPAIR for the plain MLP, BatchNorm reset for the BN MLP.
"""

from __future__ import annotations

import time

import torch
from torch import nn

import modeconn as mc
from modeconn._src.evaluation import evaluate, with_state
from modeconn._src.state import lerp


def _barrier(a: nn.Module, b: nn.Module, mid: nn.Module, test: object) -> tuple[float, float]:
    ma, mb, mm = (evaluate(m, test) for m in (a, b, mid))
    loss = mm.loss - (ma.loss + mb.loss) / 2
    err = (1 - mm.accuracy) - ((1 - ma.accuracy) + (1 - mb.accuracy)) / 2
    return loss, 100 * err


def _run(norm: str | None, splits: mc.data.Splits) -> None:
    kw = {"norm": norm} if norm else {}
    a, b = (
        mc.train(
            mc.models.create("mlp", input_shape=splits.input_shape, seed=s, **kw),
            splits,
            epochs=10,
            seed=s,
            progress=False,
        ).model
        for s in (0, 1)
    )
    spec = mc.infer_spec(a, splits.train.tensors[0][:2])
    ea, eb = evaluate(a, splits.test), evaluate(b, splits.test)
    label = "MLP+BN" if norm else "MLP"
    fix_name = "BN reset" if norm else "REPAIR"
    print(
        f"{label}: endpoints test loss {ea.loss:.3f} / {eb.loss:.3f}, "
        f"accuracy {ea.accuracy:.3f} / {eb.accuracy:.3f}"
    )
    methods = {
        "identity": lambda: mc.identity_permutation(spec),
        "weight": lambda: mc.weight_matching(spec, a.state_dict(), b.state_dict()),
        "ste (2 epochs)": lambda: mc.ste_matching(a, b, splits.train, spec=spec, epochs=2),
        "sinkhorn weight": lambda: mc.sinkhorn_matching(a, b, spec=spec, steps=300),
        "sinkhorn task": lambda: mc.sinkhorn_matching(
            a, b, splits.train, spec=spec, loss="task", steps=300
        ),
    }
    for name, fn in methods.items():
        t0 = time.perf_counter()
        perm = fn()
        dt = time.perf_counter() - t0
        bb = with_state(b, mc.apply_permutation(spec, perm, b.state_dict()))
        mid = with_state(a, lerp(a.state_dict(), bb.state_dict(), 0.5))
        t0 = time.perf_counter()
        fixed = mc.reset_bn(mid, splits.train) if norm else mc.repair(a, bb, mid, splits.train)
        dt_fix = time.perf_counter() - t0
        lb, eb_ = _barrier(a, bb, mid, splits.test)
        la, ea_ = _barrier(a, bb, fixed, splits.test)
        print(
            f"  {name:16s} ({dt:5.2f} s): barrier loss {lb:6.3f} -> {la:6.3f}, "
            f"error {eb_:5.1f} -> {ea_:5.1f} points after {fix_name} ({dt_fix:.2f} s)"
        )


def main() -> None:
    print(f"torch threads: {torch.get_num_threads()}")
    splits = mc.data.load("mnist1d")
    _run(None, splits)
    _run("bn", splits)


if __name__ == "__main__":
    main()
