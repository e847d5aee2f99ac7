"""Spec inference time: a 50-block residual network and a 12-layer transformer (seconds, per block).

Reports the trace, the analysis and the optional verification (two forward passes) separately,
and the ratio to one plain forward pass, since absolute times depend on the machine's load.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

import modeconn as mc
from modeconn._src.symmetry.emit import emit_spec
from modeconn._src.symmetry.tracer import trace_model
from modeconn._src.symmetry.walk import Walk


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


class ResNet50Blocks(nn.Module):
    def __init__(self, blocks: int = 50, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(*(ResBlock(c) for _ in range(blocks)))
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(F.relu(self.stem(x))).mean((2, 3)))


def _time(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _report(name: str, model: nn.Module, x: torch.Tensor, blocks: int) -> None:
    model.eval()
    with torch.no_grad():
        fwd = _time(lambda: model(x))
    tr_t = _time(lambda: trace_model(model, x))
    tr = trace_model(model, x)

    def analyse() -> None:
        an = Walk(model, tr, warn=False)
        an.run()
        emit_spec(an)

    an_t = _time(analyse)
    total_nv = _time(lambda: mc.infer_spec(model, x, verify=False))
    total = _time(lambda: mc.infer_spec(model, x))
    spec = mc.infer_spec(model, x)
    print(
        f"{name}: {len(spec.groups)} groups, {len(spec.heads)} attention groups, "
        f"{len(list(tr.gm.graph.nodes))} graph nodes\n"
        f"  infer_spec {total:.3f} s ({1000 * total / blocks:.1f} ms per block); without "
        f"verification {total_nv:.3f} s ({1000 * total_nv / blocks:.1f} ms per block)\n"
        f"  trace {tr_t:.3f} s, analysis {an_t:.3f} s, one forward {fwd * 1000:.1f} ms "
        f"(infer_spec = {total / fwd:.0f} forwards)"
    )


def matrix() -> None:
    """``infer_spec`` time per transformers family of the acceptance matrix (tests/hf_zoo.py),
    as a multiple of one forward pass, and default weight matching's time to recover a planted
    permutation (skipped without transformers)."""
    try:
        import transformers as hf
    except ImportError:
        print("matrix: transformers not installed, skipped")
        return
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from hf_zoo import FAMILIES, coverage, randomize

    print(f"{'family':13s} {'infer_spec':>10s} {'x fwd':>6s} {'verify':>7s} {'groups':>6s} "
          f"{'attn':>4s} {'cover':>6s} {'wm s':>6s} recovered")  # fmt: skip
    for f in FAMILIES:
        try:
            torch.manual_seed(0)
            model, x = f.build(hf)
            model = randomize(model.eval())
            with torch.no_grad():
                fwd = _time(lambda m=model, x=x: m(**x))
            t_inf = _time(
                lambda m=model, x=x: mc.infer_spec(m, x, verify=False, warn=False), repeats=2
            )
            t_ver = _time(lambda m=model, x=x: mc.infer_spec(m, x, warn=False), repeats=1)
            spec = mc.infer_spec(model, x, verify=False, warn=False)
            state = model.state_dict()
            b = mc.apply_permutation(spec, mc.random_permutation(spec, seed=1), state)
            t = time.perf_counter()
            got = mc.weight_matching(spec, state, b)
            t_wm = time.perf_counter() - t
            back = mc.apply_permutation(spec, got, b)
            ok = all(torch.equal(back[k], state[k]) for k in spec.params())
            print(
                f"{f.name:13s} {t_inf:9.3f}s {t_inf / fwd:6.0f} {t_ver:6.3f}s "
                f"{len(spec.groups):6d} {len(spec.heads):4d} {coverage(spec, model):6.4f} "
                f"{t_wm:6.3f} {ok}",
                flush=True,
            )
        except Exception as e:  # noqa: BLE001 -- a benchmark row, not a test
            print(f"{f.name:13s} error: {type(e).__name__}: {e}"[:120])


def heads_solver() -> None:
    """The heads-structured assignment (``solve_assignment(score, heads)``) against a plain
    Hungarian on the same score, for MHA, GQA (exact: R! <= 24; alternation: R = 8) and MQA."""
    for H, G, d in [(12, 12, 64), (16, 4, 64), (16, 2, 32), (8, 1, 64)]:
        if G == H:
            heads, n = mc.Heads(H, ((0, d), (H * d, d))), 2 * H * d
        else:
            k0 = 2 * H * d
            heads = mc.Heads(H, ((0, d), (H * d, d)), G, ((k0, d), (k0 + G * d, d)), (0, 1))
            n = k0 + 2 * G * d
        score = torch.randn(n, n, dtype=torch.float64)
        t_heads = _time(lambda s=score, h=heads: mc.solve_assignment(s, h), repeats=1)
        t_plain = _time(lambda s=score: mc.solve_assignment(s), repeats=1)
        print(
            f"heads solver H={H} G={G} d={d} (n={n}): {t_heads:.3f} s, "
            f"{t_heads / t_plain:.2f}x a plain Hungarian"
        )


def main() -> None:
    torch.set_num_threads(1)  # small models: threads only add noise on a shared machine
    torch.manual_seed(0)
    heads_solver()
    matrix()
    _report("50-block residual CNN (16 ch, 8x8)", ResNet50Blocks(), torch.randn(2, 3, 8, 8), 50)
    model = mc.models.create(
        "transformer", input_shape=(64,), num_classes=10, dim=64, depth=12, num_heads=4
    )
    _report("12-layer transformer (dim 64, 4 heads)", model, torch.randn(2, 64), 12)


if __name__ == "__main__":
    main()
