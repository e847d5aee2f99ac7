"""Methods benchmark: what SAM, SWA, simplex training and an AutoNEB step cost relative to SGD.

All on an MNIST-1D MLP (width 128, depth 2), one torch thread, CPU time of this process
(``time.process_time``, best of 3), as ratios to one epoch of plain ``mc.train`` SGD:

1. one epoch of ``mc.train(optimizer="sam")`` (two forward/backward passes per step);
2. one epoch of ``mc.swa`` (SGD + a running mean per epoch);
3. one epoch of ``mc.fit_simplex(extra_vertices=2)`` (θ(c) built per minibatch + log volume);
4. one epoch's worth of minibatches of AutoNEB with 3 pivots (per step: 3 forward/backward
   passes + 2 endpoint forwards + the redistribution).

Each figure is a whole call, fixed costs included (copies, the final train/test evaluation of
``mc.train``, AutoNEB's pivot evaluation), so per-step ratios are higher than the printed ones
(measured once: SAM 1.44x, SWA 1.02x, SPRO 1.99x, AutoNEB 2.43x).
"""

from __future__ import annotations

import torch

import modeconn as mc

from . import best_time as _best


def main() -> None:
    torch.set_num_threads(1)
    s = mc.data.load("mnist1d")

    def make(seed: int) -> torch.nn.Module:
        return mc.models.create("mlp", input_shape=s.input_shape, num_classes=s.num_classes,
                                width=128, depth=2, seed=seed)  # fmt: skip

    a, b = make(0), make(1)
    steps = -(-len(s.train) // 128)
    base = _best(lambda: mc.train(a, s.train, epochs=1, progress=False))
    rows = {
        "SAM epoch": _best(lambda: mc.train(a, s.train, epochs=1, optimizer="sam",
                                            progress=False)),  # fmt: skip
        "SWA epoch": _best(lambda: mc.swa(a, s.train, epochs=1, progress=False)),
        "SPRO epoch (2 extra vertices)": _best(
            lambda: mc.fit_simplex(a, b, s.train, extra_vertices=2, epochs=1, progress=False)
        ),
        f"AutoNEB, {steps} steps, 3 pivots": _best(
            lambda: mc.autoneb(a, b, s.train, pivots=3, cycles=1, steps=steps, progress=False)
        ),
    }
    print(f"SGD epoch: {base:.3f} s CPU ({steps} steps of 128)")
    for name, t in rows.items():
        print(f"{name:>34}: {t / base:5.2f}x SGD epoch")


if __name__ == "__main__":
    main()
