"""Random filter-normalised slices (Li et al. 2018) and monotonic interpolation (Lucas 2021)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..evaluation import DataLike
from ..state import check_compatible, combine, lerp
from .common import _flat, _param_names, _progress, _runner

State = dict[str, Tensor]


# --- random filter-normalised slices --------------------------------------------------------
def filter_normalized_direction(
    state: Mapping[str, Tensor],
    names: Sequence[str] | None = None,
    *,
    seed: int = 0,
    ignore_bias_bn: bool = True,
) -> State:
    """A random Gaussian direction with filter normalisation (Li et al. 2018).

    ``d ~ N(0, I)`` of the state's shapes; for every tensor with ≥ 2 axes, each filter (slice along
    axis 0, i.e. one output unit/channel) is rescaled to the norm of the same filter of ``θ``:
    ``d_i ← d_i · ‖θ_i‖ / ‖d_i‖``. Tensors with ≤ 1 axis (biases, norm-layer parameters) are zeroed
    (``ignore_bias_bn=True``, the paper's default) or set to ``θ`` itself.

    Args:
        state: the point ``θ`` the slice goes through.
        names: the tensors to perturb (default: every floating tensor of ``state``).
        seed: seed of a private generator (the global RNG is untouched).
        ignore_bias_bn: zero the direction on 0/1-axis tensors.

    Returns:
        ``{name: direction}`` for ``names``.

    Example:
        >>> d = filter_normalized_direction({"w": torch.ones(3, 4), "b": torch.ones(3)})
        >>> [round(float(n), 4) for n in d["w"].norm(dim=1)], float(d["b"].abs().sum())
        ([2.0, 2.0, 2.0], 0.0)
    """
    gen = torch.Generator().manual_seed(seed)
    names = [k for k, v in state.items() if v.is_floating_point()] if names is None else list(names)
    out: State = {}
    for k in names:
        w = state[k].detach()
        if w.dim() <= 1:
            out[k] = torch.zeros_like(w) if ignore_bias_bn else w.clone()
            continue
        d = torch.randn(w.shape, generator=gen, dtype=torch.float64)
        w64 = w.to("cpu", torch.float64)
        wn = w64.reshape(w.shape[0], -1).norm(dim=1)
        dn = d.reshape(w.shape[0], -1).norm(dim=1)
        scale = (wn / (dn + 1e-10)).view(-1, *([1] * (w.dim() - 1)))
        out[k] = (d * scale).to(w.device, w.dtype)
    return out


@dataclass
class SliceResult:
    """Loss and accuracy along random directions through one state.

    Attributes:
        alphas: coefficients along the first direction.
        betas: coefficients along the second direction (``None`` for a 1-D slice).
        loss, accuracy: ``(len(alphas),)`` or ``(len(betas), len(alphas))`` tensors.
        directions: the direction state dicts (one or two).
    """

    alphas: Tensor
    betas: Tensor | None
    loss: Tensor
    accuracy: Tensor
    directions: list[State] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "alphas": self.alphas.tolist(),
            "betas": None if self.betas is None else self.betas.tolist(),
            "loss": self.loss.tolist(),
            "accuracy": self.accuracy.tolist(),
        }


def _shift(
    state: Mapping[str, Tensor], dirs: Sequence[Mapping[str, Tensor]], coefs: Sequence[float]
) -> State:
    """``θ + Σ c_i d_i`` on the directions' tensors (``state.combine``); others kept."""
    moved = {k: state[k] for k in dirs[0]}
    return {**state, **combine([moved, *dirs], [1.0, *coefs])}


def random_slice(
    model: nn.Module,
    state: Mapping[str, Tensor],
    data: DataLike,
    *,
    dims: int = 1,
    steps: int = 21,
    span: float = 1.0,
    filter_norm: bool = True,
    seed: int = 0,
    bn_data: DataLike | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 1024,
    progress: bool = True,
) -> SliceResult:
    """Loss along one or two random directions through ``state`` (Li et al. 2018).

    ``L(θ + α·d1)`` (``dims=1``) or ``L(θ + α·d1 + β·d2)`` (``dims=2``) for ``α, β`` on
    ``linspace(-span, span, steps)``. With ``filter_norm`` each direction is filter-normalised
    (:func:`filter_normalized_direction`); otherwise it is a plain Gaussian scaled to ``‖θ‖``.
    Only the model's parameters move; buffers stay (or are recomputed with ``bn_data``).

    Args:
        model: the architecture (not modified).
        state: the centre ``θ``.
        data: evaluation data.
        dims: 1 or 2.
        steps: grid points per axis.
        span: the grid covers ``[-span, span]``.
        filter_norm: filter-normalise the directions.
        seed: seed of the directions (the second uses ``seed + 1``).
        bn_data: data for BatchNorm statistics, or ``None``.
        device: where to run.
        batch_size: evaluation batch size.
        progress: show a progress bar.

    Returns:
        :class:`SliceResult`.

    Example:
        >>> m = nn.Linear(3, 2); x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
        >>> random_slice(m, m.state_dict(), (x, y), steps=5, progress=False).loss.shape
        torch.Size([5])
    """
    if dims not in (1, 2):
        raise ConfigError(f"dims must be 1 or 2, got {dims}")
    if steps < 2:
        raise ConfigError(f"steps must be >= 2, got {steps}")
    names = _param_names(model, state)
    dirs = []
    for i in range(dims):
        if filter_norm:
            dirs.append(filter_normalized_direction(state, names, seed=seed + i))
        else:
            gen = torch.Generator().manual_seed(seed + i)
            raw = {
                k: torch.randn(state[k].shape, generator=gen, dtype=torch.float64) for k in names
            }
            scale = float(_flat(state, names).norm()) / float(_flat(raw, names).norm())
            dirs.append(
                {k: (v * scale).to(state[k].device, state[k].dtype) for k, v in raw.items()}
            )
    alphas = torch.linspace(-span, span, steps, dtype=torch.float64)
    betas = alphas.clone() if dims == 2 else None
    shape = (steps,) if dims == 1 else (steps, steps)
    loss = torch.empty(shape, dtype=torch.float64)
    acc = torch.empty(shape, dtype=torch.float64)
    cells = (
        [(i,) for i in range(steps)]
        if dims == 1
        else [(j, i) for j in range(steps) for i in range(steps)]
    )
    run, batches = _runner(model, data, bn_data, device, batch_size)
    for cell in _progress(cells, len(cells), "slice", progress):
        coefs = [float(alphas[cell[-1]])] + ([float(alphas[cell[0]])] if dims == 2 else [])
        m = run(_shift(state, dirs, coefs), batches)
        loss[cell], acc[cell] = m.loss, m.accuracy
    return SliceResult(alphas, betas, loss, acc, dirs)


# --- monotonic linear interpolation -------------------------------------------------------
@dataclass
class MLIResult:
    """Loss along the straight line from initialisation to the trained solution.

    Attributes:
        ts: interpolation coefficients (0 = initialisation, 1 = trained).
        loss, accuracy: per-``t`` tensors.
        monotonic: ``True`` when the loss never rises by more than the tolerance.
        max_bump: largest rise ``max_{i<j} L(t_j) − L(t_i)`` (0 when monotone non-increasing).
        bump_t: the ``t`` where that rise peaks (``None`` when there is no rise).
    """

    ts: Tensor
    loss: Tensor
    accuracy: Tensor
    monotonic: bool
    max_bump: float
    bump_t: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ts": self.ts.tolist(),
            "loss": self.loss.tolist(),
            "accuracy": self.accuracy.tolist(),
            "monotonic": self.monotonic,
            "max_bump": self.max_bump,
            "bump_t": self.bump_t,
        }


