"""The merge-method base class, its inputs, the registry, and per-tensor helpers shared by methods.

A merge method (mergekit's design) is a small object with a ``name``, a ``reference`` (paper,
year, url), a pydantic ``Params`` model declaring its parameters, what inputs it needs
(``model``/``data``, ``base``), how many models it takes, and ``run(states, params, inputs)``.
Variants that are one algorithm with other settings are *configured instances* of one class
(task arithmetic, TIES and DARE are three instances of ``GeneralizedTaskArithmetic``).
Registration is explicit (``register(instance)``, done in ``merge/__init__.py``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor, nn

from ..errors import ConfigError
from ..evaluation import DataLike, as_loader

State = dict[str, Tensor]

# BatchNorm running statistics are data summaries, not weights: every method averages them
# (with the per-model weights) and ``reset_bn=True`` recomputes them after merging.
_STATISTIC_SUFFIXES = ("running_mean", "running_var")


def is_statistic(key: str) -> bool:
    """True for BatchNorm running statistics (``...running_mean``, ``...running_var``).

    Example:
        >>> is_statistic("bn.running_var"), is_statistic("fc.weight")
        (True, False)
    """
    return key.rsplit(".", 1)[-1] in _STATISTIC_SUFFIXES


@dataclass(frozen=True)
class Reference:
    """Where a method comes from: ``paper`` (authors, title), ``year`` and ``url``."""

    paper: str
    year: int
    url: str

    def __str__(self) -> str:
        return f"{self.paper} ({self.year}) {self.url}"


class Params(BaseModel):
    """Base of every method's parameter model: frozen, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


# Inside MergeMethod's body the class attribute ``Params`` shadows this class; annotations there
# name it through this alias.
_BaseParams = Params


@dataclass
class MergeInputs:
    """Everything a method may use besides the states and its parameters.

    Attributes:
        weights: one coefficient per model (``None``: all 1).
        base: the pretrained state task vectors are taken from (task-arithmetic family).
        model: a module of the states' architecture (data-dependent methods).
        data: one data source for all models, or a list with one per model.
        device: where data-dependent passes run.
        progress: draw progress bars.
        info: methods write what they measured here (it ends up in ``MergedState.info``).
    """

    weights: list[float] | None = None
    base: Mapping[str, Tensor] | None = None
    model: nn.Module | None = None
    data: Any = None
    device: torch.device | None = None
    progress: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    def weight_list(self, n: int) -> list[float]:
        """The per-model weights, all 1.0 when none were given."""
        return list(self.weights) if self.weights is not None else [1.0] * n

    def data_for(self, i: int) -> Any:
        """The data of model ``i`` (the shared data, or the i-th of a per-model list)."""
        if is_per_model_data(self.data):
            return self.data[i]
        return self.data


def is_per_model_data(data: Any) -> bool:
    """A list/tuple of data sources, one per model (a pair of tensors is one dataset).

    Example:
        >>> is_per_model_data((torch.zeros(2, 3), torch.zeros(2))), is_per_model_data([None, None])
        (False, True)
    """
    return isinstance(data, list | tuple) and not all(isinstance(t, Tensor) for t in data)


class MergeMethod(ABC):
    """A merge method: combine N state dicts of one architecture into one.

    Subclasses set ``Params`` (a :class:`Params` subclass), ``needs_data`` (``model`` and
    ``data`` required), ``needs_base``, ``min_models``/``max_models``, ``weighted`` (accepts
    per-model weights) and ``identity_params`` (the settings under which merging N copies of one
    model returns that model; the registry-driven contract tests use them), and implement
    :meth:`run`.

    ``per_tensor`` declares a data-free method whose output tensor ``k`` depends only on the
    inputs' tensors ``k`` (plus model-wide pre-passes that read tensor by tensor):
    ``mc.merge_files`` then streams it from lazily read files. Subclass
    :class:`~modeconn._src.merge.tensorwise.TensorwiseMerge` (implement ``plan``) to stream
    tensor by tensor with bounded memory; a plain ``MergeMethod`` with ``per_tensor = True`` is
    streamed by running :meth:`run` over the lazily read inputs (its output is held once).
    """

    Params: ClassVar[type[_BaseParams]] = Params
    needs_data: ClassVar[bool] = False
    needs_base: ClassVar[bool] = False
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None
    weighted: ClassVar[bool] = True
    per_tensor: ClassVar[bool] = False

    def __init__(self, name: str, reference: Reference, *, summary: str = "",
                 identity_params: Mapping[str, Any] | None = None) -> None:
        self.name = name
        self.reference = reference
        self.summary = summary or (type(self).__doc__ or "").strip().splitlines()[0]
        self.identity_params = dict(identity_params or {})

    def check_count(self, n: int) -> None:
        """Raise ConfigError unless this method can merge ``n`` models."""
        lo, hi = max(1, self.min_models), self.max_models
        if lo <= n and (hi is None or n <= hi):
            return
        if hi == lo:
            need = f"exactly {lo}"
        elif hi is None:
            need = f"at least {lo}"
        else:
            need = f"{lo} to {hi}"
        raise ConfigError(f"method {self.name!r} merges {need} models, got {n}")

    def parameters(self, **params: Any) -> _BaseParams:
        """Validate ``params`` against :attr:`Params`; bad ones raise a one-line ConfigError."""
        try:
            return self.Params(**params)
        except ValidationError as e:
            raise ConfigError(f"method {self.name!r}: {_one_line(e)}") from None

    def parameter_names(self) -> list[str]:
        """The names of this method's parameters."""
        return list(self.Params.model_fields)

    @abstractmethod
    def run(
        self, states: Sequence[Mapping[str, Tensor]], params: Any, inputs: MergeInputs
    ) -> State:
        """Merge ``states`` (already validated and aligned) into a new state dict."""

    def __repr__(self) -> str:
        return f"<merge method {self.name!r}: {self.reference}>"


