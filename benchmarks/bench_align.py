"""Alignment benchmark: weight matching time, memory and recovery; activation matching speed.

1. A GPT-2-small-shaped pair (124M parameters, state dicts built directly, the full symmetry
   with the residual stream, ``gpt2_spec``): per-round CPU time / floor (each group's cost-matrix
   matmuls + one assignment, timed on the same shapes in the same run; target <= 2) and peak
   extra anonymous memory (``RssAnon`` sampled from /proc) / the two models (target <= 1), for an
   independent pair, a planted permutation (recovered?) and the same in bf16.
2. The PyTorch port of rebasin as a peer on the same pair, when ``MODECONN_REBASIN_PYTORCH``
   names its checkout (``MODECONN_BENCH_SMALL=1``: a quarter-size GPT-2 for a quick run).
3. Zoo pairs (random init is enough for timing) against a reference that builds every cost
   matrix by permuting the whole state dict (``apply_permutation``), both from the identity.
"""

from __future__ import annotations

import os
import threading
import time

import torch

import modeconn as mc
from modeconn._src.align.wm_problem import Problem
from modeconn._src.assign import solve_assignment
from modeconn._src.spec import (
    Heads,
    PermutationSpec,
    Slot,
    apply_permutation,
    identity_permutation,
    random_permutation,
)


