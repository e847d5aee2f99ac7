"""Paths benchmark: a curve-training epoch vs a plain training epoch, and evaluate_path's overhead.

1. One epoch of ``train_curve`` (Bezier, one bend; θ(t) built per minibatch, forward through
   ``torch.func.functional_call``) vs one epoch of plain SGD on the same model, data, batches.
2. ``evaluate_path`` (25 points, train + test splits) vs the sum of the forward passes it needs:
   for each t the evaluation passes over both splits (plus, for BatchNorm models, the statistics
   pass over the training split), timed bare on a module holding θ(t).
Ratios are measured within one run (best of 3) in CPU time of this process with one torch
thread (``time.process_time``), which other processes on a shared machine disturb much less
than wall-clock time.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import modeconn as mc
from modeconn._src.evaluation import as_loader, with_state
from modeconn._src.paths import initial_curve, train_curve
from modeconn._src.state import lerp


def _best(fn: Callable[[], object], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return min(times)


def _plain_epoch(model: torch.nn.Module, data: object, batch_size: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for x, y in as_loader(data, batch_size=batch_size, shuffle=True, seed=0):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _curve_epoch(a: torch.nn.Module, b: torch.nn.Module, data: object, batch_size: int) -> None:
    curve = initial_curve(a, a.state_dict(), b.state_dict())
    train_curve(a, curve, data, epochs=1, lr=0.05, batch_size=batch_size, progress=False)


def _forwards(
    model: torch.nn.Module, path: mc.BezierCurve, splits: mc.data.Splits, ts: int, bn: bool
) -> None:
    batches = {
        name: [(x, y) for x, y in as_loader(d, batch_size=1024)]
        for name, d in (("train", splits.train), ("test", splits.test))
    }
    states = [path.state(t) for t in torch.linspace(0, 1, ts).tolist()]
    nets = [with_state(model, s).eval() for s in states]

    def run() -> None:
        with torch.no_grad():
            for net in nets:
                if bn:  # the statistics pass: BN layers in train mode over the train split
                    net.train()
                    for x, _ in batches["train"]:
                        net(x)
                    net.eval()
                for split in batches.values():
                    for x, _ in split:
                        net(x)

    return run


def _pair(name: str, splits: mc.data.Splits, **kw: object) -> tuple[torch.nn.Module, ...]:
    return tuple(
        mc.models.create(
            name, input_shape=splits.input_shape, num_classes=splits.num_classes, seed=s, **kw
        )
        for s in (0, 1)
    )


def main() -> None:
    torch.set_num_threads(1)
    mnist = mc.data.load("mnist1d")
    digits = mc.data.load("digits")
    cases = [("mlp", mnist, {}), ("cnn1d", mnist, {}), ("resnet", digits, {})]
    print("1) curve-training epoch vs plain training epoch (batch 128, best of 3, CPU time)")
    for name, splits, kw in cases:
        a, b = _pair(name, splits, **kw)
        plain = _best(
            lambda a=a, s=splits: _plain_epoch(with_state(a, a.state_dict()), s.train, 128)
        )
        curve = _best(lambda a=a, b=b, s=splits: _curve_epoch(a, b, s.train, 128))
        print(
            f"   {name:8s} plain {plain * 1e3:7.1f} ms   curve {curve * 1e3:7.1f} ms   "
            f"ratio {curve / plain:.2f}"
        )
    print("2) evaluate_path (25 points, train+test) vs the bare forward passes it needs")
    for name, splits, kw in cases:
        a, b = _pair(name, splits, **kw)
        m = lerp(a.state_dict(), b.state_dict(), 0.5)
        path = mc.BezierCurve([a.state_dict(), m, b.state_dict()])
        bn = mc.needs_bn_reset(a)
        fwd = _best(_forwards(a, path, splits, 25, bn))
        ev = _best(lambda a=a, p=path, s=splits: mc.evaluate_path(a, p, s, ts=25, progress=False))
        print(
            f"   {name:8s} forwards {fwd * 1e3:7.1f} ms   evaluate_path {ev * 1e3:7.1f} ms   "
            f"ratio {ev / fwd:.2f}{'  (with BN reset per t)' if bn else ''}"
        )


if __name__ == "__main__":
    main()
