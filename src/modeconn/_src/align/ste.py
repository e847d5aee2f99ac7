"""Straight-through estimator alignment (Git Re-Basin): learn a permutation with a good midpoint."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, TypedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import ConfigError, DataError
from ..evaluation import DataLike, as_loader, model_device, resolve_device
from ..progress import progress_bar
from ..spec import Permutation, PermutationSpec, apply_permutation
from ..state import check_compatible, check_finite, combine
from .api import register_aligner, resolve_spec
from .weight import weight_matching


def midpoint_mode(model: nn.Module) -> nn.Module:
    """Put ``model`` in the mode used to score merged weights: eval, BatchNorm in train mode.

    BatchNorm then normalises with batch statistics (a merged net's running statistics are
    meaningless); dropout and other train-time behaviour stay off.
    """
    model.eval()
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.train()
    return model


def fresh_buffers(state: Mapping[str, Tensor], names: set[str]) -> dict[str, Tensor]:
    """Clones of the buffers of ``state`` (train-mode BatchNorm updates them in place)."""
    return {k: v.detach().clone() for k, v in state.items() if k in names}


def _perm_key(perm: Mapping[str, Tensor]) -> tuple[tuple[str, bytes], ...]:
    return tuple((g, perm[g].cpu().numpy().tobytes()) for g in sorted(perm))


class _Best(TypedDict):
    perm: Permutation
    loss: float


def ste_matching(
    model_a: nn.Module,
    model_b: nn.Module,
    data: DataLike,
    *,
    spec: PermutationSpec | None = None,
    epochs: int = 1,
    lr: float = 1e-2,
    momentum: float = 0.9,
    max_steps: int | None = None,
    batch_size: int = 128,
    eval_batches: int = 4,
    max_iter: int = 100,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> Permutation:
    """Straight-through estimator matching (Ainsworth et al., "Git Re-Basin", ICLR 2023).

    Learns a permutation ``pi`` of B whose midpoint with A has low loss. A trainable copy ``theta``
    starts at ``theta_A``. Each step:

    1. ``pi = weight_matching(theta, theta_B)`` (warm-started at the previous ``pi``);
    2. ``theta_proj = pi(theta_B) + (theta - stopgrad(theta))`` (value ``pi(theta_B)``, gradient
       to ``theta``: the straight-through estimator);
    3. ``loss = CE(f(x; 1/2 theta_A + 1/2 theta_proj), y)`` on a minibatch, evaluated with
       ``torch.func.functional_call``;
    4. one SGD step (momentum ``0.9``) on ``theta``.

    Every distinct ``pi`` met (the first is plain weight matching of A and B) is scored by the
    midpoint loss ``CE(f(x; 1/2 theta_A + 1/2 pi(theta_B)))`` on the first ``eval_batches``
    batches of ``data``; the best one is returned, so STE never does worse than weight matching on
    that loss. Networks with BatchNorm are run with batch statistics (BN in train mode, every
    other module in eval mode) in both the training and the scoring forward passes; buffers of the
    midpoint are ``1/2 A + 1/2 pi(B)``.

    Args:
        model_a: the reference model (not modified).
        model_b: the model to align (not modified).
        data: DataLoader, Dataset or ``(inputs, targets)`` (a Dataset/tuple is shuffled with
            ``seed``).
        spec: the permutation spec (default: ``mc.infer_spec`` on the first batch).
        epochs: passes over ``data``.
        lr: SGD learning rate.
        momentum: SGD momentum.
        max_steps: stop after this many steps (default: ``epochs`` full passes).
        batch_size: batch size when ``data`` is a Dataset or tuple.
        eval_batches: batches used to score candidate permutations.
        max_iter: weight-matching rounds per step.
        seed: shuffling and weight-matching seed.
        device: where to run (default: model A's device).
        progress: show a progress bar over steps.

    Returns:
        A :class:`Permutation` mapping B onto A; ``info`` has ``loss`` (best scored midpoint loss),
        ``loss_weight_matching`` (the score of the first, weight-matching permutation), ``steps``,
        ``train_losses`` (per step) and ``candidates`` (distinct permutations scored).

    Example:
        >>> import torch, modeconn as mc
        >>> a = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> spec = mc.PermutationSpec.from_axes({"h": 8}, {"0.weight": ("h", None),
        ...     "0.bias": ("h",), "2.weight": (None, "h")})
        >>> b = mc.random_permutation(spec, seed=1)
        >>> model_b = copy.deepcopy(a)
        >>> _ = model_b.load_state_dict(mc.apply_permutation(spec, b, a.state_dict()))
        >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> p = ste_matching(a, model_b, (x, y), spec=spec, max_steps=3)
        >>> torch.equal(p["h"], torch.argsort(b["h"]))
        True
    """
    if data is None:
        raise ConfigError("ste_matching needs data (it trains on the midpoint's loss): pass data=")
    if epochs < 1 or lr <= 0 or eval_batches < 1:
        raise ConfigError(
            f"ste_matching needs epochs >= 1, lr > 0, eval_batches >= 1 "
            f"(got {epochs}, {lr}, {eval_batches})"
        )
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"max_steps must be >= 1 (or None), got {max_steps}")
    state_a0, state_b0 = model_a.state_dict(), model_b.state_dict()
    check_compatible([state_a0, state_b0], ["model A", "model B"])
    check_finite(state_a0, "model A")
    check_finite(state_b0, "model B")
    dev = resolve_device(device) if device is not None else model_device(model_a)
    spec = resolve_spec(model_a, spec, data=data)
    spec.check(state_a0)

    net = midpoint_mode(copy.deepcopy(model_a).to(dev))
    state_a = {k: v.detach().to(dev) for k, v in state_a0.items()}
    state_b = {k: v.detach().to(dev) for k, v in state_b0.items()}
    param_names = [k for k, _ in net.named_parameters()]
    buffer_names = {k for k, _ in net.named_buffers()}
    theta = {
        k: state_a[k].clone().requires_grad_(state_a[k].is_floating_point()) for k in param_names
    }
    trainable = [t for t in theta.values() if t.requires_grad]
    opt = torch.optim.SGD(trainable, lr=lr, momentum=momentum)

    def midpoint(proj: Mapping[str, Tensor]) -> dict[str, Tensor]:
        # integer buffers (num_batches_tracked) are copied from A: they are updated in place
        return combine([state_a, proj], [0.5, 0.5])

    eval_set = []
    for i, batch in enumerate(as_loader(data, batch_size=batch_size)):
        if i >= eval_batches:
            break
        eval_set.append((batch[0].to(dev), batch[1].to(dev)))
    if not eval_set:
        raise DataError("ste_matching got an empty dataset")

    @torch.no_grad()
    def score(perm: Permutation) -> float:
        mid = midpoint(apply_permutation(spec, perm, state_b))
        total, n = 0.0, 0
        for x, y in eval_set:
            buffers = fresh_buffers(mid, buffer_names)
            out = torch.func.functional_call(net, {**mid, **buffers}, (x,))
            total += float(F.cross_entropy(out, y, reduction="sum"))
            n += len(y)
        return total / n

    loader = as_loader(data, batch_size=batch_size, shuffle=True, seed=seed)
    total_steps = epochs * len(loader)
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)

    def current_state() -> dict[str, Tensor]:
        return {**state_a, **{k: t.detach() for k, t in theta.items()}}

    perm = weight_matching(spec, current_state(), state_b, max_iter=max_iter, seed=seed, device=dev)
    best: _Best = {"perm": perm, "loss": score(perm)}
    wm_loss = best["loss"]
    seen = {_perm_key(perm)}

    def rematch(prev: Permutation, step: int) -> Permutation:
        """Weight-match the current theta (warm start), score the result if it is new."""
        new = weight_matching(
            spec, current_state(), state_b, max_iter=max_iter, seed=seed + step, init=prev,
            device=dev,
        )
        key = _perm_key(new)
        if key not in seen:
            seen.add(key)
            loss_p = score(new)
            if loss_p < best["loss"]:
                best.update({"perm": new, "loss": loss_p})
        return new

    losses: list[float] = []
    step = 0
    with progress_bar(progress, total=total_steps, description="STE matching") as advance:
        while step < total_steps:
            for x, y in loader:
                if step >= total_steps:
                    break
                if step > 0:
                    perm = rematch(perm, step)
                projected = apply_permutation(spec, perm, state_b)
                ste = {
                    k: projected[k] + (t - t.detach()) if t.requires_grad else projected[k]
                    for k, t in theta.items()
                }
                mid = midpoint({**projected, **ste})
                mid.update(fresh_buffers(mid, buffer_names))
                out = torch.func.functional_call(net, mid, (x.to(dev),))
                loss = F.cross_entropy(out, y.to(dev))
                if not torch.isfinite(loss):
                    raise DataError("ste_matching: the midpoint loss is not finite; lower lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                step += 1
                advance(f"loss {losses[-1]:.3f}")
    if step > 0:
        rematch(perm, step)  # the permutation after the last update
    return Permutation(
        {g: t.cpu() for g, t in best["perm"].items()},
        info={
            "method": "ste",
            "loss": best["loss"],
            "loss_weight_matching": wm_loss,
            "steps": step,
            "train_losses": losses,
            "candidates": len(seen),
        },
    )


def _ste_aligner(
    model_a: nn.Module, model_b: nn.Module, data: Any, spec: PermutationSpec, **kwargs: Any
) -> Permutation:
    if data is None:
        raise ConfigError("alignment method 'ste' needs data (--data SOURCE / data=)")
    return ste_matching(model_a, model_b, data, spec=spec, **kwargs)


register_aligner("ste")(_ste_aligner)
