"""The aligner base class, its inputs and the aligner registry (the shape ``merge/base.py`` has).

An aligner is a small object with a ``name``, a ``reference`` (paper, year, url), a pydantic
``Params`` model declaring its options, what inputs it needs (``needs``: a subset of ``spec``,
``states``, ``models``, ``data``) and one ``run(inputs, params) -> Permutation`` that maps B's
units onto A's. Inputs are checked once, by ``align()`` / ``align_states()``, before ``run``.

Built-in aligners wrap the public functions (``weight_matching``, ``activation_matching``, ...):
:func:`signature_params` builds their ``Params`` from the function's keyword arguments, so the
function stays the single source of its options and defaults. Registration is explicit
(``register_aligner(instance)``, done in ``align/__init__.py``).
"""

from __future__ import annotations

import inspect
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError, create_model
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import Reference, Registry
from ..spec import Permutation, PermutationSpec

__all__ = [
    "ALIGNERS",
    "AlignInputs",
    "Aligner",
    "FunctionAligner",
    "Params",
    "Reference",
    "signature_params",
]

INPUTS = ("spec", "states", "models", "data")


class Params(BaseModel):
    """Base of every aligner's options: frozen, unknown keys refused, any value type allowed."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)


_BaseParams = Params  # ``Aligner.Params`` shadows the name inside the class body


@dataclass(frozen=True)
class AlignInputs:
    """What an aligner may use, already validated by ``align()`` / ``align_states()``.

    Attributes:
        spec: the permutation spec (checked against ``state_a``).
        state_a: the reference state.
        state_b: the state to permute (same keys, shapes and dtypes as ``state_a``).
        model_a: a module holding ``state_a`` (``None`` when only states were given).
        model_b: a module holding ``state_b`` (``None`` when only states were given).
        data: the data source (``None`` when none was given).
    """

    spec: PermutationSpec
    state_a: Mapping[str, Tensor]
    state_b: Mapping[str, Tensor]
    model_a: nn.Module | None = None
    model_b: nn.Module | None = None
    data: Any = None


class Aligner(ABC):
    """An alignment method: the permutation of B's hidden units that maps B onto A.

    Subclasses set ``Params`` (a :class:`Params` subclass), ``needs`` (a subset of
    ``("spec", "states", "models", "data")``), ``exact`` (a planted permutation of one model is
    recovered exactly: the contract tests check it) and implement :meth:`run`. An aligner that
    can align N models jointly also implements :meth:`run_many` (``merge()`` uses it).
    """

    Params: ClassVar[type[_BaseParams]] = Params
    needs: ClassVar[frozenset[str]] = frozenset({"spec", "states"})
    exact: ClassVar[bool] = True

    def __init__(self, name: str, reference: Reference, *, summary: str = "") -> None:
        self.name = name
        self.reference = reference
        self.summary = summary or ((type(self).__doc__ or "").strip().splitlines() or [name])[0]

    @property
    def needs_data(self) -> bool:
        """True if :meth:`run` needs ``data``."""
        return "data" in self.needs

    @property
    def needs_models(self) -> bool:
        """True if :meth:`run` needs the modules (forward passes), not only their states."""
        return "models" in self.needs

    def requires(self, params: Any) -> frozenset[str]:
        """The inputs :meth:`run` needs under ``params`` (default: :attr:`needs`)."""
        return self.needs

    def parameters(self, **params: Any) -> _BaseParams:
        """Validate ``params`` against :attr:`Params`; bad ones raise a one-line ConfigError."""
        try:
            return self.Params(**params)
        except ValidationError as e:
            raise ConfigError(f"alignment method {self.name!r}: {_one_line(e)}") from None

    def parameter_names(self) -> list[str]:
        """The names of this aligner's options."""
        return list(self.Params.model_fields)

    def accepts(self, name: str) -> bool:
        """True if ``name`` is one of this aligner's options (callers pass shared options such
        as ``seed``/``device``/``progress`` only to aligners that take them)."""
        return name in self.Params.model_fields

    @abstractmethod
    def run(self, inputs: AlignInputs, params: Any) -> Permutation:
        """The :class:`Permutation` mapping ``inputs.state_b`` onto ``inputs.state_a``."""

    def run_many(
        self, spec: PermutationSpec, states: Sequence[Mapping[str, Tensor]], params: Any
    ) -> list[Permutation] | None:
        """Joint alignment of N states into one unit order, or ``None`` (not supported)."""
        return None

    def __repr__(self) -> str:
        return f"<aligner {self.name!r}: {self.reference}>"