def largest_bump(values: Tensor) -> tuple[float, int | None]:
    """``max_{i<j} v_j − v_i`` clipped at 0, and the index ``j`` where it is reached.

    Example:
        >>> largest_bump(torch.tensor([3.0, 1.0, 2.0, 0.0]))
        (1.0, 2)
    """
    v = values.to(torch.float64)
    if v.numel() < 2:
        return 0.0, None
    running_min = torch.cummin(v, dim=0).values
    rise = v[1:] - running_min[:-1]
    j = int(rise.argmax())
    best = float(rise[j])
    return (best, j + 1) if best > 0 else (0.0, None)


def monotonic_interpolation(
    model: nn.Module,
    state_init: Mapping[str, Tensor],
    state_final: Mapping[str, Tensor],
    data: DataLike,
    *,
    ts: int | Sequence[float] | Tensor = 25,
    tol: float = 0.0,
    bn_data: DataLike | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 1024,
    progress: bool = True,
) -> MLIResult:
    """Monotonic linear interpolation test (Lucas et al., ICML 2021).

    Evaluates ``L((1 − t)·θ_init + t·θ_final)`` on a grid of ``t`` and reports whether it is
    monotonically non-increasing, with the largest bump ``max_{i<j} L(t_j) − L(t_i)``.

    Args:
        model: the architecture (not modified).
        state_init: the initialisation ``θ_init``.
        state_final: the trained solution ``θ_final``.
        data: evaluation data.
        ts: number of evenly spaced ``t`` in ``[0, 1]``, or the values themselves (sorted).
        tol: rises up to ``tol`` still count as monotone.
        bn_data: data for BatchNorm statistics, or ``None``.
        device: where to run.
        batch_size: evaluation batch size.
        progress: show a progress bar.

    Returns:
        :class:`MLIResult`.

    Example:
        >>> m = nn.Linear(3, 2); x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
        >>> s0 = {k: torch.zeros_like(v) for k, v in m.state_dict().items()}
        >>> r = monotonic_interpolation(m, s0, m.state_dict(), (x, y), ts=5, progress=False)
        >>> r.loss.shape
        torch.Size([5])
    """
    check_compatible([state_init, state_final], ["initial state", "final state"])
    if isinstance(ts, int):
        if ts < 2:
            raise ConfigError(f"ts must be >= 2 points, got {ts}")
        grid = torch.linspace(0, 1, ts, dtype=torch.float64)
    else:
        grid = torch.as_tensor(ts, dtype=torch.float64).flatten()
        if grid.numel() < 2 or not bool((grid[1:] > grid[:-1]).all()):
            raise ConfigError("ts must hold at least two increasing values")
    loss = torch.empty(len(grid), dtype=torch.float64)
    acc = torch.empty(len(grid), dtype=torch.float64)
    run, batches = _runner(model, data, bn_data, device, batch_size)
    for i in _progress(range(len(grid)), len(grid), "MLI", progress):
        m = run(lerp(state_init, state_final, float(grid[i])), batches)
        loss[i], acc[i] = m.loss, m.accuracy
    bump, j = largest_bump(loss)
    return MLIResult(grid, loss, acc, bump <= tol, bump, None if j is None else float(grid[j]))
