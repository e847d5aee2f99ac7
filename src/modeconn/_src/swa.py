"""Stochastic weight averaging (Izmailov et al., UAI 2018) with the BatchNorm update."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .evaluation import DataLike
from .norm import needs_bn_reset, reset_bn
from .train import _split_data, train


class _RunningMean:
    """``θ̄_n = θ̄_{n−1} + (θ_n − θ̄_{n−1}) / n`` over floating tensors, accumulated in float64."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: dict[str, Tensor] = {}

    def __call__(self, epoch: int, net: nn.Module) -> None:
        self.n += 1
        with torch.no_grad():
            for k, v in net.state_dict().items():
                if not v.is_floating_point():
                    self.mean[k] = v.detach().clone()
                elif k not in self.mean:
                    self.mean[k] = v.detach().to(torch.float64).clone()
                else:
                    self.mean[k] += (v.detach().to(torch.float64) - self.mean[k]) / self.n


def swa(
    model: nn.Module,
    data: DataLike,
    *,
    epochs: int = 10,
    lr: float = 0.05,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 128,
    seed: int = 0,
    sam_rho: float = 0.05,
    bn_data: DataLike | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    **train_options: Any,
) -> nn.Module:
    """Stochastic weight averaging from a trained network (Izmailov et al., UAI 2018).

    "Averaging Weights Leads to Wider Optima and Better Generalization": continue training
    ``model`` with a constant learning rate ``lr`` for ``epochs`` epochs and average the weights
    at the end of every epoch, ``θ_SWA = (1/n) Σ_{i=1..n} θ_i`` (a running mean, in float64);
    then, since the averaged network's BatchNorm statistics describe none of the snapshots,
    recompute them with one pass over the training data (the paper's ``bn_update``; here the
    exact :func:`modeconn.reset_bn`). The SGD steps are :func:`modeconn.train`'s
    (``schedule="constant"``; ``optimizer="sam"`` gives SWA on top of SAM).

    Args:
        model: the trained network to start from (not modified).
        data: training data (DataLoader, Dataset, ``(inputs, targets)`` or a ``Splits``).
        epochs: SWA epochs = number of averaged snapshots (≥ 1).
        lr: the constant SWA learning rate.
        optimizer: ``"sgd"`` (the paper's) or any of :func:`modeconn.train`'s.
        momentum: SGD momentum.
        weight_decay: weight decay.
        batch_size: minibatch size.
        seed: seed of shuffling and dropout.
        sam_rho: SAM's ρ with ``optimizer="sam"``.
        bn_data: data for the BatchNorm update (default: the training data).
        device: where to train (default: the model's device).
        progress: show a progress bar.
        **train_options: further :func:`modeconn.train` keywords (e.g. ``adversarial``).

    Returns:
        The averaged network (a new module, eval mode, BatchNorm statistics recomputed).

    Example:
        >>> x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
        >>> avg = swa(nn.Linear(4, 2), (x, y), epochs=2, lr=0.05, progress=False)
        >>> avg.training
        False
    """
    if epochs < 1:
        raise ConfigError(f"SWA needs epochs >= 1 (one snapshot per epoch), got {epochs}")
    train_data, _ = _split_data(data, None)
    averager = _RunningMean()
    result = train(
        model,
        train_data,
        epochs=epochs,
        lr=lr,
        optimizer=optimizer,
        momentum=momentum,
        weight_decay=weight_decay,
        batch_size=batch_size,
        schedule="constant",
        seed=seed,
        sam_rho=sam_rho,
        device=device,
        callback=averager,
        progress=progress,
        **train_options,
    )
    net = result.model
    ref = net.state_dict()
    net.load_state_dict({k: v.to(ref[k].dtype) for k, v in averager.mean.items()})
    if needs_bn_reset(net):
        net = reset_bn(net, bn_data if bn_data is not None else train_data)
    return net.eval()
