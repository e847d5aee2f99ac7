"""Foundation benchmark: default-settings accuracy and training time of the zoo's baselines.

The issue's acceptance thresholds: MNIST-1D ``mlp`` > 68% (the MNIST-1D paper's MLP baseline),
``cnn1d`` >= 90%; digits ``mlp`` >= 95%. Also one forward+backward step per zoo model and the
cost of a checkpoint round trip. One CPU thread (the models are tiny).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

import modeconn as mc


def main() -> None:
    torch.set_num_threads(1)
    splits = {"mnist1d": mc.data.load("mnist1d"), "digits": mc.data.load("digits")}
    print("default training (mc.train defaults: SGD 0.9, lr 0.1 cosine, 40 epochs, wd 5e-4)")
    for model, data, bar in [("mlp", "mnist1d", 0.68), ("cnn1d", "mnist1d", 0.90),
                             ("mlp", "digits", 0.95)]:  # fmt: skip
        s = splits[data]
        accs, times = [], []
        for seed in (0, 1, 2):
            net = mc.models.create(model, input_shape=s.input_shape, num_classes=s.num_classes,
                                   seed=seed)  # fmt: skip
            r = mc.train(net, s, seed=seed, progress=False)
            accs.append(r.metrics["test_accuracy"])
            times.append(r.metrics["time_s"])
        print(f"  {model:6s} on {data:8s} test acc {min(accs):.1%}..{max(accs):.1%} "
              f"(3 seeds; bar {bar:.0%})  train time {sum(times) / 3:.1f} s/run")  # fmt: skip

    print("one SGD step (batch 128), ms")
    for name in mc.models.names():
        shape = (40,) if name in ("mlp", "cnn1d", "transformer") else (1, 8, 8)
        m = mc.models.create(name, input_shape=shape, seed=0)
        x, y = torch.randn(128, *shape), torch.randint(0, 10, (128,))
        t = time.perf_counter()
        for _ in range(10):
            torch.nn.functional.cross_entropy(m(x), y).backward()
        n = sum(p.numel() for p in m.parameters())
        print(f"  {name:12s} {(time.perf_counter() - t) * 100:6.1f} ms  ({n} parameters)")

    m = mc.models.create("resnet", input_shape=(1, 8, 8), depth=20, width=4, seed=0)
    with tempfile.TemporaryDirectory() as d:
        for suffix in (".safetensors", ".pt"):
            p = Path(d) / f"m{suffix}"
            t = time.perf_counter()
            mc.save_checkpoint(p, m, meta={"seed": 0})
            mc.load_checkpoint(p).build()
            size = p.stat().st_size / 1e6
            print(f"  resnet-20x4 round trip {suffix:12s} {(time.perf_counter() - t) * 1e3:.0f} ms"
                  f" ({size:.1f} MB)")  # fmt: skip


if __name__ == "__main__":
    main()