def _one_line(e: ValidationError) -> str:
    errs = e.errors()
    first = errs[0]
    loc = ".".join(str(p) for p in first.get("loc", ())) or "parameters"
    msg = "unknown option" if first.get("type") == "extra_forbidden" else first.get("msg", "bad")
    more = f" (and {len(errs) - 1} more problems)" if len(errs) > 1 else ""
    return f"{loc}: {msg}{more}"


def signature_params(
    fn: Callable[..., Any], *, exclude: Sequence[str] = (), name: str | None = None
) -> type[Params]:
    """A :class:`Params` model with one field per keyword argument of ``fn`` (same defaults).

    Types come from ``fn``'s annotations where pydantic can check them, else any value is taken
    (the function checks it). Positional parameters and ``exclude`` are left out.

    Example:
        >>> def f(x, *, steps: int = 3, tau: float = 1.0): ...
        >>> P = signature_params(f)
        >>> P(steps=5).steps, list(P.model_fields)
        (5, ['steps', 'tau'])
    """
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - unresolvable annotations: take any value
        hints = {}
    fields: dict[str, Any] = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.name in exclude:
            continue
        default = ... if p.default is inspect.Parameter.empty else p.default
        fields[p.name] = (hints.get(p.name, Any), default)
    model_name = name or f"{getattr(fn, '__name__', 'aligner')}_params"
    try:
        return create_model(model_name, __base__=Params, **fields)
    except Exception:  # noqa: BLE001 - a type pydantic cannot check: fall back to Any
        loose = {k: (Any, d) for k, (_, d) in fields.items()}
        return create_model(model_name, __base__=Params, **loose)  # type: ignore[call-overload]  # as above


class FunctionAligner(Aligner):
    """An aligner that calls ``fn(model_a, model_b, data, spec, **options)`` (user-registered).

    The function returns a :class:`Permutation` mapping B onto A; its options are free-form.
    """

    class Params(_BaseParams):
        model_config = ConfigDict(frozen=True, extra="allow", arbitrary_types_allowed=True)

    needs: ClassVar[frozenset[str]] = frozenset({"spec", "states", "models"})
    exact: ClassVar[bool] = False

    def __init__(self, name: str, fn: Callable[..., Permutation], *,
                 reference: Reference | None = None) -> None:
        ref = reference or Reference(f"user aligner {getattr(fn, '__name__', name)}", 0, "")
        doc = (fn.__doc__ or "").strip().splitlines()
        super().__init__(name, ref, summary=doc[0] if doc else f"user aligner {name}")
        self.fn = fn

    def accepts(self, name: str) -> bool:
        """Free-form options: only ones its signature names (or any, with ``**kwargs``)."""
        params = inspect.signature(self.fn).parameters.values()
        return any(p.kind is inspect.Parameter.VAR_KEYWORD or p.name == name for p in params)

    def run(self, inputs: AlignInputs, params: Any) -> Permutation:
        """Call the function with the models, data, spec and the options."""
        return self.fn(inputs.model_a, inputs.model_b, inputs.data, inputs.spec,
                       **(params.model_extra or {}))


def _load_builtins() -> None:
    from .. import align  # noqa: F401 - align/__init__.py registers the built-in aligners


ALIGNERS: Registry[Aligner] = Registry("alignment method", loader=_load_builtins)
