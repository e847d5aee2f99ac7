"""Paths benchmark: a curve-training epoch vs a plain training epoch, and evaluate_path's overhead.

1. One epoch of ``train_curve`` (Bezier, one bend; θ(t) built per minibatch, forward through
   ``torch.func.functional_call``) vs one epoch of plain SGD on the same model, data, batches.
2. ``evaluate_path`` (25 points, train + test splits) vs the sum of the forward passes it needs:
   for each t the evaluation passes over both splits (plus, for BatchNorm models, the statistics
   pass over the training split), timed bare on a module holding θ(t).
3. Many networks of one architecture, side by side in one run: ``evaluate_path`` (a Bezier
   curve), ``plane`` (the plane through three models) and ``curve_ensemble``, each against
   (a) a plain per-point loop, as a user writes it (build θ, ``load_state_dict``, iterate a
   DataLoader computing loss and accuracy) and (b) the bare forward passes alone (θ loaded
   outside the clock), at small scale (MNIST-1D MLP) and GPT-2-ish scale (the zoo transformer at
   width 768, 12 layers, 12 heads: 85M parameters, on 256 examples of 16 tokens).
Ratios are measured within one run (best of 3; once at GPT-2 scale) in CPU time of this process
with one torch thread (``time.process_time``), which other processes on a shared machine disturb
much less than wall-clock time.
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

from . import best_time as _best


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


def _plain_loop(
    model: torch.nn.Module, makers: list[Callable[[], dict]], datasets: list[object]
) -> Callable[[], None]:
    """What a user writes: per point, build θ, load it, iterate a DataLoader (loss, accuracy)."""
    net = with_state(model, model.state_dict()).eval()

    def run() -> None:
        with torch.no_grad():
            for make in makers:
                net.load_state_dict(make())
                for d in datasets:
                    loss, correct = 0.0, 0
                    for x, y in as_loader(d, batch_size=1024):
                        out = net(x)
                        loss += float(F.cross_entropy(out, y, reduction="sum"))
                        correct += int((out.argmax(-1) == y).sum())

    return run


def _bare_forwards(
    model: torch.nn.Module, makers: list[Callable[[], dict]], datasets: list[object]
) -> float:
    """CPU seconds of the forward passes alone (θ built and loaded outside the clock)."""
    net = with_state(model, model.state_dict()).eval()
    batches = [[x for x, _ in as_loader(d, batch_size=1024)] for d in datasets]
    total = 0.0
    with torch.no_grad():
        for make in makers:
            net.load_state_dict(make())
            t0 = time.process_time()
            for split in batches:
                for x in split:
                    net(x)
            total += time.process_time() - t0
    return total


def _many_networks(
    label: str,
    a: torch.nn.Module,
    b: torch.nn.Module,
    c: torch.nn.Module,
    splits: mc.data.Splits,
    ts: int,
    grid: int,
    repeats: int,
) -> None:
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    path = mc.BezierCurve([sa, sc, sb])
    tgrid = torch.linspace(0, 1, ts).tolist()
    both = [splits.train, splits.test]
    pl = mc.landscape.plane(a, [sa, sc, sb], splits.test, grid=grid, progress=False)
    cells = [(float(x), float(y)) for y in pl.ys for x in pl.xs]
    cases = [
        (
            "evaluate_path",
            [lambda t=t: path.state(t) for t in tgrid],
            both,
            lambda: mc.evaluate_path(a, path, splits, ts=ts, progress=False),
        ),
        (
            "plane",
            [lambda x=x, y=y: pl.basis.state(x, y) for x, y in cells],
            [splits.test],
            lambda: mc.landscape.plane(a, [sa, sc, sb], splits.test, grid=grid, progress=False),
        ),
        (
            "curve_ensemble",
            [lambda t=t: path.state(t) for t in tgrid],
            [splits.test],
            lambda: mc.curve_ensemble(a, path, splits.test, ts=ts),
        ),
    ]
    for name, makers, datasets, ours in cases:
        plain = _best(_plain_loop(a, makers, datasets), repeats)
        bare = min(_bare_forwards(a, makers, datasets) for _ in range(repeats))
        mine = _best(ours, repeats)
        print(
            f"   {label:22s} {name:14s} ({len(makers):3d} points) {mine:7.2f} s   "
            f"/ plain loop {mine / plain:.2f}   / bare forwards {mine / bare:.2f}"
        )


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
    print("3) many networks: ours / a plain per-point loop (<= 1.0) and / bare forwards (<= 1.2)")
    a, b, c = (mc.models.create("mlp", input_shape=(40,), seed=s) for s in range(3))
    _many_networks("MLP (MNIST-1D)", a, b, c, mnist, ts=25, grid=11, repeats=3)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 3, 8, 8, generator=gen)  # 16 tokens each: 1k train, 3k test tokens
    y = torch.randint(0, 10, (256,), generator=gen)
    small = mc.data.Splits(
        train=torch.utils.data.TensorDataset(x[:64], y[:64]),
        test=torch.utils.data.TensorDataset(x[64:], y[64:]),
        input_shape=(3, 8, 8),
        num_classes=10,
    )
    kw = {"dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4}
    a, b, c = (
        mc.models.create("transformer", input_shape=(3, 8, 8), seed=s, **kw) for s in range(3)
    )
    _many_networks("transformer 85M", a, b, c, small, ts=5, grid=3, repeats=1)


if __name__ == "__main__":
    main()