def gpt2_spec(n_layer: int, d: int, n_head: int, prefix: str = "") -> PermutationSpec:
    """The full permutation symmetry of Hugging Face ``GPT2Model`` (written by hand).

    Groups: the residual stream (``d``: embeddings, every LayerNorm, the input axis of every
    ``Conv1D`` reading the stream and the output axis of every one writing it); per layer the
    attention group (``2d`` units: q/k dims ``0..d-1``, shared by the q and k slices of
    ``c_attn``, then v dims, ``n_head`` heads over both) and the MLP hidden group (``4d``).
    """
    p = prefix
    stream = [Slot(f"{p}wte.weight", 1), Slot(f"{p}wpe.weight", 1)]
    stream += [Slot(f"{p}ln_f.weight", 0), Slot(f"{p}ln_f.bias", 0)]
    groups: dict[str, int] = {"stream": d}
    slots: dict[str, tuple[Slot, ...]] = {}
    heads: dict[str, Heads] = {}
    on_stream = ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.c_attn.weight")
    on_stream += ("attn.c_proj.bias", "mlp.c_fc.weight", "mlp.c_proj.bias")
    for i in range(n_layer):
        h = f"{p}h.{i}."
        stream += [Slot(h + n, 0) for n in on_stream]
        stream += [Slot(h + "attn.c_proj.weight", 1), Slot(h + "mlp.c_proj.weight", 1)]
        att, mlp = f"h{i}.attn", f"h{i}.mlp"
        groups[att], groups[mlp] = 2 * d, 4 * d
        heads[att] = Heads(n_head, ((0, d // n_head), (d, d // n_head)))
        slots[att] = tuple(
            Slot(h + "attn.c_attn." + w, ax, offset=off, unit_start=us, length=d)
            for w, ax in (("weight", 1), ("bias", 0))
            for off, us in ((0, 0), (d, 0), (2 * d, d))
        ) + (Slot(h + "attn.c_proj.weight", 0, unit_start=d, length=d),)
        slots[mlp] = (
            Slot(h + "mlp.c_fc.weight", 1),
            Slot(h + "mlp.c_fc.bias", 0),
            Slot(h + "mlp.c_proj.weight", 0),
        )
    slots["stream"] = tuple(stream)
    return PermutationSpec(groups, slots, heads=heads)


def gpt2_state(
    n_layer: int, d: int, vocab: int, n_pos: int, seed: int, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """A random ``GPT2Model``-shaped state dict, built directly (no model, no tracing)."""
    gen = torch.Generator().manual_seed(seed)

    def t(*shape: int, mean: float = 0.0, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std + mean).to(dtype)

    s = {"wte.weight": t(vocab, d), "wpe.weight": t(n_pos, d)}
    for i in range(n_layer):
        h = f"h.{i}."
        for ln in ("ln_1", "ln_2"):
            s[h + ln + ".weight"], s[h + ln + ".bias"] = t(d, mean=1.0, std=0.1), t(d)
        s[h + "attn.c_attn.weight"], s[h + "attn.c_attn.bias"] = t(d, 3 * d), t(3 * d)
        s[h + "attn.c_proj.weight"], s[h + "attn.c_proj.bias"] = t(d, d), t(d)
        s[h + "mlp.c_fc.weight"], s[h + "mlp.c_fc.bias"] = t(d, 4 * d), t(4 * d)
        s[h + "mlp.c_proj.weight"], s[h + "mlp.c_proj.bias"] = t(4 * d, d), t(d)
    s["ln_f.weight"], s["ln_f.bias"] = t(d, mean=1.0, std=0.1), t(d)
    return s


def _pair(name: str, shape: tuple[int, ...], **kw: object) -> tuple[torch.nn.Module, ...]:
    return tuple(mc.models.create(name, input_shape=shape, seed=s, **kw) for s in (0, 1))


def _naive_weight_matching(spec: mc.PermutationSpec, a: dict, b: dict, seed: int = 0) -> tuple:
    """Reference: same coordinate descent, whole state permuted for every group update."""
    gen = torch.Generator().manual_seed(seed)
    perm = identity_permutation(spec)
    groups = [g for g in spec.groups if spec.slots.get(g)]
    rounds = 0
    for _ in range(100):
        rounds += 1
        improved = False
        for i in torch.randperm(len(groups), generator=gen).tolist():
            g = groups[i]
            n = spec.groups[g]
            # undo g's own permutation: permute the whole state with g set to identity
            others = dict(perm)
            others[g] = torch.arange(n)
            pb = apply_permutation(spec, others, b)
            c = torch.zeros(n, n, dtype=torch.float64)
            for s in spec.slots[g]:
                pos = s.positions(n)
                lo, k = s.unit_start, pos.shape[0]
                ta = a[s.param].index_select(s.axis, pos.flatten()).movedim(s.axis, 0)
                tb = pb[s.param].index_select(s.axis, pos.flatten()).movedim(s.axis, 0)
                ma, mb = ta.reshape(k, -1).double(), tb.reshape(k, -1).double()
                c[lo : lo + k, lo : lo + k] += ma @ mb.T
            new = solve_assignment(c, spec.heads.get(g))
            rows = torch.arange(n)
            if float(c[rows, new].sum() - c[rows, perm[g]].sum()) > 1e-12:
                perm[g] = new
                improved = True
        if not improved:
            break
    return perm, rounds


def _bench_weight(
    label: str, a: torch.nn.Module, b: torch.nn.Module, example: torch.Tensor
) -> None:
    spec = mc.infer_spec(a, example)
    sa, sb = a.state_dict(), b.state_dict()
    n_params = sum(t.numel() for t in sa.values())
    t0 = time.perf_counter()
    ident = identity_permutation(spec)  # the reference's start
    perm = mc.weight_matching(spec, sa, sb, init=ident)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref, ref_rounds = _naive_weight_matching(spec, sa, sb)
    t_ref = time.perf_counter() - t0
    same = all(torch.equal(perm[g], ref[g]) for g in spec.groups)
    print(
        f"weight matching {label}: {n_params / 1e6:.2f}M params, {len(spec.groups)} groups, "
        f"{perm.info['rounds']} rounds, {t_fast:.2f} s "
        f"({t_fast / perm.info['rounds'] * 1e3:.0f} ms/round); objective "
        f"{perm.info['objective_init']:.2f} -> {perm.info['objective']:.2f}; "
        f"whole-state reference {t_ref:.2f} s ({ref_rounds} rounds, same result: {same}), "
        f"speed-up x{t_ref / t_fast:.1f}"
    )


class RssAnonPeak:
    """Peak anonymous resident memory (``RssAnon`` of ``/proc/self/status``) above the level at
    entry, sampled every 2 ms by a thread (Linux only; ``peak`` stays ``nan`` elsewhere)."""

    def __enter__(self) -> RssAnonPeak:
        self.base = self.peak = _rss_anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_anon())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_anon())

    @property
    def extra(self) -> float:
        """Bytes above the level at entry."""
        return self.peak - self.base


def _rss_anon() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("nan")


def _floor_round(prob: Problem) -> float:
    """CPU seconds of one round's irreducible work on these shapes: every group's cost-matrix
    matmuls (random operands of the same shapes and dtype, made outside the clock) + one
    assignment per group."""
    total = 0.0
    gen = torch.Generator().manual_seed(0)
    for g, terms in prob.terms.items():
        c = torch.zeros(prob.spec.groups[g], prob.spec.groups[g], dtype=prob.dtype)
        for t in terms:
            axis_len = prob.a[t.param].shape[t.axis]
            npos = axis_len if t.pos is None else len(t.pos)
            k = npos // t.n * (prob.a[t.param].numel() // axis_len)
            x = torch.randn(t.n, k, generator=gen, dtype=prob.dtype)
            y = torch.randn(t.n, k, generator=gen, dtype=prob.dtype)
            t0 = time.process_time()
            c[t.lo : t.lo + t.n, t.lo : t.lo + t.n].addmm_(x, y.T)
            total += time.process_time() - t0
            del x, y
        t0 = time.process_time()
        solve_assignment(c, prob.spec.heads.get(g))
        total += time.process_time() - t0
    return total


def _gpt2_case(
    shape: tuple[int, int, int, int], case: str, who: str = "modeconn", groups: str = "all"
) -> dict[str, object]:
    """One measured weight matching on a GPT-2-shaped pair (run in a fresh process).

    ``case``: ``independent`` (two random states; at most 2 rounds), ``planted`` (B a random
    permutation of A) or ``planted-bf16``. ``who``: ``modeconn`` or ``rebasin``. ``groups``:
    ``all`` or ``stream+mlp`` (what the peer's spec format can state).
    """
    import contextlib
    import io

    n_layer, d, vocab, n_pos = shape
    full = gpt2_spec(n_layer, d, d // 64)
    keep = [g for g in full.groups if groups == "all" or g == "stream" or g.endswith(".mlp")]
    spec = PermutationSpec(
        {g: full.groups[g] for g in keep},
        {g: full.slots[g] for g in keep},
        heads={g: h for g, h in full.heads.items() if g in keep},
    )
    dtype = torch.bfloat16 if case.endswith("bf16") else torch.float32
    sa = gpt2_state(n_layer, d, vocab, n_pos, seed=0, dtype=dtype)
    planted = random_permutation(spec, seed=0)
    if case == "independent":
        sb = gpt2_state(n_layer, d, vocab, n_pos, seed=1, dtype=dtype)
    else:
        sb = apply_permutation(spec, planted, sa)
    with RssAnonPeak() as mem, contextlib.redirect_stdout(io.StringIO()):
        t0 = time.process_time()
        if who == "modeconn":
            found = mc.weight_matching(spec, sa, sb, max_iter=2 if case == "independent" else 100)
            rounds = int(found.info["rounds"]) + 1  # + the matched start (every group once)
            perm = {g: found[g] for g in keep}
        else:
            peer = _rebasin_peer()
            axes: dict[str, list[str | None]] = {}
            for g in keep:
                for sl in spec.slots[g]:
                    axes.setdefault(sl.param, [None] * sa[sl.param].dim())[sl.axis] = g
            peer_spec = peer.permutation_spec_from_axes_to_perm(  # type: ignore[attr-defined]
                {k: tuple(v) for k, v in axes.items()}
            )
            raw = peer.weight_matching(peer_spec, sa, sb)  # type: ignore[attr-defined]
            perm = {g: torch.as_tensor(p).long() for g, p in raw.items()}
            rounds = 0
        dt = time.process_time() - t0
    two = 2 * sum(t.numel() * t.element_size() for t in sa.values())
    return {
        "seconds": dt,
        "rounds": rounds,
        "memory": mem.extra / two,
        "recovered": all(torch.equal(perm[g], torch.argsort(planted[g])) for g in keep),
        "objective": mc.weight_objective(spec, sa, sb, perm),
        "params": sum(t.numel() for t in sa.values()),
        "groups": len(keep),
    }


def _isolated(*args: object) -> dict[str, object]:
    """:func:`_gpt2_case` in a fresh process: its memory baseline is not what an earlier run
    left in the allocator's free lists."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_threads_then, (torch.get_num_threads(), *args))


def _threads_then(threads: int, *args: object) -> dict[str, object]:
    torch.set_num_threads(threads)  # as many as the parent, where the floor is measured
    return _gpt2_case(*args)  # type: ignore[arg-type]


def _bench_gpt2(shape: tuple[int, int, int, int] = (12, 768, 50257, 1024)) -> None:
    """GPT-2-small-shaped pair (124M parameters, the full symmetry with the residual stream)."""
    n_layer, d, vocab, n_pos = shape
    spec = gpt2_spec(n_layer, d, d // 64)
    sa = gpt2_state(n_layer, d, vocab, n_pos, seed=0)
    sb = gpt2_state(n_layer, d, vocab, n_pos, seed=1)
    floor = _floor_round(Problem(spec, sa, sb, torch.device("cpu"), torch.float64))
    del sa, sb
    r = _isolated(shape, "independent")
    print(
        f"weight matching GPT-2-small shape ({r['params'] / 1e6:.0f}M params, {r['groups']} "
        f"groups), independent pair: {r['seconds']:.1f} s (CPU) for the matched start + "
        f"{r['rounds'] - 1} rounds; per-round time / floor "
        f"{r['seconds'] / r['rounds'] / floor:.2f} (floor {floor:.1f} s/round: cost matmuls + "
        f"one assignment per group); peak extra memory / the two models {r['memory']:.2f}"
    )
    for case in ("planted", "planted-bf16"):
        r = _isolated(shape, case)
        print(
            f"weight matching GPT-2-small shape, {case}: recovered {r['recovered']} in "
            f"{r['seconds']:.1f} s (CPU; {r['rounds'] - 1} round after the matched start); "
            f"peak extra memory / the two models {r['memory']:.2f}"
        )


def _rebasin_peer() -> object | None:
    """The PyTorch port of Git Re-Basin's weight matching (github.com/themrzmaster/
    git-re-basin-pytorch, ``utils/weight_matching.py``), loaded from the checkout that
    ``MODECONN_REBASIN_PYTORCH`` names; never vendored. The authors' own code
    (github.com/samuela/git-re-basin) is JAX, which this benchmark does not run."""
    import importlib.util

    root = os.environ.get("MODECONN_REBASIN_PYTORCH")
    path = os.path.join(root, "utils", "weight_matching.py") if root else ""
    if not path or not os.path.exists(path):
        return None
    spec = importlib.util.spec_from_file_location("rebasin_peer", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _bench_rebasin(shape: tuple[int, int, int, int] = (12, 768, 50257, 1024)) -> None:
    """Ours vs the PyTorch port of rebasin on the same GPT-2-small-shaped pair, on the part of
    the symmetry its spec format can state (the residual stream and the MLP groups: it has no
    offsets, so no fused q/k/v, and no heads); each run in a fresh process."""
    if _rebasin_peer() is None:
        print(
            "rebasin peer: not run (set MODECONN_REBASIN_PYTORCH to a checkout of "
            "github.com/themrzmaster/git-re-basin-pytorch; the authors' JAX code is not run here)"
        )
        return
    for case in ("independent", "planted"):
        runs = {}
        for who in ("modeconn", "rebasin"):
            r = _isolated(shape, case, who, "stream+mlp")
            runs[who] = (
                f"{r['seconds']:.0f} s, J {r['objective']:.1f}, memory {r['memory']:.2f}"
                + (f", recovered {r['recovered']}" if case == "planted" else "")
            )
        print(
            f"rebasin peer (stream + MLP groups), {case}: modeconn {runs['modeconn']}; "
            f"rebasin {runs['rebasin']}"
        )


def _bench_activation(label: str, a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> None:
    y = torch.zeros(len(x), dtype=torch.long)
    spec = mc.infer_spec(a, x[:8])
    t0 = time.perf_counter()
    mc.activation_matching(a, b, (x, y), spec=spec)
    dt = time.perf_counter() - t0
    print(
        f"activation matching {label}: {dt / len(x) * 1e4:.2f} s per 10k samples "
        f"({len(x)} samples, {len(spec.groups)} groups)"
    )


def main() -> None:
    print(f"torch threads: {torch.get_num_threads()}")
    shape = (
        (4, 256, 8000, 256) if os.environ.get("MODECONN_BENCH_SMALL") else (12, 768, 50257, 1024)
    )
    _bench_gpt2(shape)
    _bench_rebasin(shape)
    a, b = _pair("mlp", (40,), width=512, depth=3)
    _bench_weight("MLP 3x512", a, b, torch.randn(2, 40))
    ra, rb = _pair("resnet", (1, 8, 8), width=4)
    _bench_weight("resnet width x4 (digits shape)", ra, rb, torch.randn(2, 1, 8, 8))
    gen = torch.Generator().manual_seed(0)
    _bench_activation("MLP 3x512", a, b, torch.randn(10_000, 40, generator=gen))
    _bench_activation("resnet width x4", ra, rb, torch.randn(10_000, 1, 8, 8, generator=gen))


if __name__ == "__main__":
    main()
