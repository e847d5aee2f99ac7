"""The one interface every path in weight space shares: control points, coefficients, θ(t).

A path is a list of state dicts (its *points*; ``points[0]`` and ``points[-1]`` are the
endpoints) and a rule giving, for each ``t`` in [0, 1], one coefficient per point:
``θ(t) = Σ_i c_i(t) θ_i``. Subclasses only implement :meth:`Path.coefficients`.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from pathlib import Path as FsPath
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import IncompatibleModelsError
from ..registry import Registry
from ..state import check_compatible, combine

State = dict[str, Tensor]


class Path(abc.ABC):
    """A curve ``t -> θ(t)`` in weight space defined by control points (abstract base).

    Args:
        points: state dicts of one architecture; ``points[0]`` is θ(0), ``points[-1]`` is θ(1).
        meta: free-form JSON-able metadata (e.g. the endpoints' model name and arguments), kept
            by :meth:`save`/:func:`load_path`.

    Subclasses set ``kind`` and implement :meth:`coefficients`.
    """

    kind: ClassVar[str] = ""
    min_points: ClassVar[int] = 2

    def __init__(
        self, points: Sequence[Mapping[str, Tensor]], *, meta: dict[str, Any] | None = None
    ):
        points = list(points)
        if len(points) < self.min_points:
            raise IncompatibleModelsError(
                f"{type(self).__name__} needs at least {self.min_points} points (state dicts), "
                f"got {len(points)}"
            )
        names = ["endpoint A"] + [f"point {i}" for i in range(1, len(points) - 1)] + ["endpoint B"]
        check_compatible(points, names)
        # Own copies: the caller's states are never mutated and later changes to them don't leak in.
        self._points: list[State] = [{k: v.detach().clone() for k, v in p.items()} for p in points]
        self.meta: dict[str, Any] = dict(meta or {})

    # -- the interface -------------------------------------------------------------------------
    @abc.abstractmethod
    def coefficients(self, t: float) -> Tensor:
        """Coefficient of each point at ``t`` (float64, shape ``(num_points,)``)."""

    @property
    def points(self) -> list[State]:
        """The control points (copies; changing them does not change the path)."""
        return [{k: v.clone() for k, v in p.items()} for p in self._points]

    @property
    def num_points(self) -> int:
        """Number of control points, endpoints included."""
        return len(self._points)

    @property
    def bends(self) -> list[State]:
        """The interior control points (copies)."""
        return self.points[1:-1]

    def state(self, t: float) -> State:
        """θ(t) as a new state dict.

        Floating tensors are ``Σ_i c_i(t) θ_i`` (accumulated in float64, exact at the endpoints:
        ``state(0)`` / ``state(1)`` equal ``points[0]`` / ``points[-1]`` bit for bit). Integer
        buffers (e.g. BatchNorm's ``num_batches_tracked``) come from the nearer endpoint.
        BatchNorm running statistics are interpolated like weights, which is meaningless for a
        network off the endpoints: recompute them (``mc.reset_bn``) before evaluating.

        Args:
            t: position on the path, in [0, 1].

        Returns:
            A state dict (new tensors).

        Example:
            >>> import torch
            >>> p = LinearPath({"w": torch.zeros(2)}, {"w": torch.ones(2)})
            >>> p.state(0.25)["w"].tolist()
            [0.25, 0.25]
        """
        t = _check_t(t)
        c = self.coefficients(t)
        used = [(p, float(w)) for p, w in zip(self._points, c.tolist(), strict=True) if w != 0.0]
        out = combine([p for p, _ in used], [w for _, w in used])
        near = self._points[0] if t < 0.5 else self._points[-1]
        for k, v in near.items():
            if not v.is_floating_point():
                out[k] = v.clone()
        return out

    def __call__(self, t: float) -> State:
        return self.state(t)

    def save(self, path: str | FsPath, *, meta: dict[str, Any] | None = None) -> FsPath:
        """Write the path to one safetensors file (atomically); see :func:`load_path`.

        Args:
            path: a ``.safetensors`` file, or a directory (then ``DIR/curve.safetensors``).
            meta: extra metadata merged over ``self.meta``.

        Returns:
            The file written.

        Example:
            >>> p.save("out/curve")  # doctest: +SKIP
        """
        from .io import save_path

        return save_path(self, path, meta=meta)

    @classmethod
    def load(cls, path: str | FsPath) -> Path:
        """Read a path written by :meth:`save` (the class is taken from the file's ``kind``).

        Example:
            >>> p = Path.load("out/curve")  # doctest: +SKIP
        """
        from .io import load_path

        p = load_path(path)
        if cls is not Path and not isinstance(p, cls):
            raise IncompatibleModelsError(
                f"{path} holds a {type(p).__name__}, not a {cls.__name__}; use mc.load_path"
            )
        return p

    def to(self, device: str | torch.device) -> Path:
        """A copy of the path with its points on ``device``."""
        return type(self).from_points(
            [{k: v.to(device) for k, v in p.items()} for p in self._points], meta=self.meta
        )

    @classmethod
    def from_points(
        cls, points: Sequence[Mapping[str, Tensor]], *, meta: dict[str, Any] | None = None
    ) -> Path:
        """Build the path from its full list of points (endpoints included)."""
        return cls(points, meta=meta)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_points={self.num_points}, tensors={len(self._points[0])})"
        )


def _check_t(t: float) -> float:
    t = float(t)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must lie in [0, 1], got {t}")
    return t


REGISTRY: Registry[type[Path]] = Registry("path kind")


def register(cls: type[Path]) -> type[Path]:
    """Class decorator: make a path kind loadable by name (``cls.kind``, taken once)."""
    REGISTRY.check_free(cls.kind)
    return REGISTRY.register(cls.kind, cls)


@register
class LinearPath(Path):
    """The straight segment θ(t) = (1 − t)·θ_A + t·θ_B (linear interpolation; Frankle et al. 2020).

    Args:
        state_a: θ_A (the path at t = 0).
        state_b: θ_B (the path at t = 1).
        meta: optional metadata.

    Example:
        >>> import torch
        >>> LinearPath({"w": torch.zeros(1)}, {"w": torch.ones(1)}).state(0.5)["w"].item()
        0.5
    """

    kind = "linear"

    def __init__(
        self,
        state_a: Mapping[str, Tensor],
        state_b: Mapping[str, Tensor],
        *,
        meta: dict[str, Any] | None = None,
    ):
        super().__init__([state_a, state_b], meta=meta)

    @classmethod
    def from_points(
        cls, points: Sequence[Mapping[str, Tensor]], *, meta: dict[str, Any] | None = None
    ) -> Path:
        if len(points) != 2:
            raise IncompatibleModelsError(f"a LinearPath has 2 points, got {len(points)}")
        return cls(points[0], points[1], meta=meta)

    def coefficients(self, t: float) -> Tensor:
        """``[1 − t, t]``.

        Example:
            >>> import torch
            >>> LinearPath({"w": torch.zeros(1)}, {"w": torch.ones(1)}).coefficients(0.25).tolist()
            [0.75, 0.25]
        """
        t = _check_t(t)
        return torch.tensor([1.0 - t, t], dtype=torch.float64)