def _one_line(e: ValidationError) -> str:
    """The first pydantic error as ``field: message`` (with how many more there are)."""
    errs = e.errors()
    first = errs[0]
    loc = ".".join(str(p) for p in first.get("loc", ())) or "parameters"
    msg = first.get("msg", "invalid")
    if first.get("type") == "extra_forbidden":
        msg = "unknown parameter"
    more = f" (and {len(errs) - 1} more problems)" if len(errs) > 1 else ""
    return f"{loc}: {msg}{more}"


_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Register a configured method instance under ``method.name`` (a name is taken once).

    Args:
        method: the instance.

    Returns:
        ``method`` itself.

    Example:
        >>> class Mine(MergeMethod):  # doctest: +SKIP
        ...     def run(self, states, params, inputs): return dict(states[0])
        >>> register(Mine("first", Reference("me", 2024, "https://example.org")))  # doctest: +SKIP
    """
    if method.name in _REGISTRY and _REGISTRY[method.name] is not method:
        raise ConfigError(f"merge method {method.name!r} is registered twice")
    _REGISTRY[method.name] = method
    return method


def method_names() -> list[str]:
    """Names of the registered merge methods, in registration order.

    Example:
        >>> "average" in method_names()  # doctest: +SKIP
        True
    """
    return list(_REGISTRY)


def get_method(name: str) -> MergeMethod:
    """The method registered as ``name``; an unknown name raises ConfigError listing them all."""
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown merge method {name!r}; choose one of: {', '.join(method_names())}"
        )
    return _REGISTRY[name]


# --- per-tensor helpers -----------------------------------------------------------------------

def compute_dtype(t: Tensor) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def normalized(weights: Sequence[float]) -> list[float]:
    """``w_i / sum(w)``; a zero sum raises ConfigError.

    Example:
        >>> normalized([1, 3])
        [0.25, 0.75]
    """
    total = float(sum(weights))
    if total == 0:
        raise ConfigError(
            f"merge weights {list(weights)} sum to 0; give weights with a non-zero sum"
        )
    return [float(w) / total for w in weights]


def weighted_sum(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``sum_i w_i t_i`` in the compute dtype of ``tensors[0]`` (a new tensor)."""
    dt = compute_dtype(tensors[0])
    acc = torch.zeros_like(tensors[0], dtype=dt)
    for t, wi in zip(tensors, weights, strict=True):
        acc.add_(t.to(dt), alpha=float(wi))
    return acc


def weighted_mean(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``sum_i w_i t_i / sum_i w_i`` in the compute dtype of ``tensors[0]``."""
    return weighted_sum(tensors, normalized(weights))


def merge_per_tensor(
    states: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float],
    fn: Callable[[str, list[Tensor]], Tensor],
) -> State:
    """Build the merged state one tensor at a time (so memory holds one output state).

    Non-floating tensors (``num_batches_tracked``) are copied from the first model; BatchNorm
    running statistics are the weighted mean; every other floating tensor is
    ``fn(key, [t_0, ..., t_{N-1}])`` (any dtype), cast back to the input dtype.
    """
    out: State = {}
    for k, t in states[0].items():
        ts = [s[k] for s in states]
        if not t.is_floating_point():
            out[k] = t.clone()
        elif is_statistic(k):
            out[k] = weighted_mean(ts, weights).to(t.dtype)
        else:
            out[k] = fn(k, ts).to(t.dtype)
    return out


# --- streaming data ---------------------------------------------------------------------------

def examples(data: DataLike, batch_size: int, n_examples: int | None) -> Iterator[tuple[Any, Any]]:
    """Stream ``(inputs, targets)`` batches of ``data``, stopping after ``n_examples`` examples."""
    seen = 0
    for batch in as_loader(data, batch_size=batch_size):
        x, y = batch[0], batch[1]
        if n_examples is not None:
            x, y = x[: n_examples - seen], y[: n_examples - seen]
        if len(x) == 0:
            return
        seen += len(x)
        yield x, y
        if n_examples is not None and seen >= n_examples:
            return


def n_batches(data: DataLike, batch_size: int, n_examples: int | None) -> int:
    """How many batches :func:`examples` yields (for progress bars)."""
    loader = as_loader(data, batch_size=batch_size)
    total = len(loader)
    if n_examples is not None and loader.batch_size:
        total = min(total, -(-n_examples // loader.batch_size))
    return total
