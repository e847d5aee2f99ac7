"""The built-in aligners over the public functions: weight, activation, STE, Sinkhorn and PAM.

Each class is a thin :class:`~modeconn._src.align.base.Aligner` whose ``Params`` are the wrapped
function's keyword arguments (:func:`signature_params`) and whose ``run`` calls it; the papers
and formulas are in the functions' docstrings. Instances are registered in ``align/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from ..spec import Permutation, PermutationSpec
from .activation import activation_matching
from .base import Aligner, AlignInputs, signature_params
from .many import merge_many
from .pam import pam_align
from .sinkhorn import sinkhorn_matching
from .ste import ste_matching
from .weight import weight_matching

_MODELS = frozenset({"spec", "states", "models"})
_MODELS_DATA = _MODELS | {"data"}


def options(params: Any) -> dict[str, Any]:
    """The options the caller set (the wrapped function's own defaults apply to the rest)."""
    return {k: getattr(params, k) for k in params.model_fields_set}


class WeightMatchingAligner(Aligner):
    """Weight matching (Git Re-Basin, Ainsworth et al. 2023): max_pi sum_l <W_l^A, pi(W_l^B)>."""

    Params = signature_params(weight_matching, name="WeightMatchingParams")
    exact = True

    def run(self, inputs: AlignInputs, params: Any) -> Permutation:
        """:func:`weight_matching` on the two states."""
        return weight_matching(inputs.spec, inputs.state_a, inputs.state_b, **options(params))

    def run_many(
        self, spec: PermutationSpec, states: Sequence[Mapping[str, Tensor]], params: Any
    ) -> list[Permutation]:
        """MergeMany (:func:`merge_many`): each model matched to the mean of the others;
        ``max_iter`` bounds each inner weight matching, ``seed``/``progress`` pass through."""
        o = options(params)
        kw: dict[str, Any] = {k: o[k] for k in ("seed", "progress") if k in o}
        if "max_iter" in o:
            kw["inner_max_iter"] = o["max_iter"]
        return merge_many(spec, states, **kw)


class ActivationMatchingAligner(Aligner):
    """Activation matching (Li et al. 2016; Tatro et al. 2020): max_pi sum_i corr[i, pi(i)]."""

    Params = signature_params(activation_matching, exclude=("spec",),
                              name="ActivationMatchingParams")
    needs = _MODELS_DATA
    exact = True

    def run(self, inputs: AlignInputs, params: Any) -> Permutation:
        """:func:`activation_matching` on the two models and the data."""
        assert inputs.model_a is not None and inputs.model_b is not None
        return activation_matching(inputs.model_a, inputs.model_b, inputs.data,
                                   spec=inputs.spec, **options(params))


class SteAligner(Aligner):
    """Straight-through estimator matching (Git Re-Basin, Ainsworth et al. 2023)."""

    Params = signature_params(ste_matching, exclude=("spec",), name="SteParams")
    needs = _MODELS_DATA
    exact = True  # it keeps the weight-matching start when nothing beats it

    def run(self, inputs: AlignInputs, params: Any) -> Permutation:
        """:func:`ste_matching` on the two models and the data."""
        assert inputs.model_a is not None and inputs.model_b is not None
        return ste_matching(inputs.model_a, inputs.model_b, inputs.data, spec=inputs.spec,
                            **options(params))


class SinkhornAligner(Aligner):
    """Sinkhorn re-basin (Peña et al. 2023): learned soft permutations, rounded by Hungarian."""

    Params = signature_params(sinkhorn_matching, exclude=("spec",), name="SinkhornParams")
    needs = _MODELS
    exact = True

    def requires(self, params: Any) -> frozenset[str]:
        """Data only for ``loss="task"``."""
        return self.needs | ({"data"} if getattr(params, "loss", "weight") == "task" else set())

    def run(self, inputs: AlignInputs, params: Any) -> Permutation:
        """:func:`sinkhorn_matching` on the two models (and the data for ``loss="task"``)."""
        assert inputs.model_a is not None and inputs.model_b is not None
        return sinkhorn_matching(inputs.model_a, inputs.model_b, inputs.data, spec=inputs.spec,
                                 **options(params))


class PamAligner(Aligner):
    """PAM phase 1 (Tatro et al. 2020): relaxed permutations learned on the curve's loss."""

    Params = signature_params(pam_align, exclude=("spec",), name="PamParams")
    needs = _MODELS_DATA
    exact = False  # it optimises the curve loss, not agreement with a planted permutation

    def run(self, inputs: AlignInputs, params: Any) -> Permutation:
        """:func:`pam_align` on the two models and the data."""
        assert inputs.model_a is not None and inputs.model_b is not None
        return pam_align(inputs.model_a, inputs.model_b, inputs.data, spec=inputs.spec,
                         **options(params))
