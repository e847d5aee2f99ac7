"""Adversarial examples and robust evaluation: PGD-ℓ∞ (Madry et al., 2018)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor, nn

from .errors import ConfigError
from .evaluation import DataLike, Metrics, evaluate


class PGDConfig(BaseModel):
    """Settings of a PGD-ℓ∞ attack: radius ``eps``, step size ``step``, number of ``steps``.

    Example:
        >>> PGDConfig(eps=0.1, step=0.025, steps=7).steps
        7
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    eps: float = Field(gt=0, description="ℓ∞ radius of the perturbation")
    step: float = Field(gt=0, description="step size of each signed-gradient ascent step")
    steps: int = Field(ge=1, description="number of ascent steps")
    random_start: bool = Field(True, description="start from a uniform point in the eps-ball")

    @classmethod
    def coerce(cls, cfg: PGDConfig | Mapping[str, Any]) -> PGDConfig:
        """A ``PGDConfig`` from itself or a dict, with a :class:`ConfigError` on bad values."""
        if isinstance(cfg, PGDConfig):
            return cfg
        try:
            return cls(**dict(cfg))
        except (ValidationError, TypeError) as e:
            first = e.errors()[0] if isinstance(e, ValidationError) else {"msg": str(e), "loc": ()}
            where = ".".join(str(p) for p in first["loc"]) or "config"
            raise ConfigError(f"bad adversarial setting {where}: {first['msg']}") from None


Forward = Callable[[Tensor], Tensor]


def _pgd(
    forward: Forward, x: Tensor, y: Tensor, cfg: PGDConfig, gen: torch.Generator | None
) -> Tensor:
    """The PGD loop on one batch (see :func:`pgd_attack`)."""
    x = x.detach()
    if cfg.random_start:
        noise = torch.rand(x.shape, generator=gen, dtype=x.dtype, device="cpu").to(x.device)
        delta = (2 * noise - 1) * cfg.eps
    else:
        delta = torch.zeros_like(x)
    for _ in range(cfg.steps):
        delta.requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(forward(x + delta), y)
            (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + cfg.step * grad.sign()).clamp(-cfg.eps, cfg.eps)
    return (x + delta).detach()


def pgd_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    step: float,
    steps: int,
    random_start: bool = True,
    seed: int = 0,
    state: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """Projected gradient descent in the ℓ∞ ball (Madry et al., "Towards Deep Learning Models
    Resistant to Adversarial Attacks", ICLR 2018).

    ``x_0 = x + U(-eps, eps)`` (or ``x``), then ``steps`` times
    ``x_{k+1} = x + clip_{[-eps, eps]}(x_k + step * sign(∇_x CE(f(x_k), y)) - x)``.
    Inputs are not clipped to a pixel range (modeconn's data is standardised).

    The model's mode (train/eval) is used as it is, and no gradient reaches its parameters.

    Args:
        model: the classifier (not modified).
        x: inputs (a batch).
        y: integer labels.
        eps: ℓ∞ radius.
        step: step size.
        steps: number of steps.
        random_start: start from a uniform random point in the ball.
        seed: seed of the random start (a private generator; the global RNG is untouched).
        state: attack these weights instead of the model's own (``torch.func.functional_call``).

    Returns:
        The adversarial inputs, detached, with ``|x_adv - x| <= eps`` elementwise.

    Example:
        >>> m = nn.Linear(4, 3); x = torch.randn(5, 4); y = torch.zeros(5, dtype=torch.long)
        >>> bool((pgd_attack(m, x, y, eps=0.1, step=0.05, steps=3) - x).abs().max() <= 0.1 + 1e-6)
        True
    """
    cfg = PGDConfig.coerce({"eps": eps, "step": step, "steps": steps, "random_start": random_start})
    forward = _forward(model, state)
    gen = torch.Generator().manual_seed(seed)
    return _pgd(forward, x, y, cfg, gen)


def _forward(model: nn.Module, state: Mapping[str, Tensor] | None) -> Forward:
    if state is None:
        return model
    st = dict(state)
    return lambda inp: torch.func.functional_call(model, st, (inp,))


def robust_evaluate(
    model: nn.Module,
    data: DataLike,
    pgd: PGDConfig | Mapping[str, Any],
    *,
    state: Mapping[str, Tensor] | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 512,
    seed: int = 0,
) -> Metrics:
    """Loss and accuracy on PGD-ℓ∞ adversarial examples (Madry et al., 2018), model in eval mode.

    Args:
        model: the classifier (not modified; its mode is restored).
        data: DataLoader, Dataset or ``(inputs, targets)``.
        pgd: a :class:`PGDConfig` or a dict with ``eps``, ``step``, ``steps``.
        state: evaluate these weights instead of the model's own.
        device: where to run (default: the model's device).
        batch_size: for a Dataset/tuple.
        seed: seed of the random starts.

    Returns:
        :class:`~modeconn._src.evaluation.Metrics` on the attacked inputs.

    Example:
        >>> m = nn.Linear(4, 3); x = torch.randn(8, 4); y = torch.zeros(8, dtype=torch.long)
        >>> robust_evaluate(m, (x, y), {"eps": 0.1, "step": 0.05, "steps": 2}).n
        8
    """
    cfg = PGDConfig.coerce(pgd)
    gen = torch.Generator().manual_seed(seed)
    return evaluate(
        model, data, state=state, device=device, batch_size=batch_size,
        input_transform=lambda forward, x, y: _pgd(forward, x, y, cfg, gen),
    )
