"""Alignment: every method returns the Permutation that maps model B's hidden units onto A's.

Every aligner is registered here, explicitly, as a configured instance (``aligner_names()``
lists them in this order); ``align()`` / ``align_states()`` check the inputs once and run one.
"""

from __future__ import annotations

from .activation import StreamingCorrelation, activation_matching
from .annealing import AnnealingAligner, annealing_matching
from .api import (
    align,
    align_states,
    aligner_names,
    get_aligner,
    register_aligner,
    resolve_spec,
    run_aligner,
)
from .base import Aligner, AlignInputs, FunctionAligner, Params, Reference, signature_params
from .builtins import (
    ActivationMatchingAligner,
    PamAligner,
    SinkhornAligner,
    SteAligner,
    WeightMatchingAligner,
)
from .many import merge_many
from .ot import OtAligner, ot_barycenter, ot_fusion, ot_matching, ot_transport
from .pam import pam_align
from .sinkhorn import sinkhorn_matching
from .ste import ste_matching
from .weight import weight_matching, weight_objective

_GIT_REBASIN = Reference(
    "Ainsworth, Hayase & Srinivasa, Git Re-Basin: Merging Models modulo Permutation Symmetries",
    2023, "https://arxiv.org/abs/2209.04836")
_TATRO = Reference(
    "Tatro et al., Optimizing Mode Connectivity via Neuron Alignment", 2020,
    "https://arxiv.org/abs/2009.02439")

register_aligner(WeightMatchingAligner(
    "weight", _GIT_REBASIN, summary="weight matching: coordinate descent over layers (Hungarian)"))
register_aligner(ActivationMatchingAligner(
    "activation", _TATRO, summary="activation matching: maximise the correlation of matched units"))
register_aligner(SteAligner(
    "ste", _GIT_REBASIN, summary="straight-through estimator on the midpoint's loss"))
register_aligner(SinkhornAligner(
    "sinkhorn",
    Reference("Peña, Medeiros, Xu & Dhillon, Re-basin via implicit Sinkhorn differentiation", 2023,
              "https://arxiv.org/abs/2212.12042"),
    summary="Sinkhorn soft permutations learned by gradient descent, then rounded"))
register_aligner(PamAligner(
    "pam", _TATRO, summary="PAM phase 1: relaxed permutations learned on the curve's loss"))
register_aligner(OtAligner(
    "ot",
    Reference("Singh & Jaggi, Model Fusion via Optimal Transport", 2020,
              "https://arxiv.org/abs/1910.05653"),
    summary="OT fusion: per-layer transport plans (weights or activations), rounded"))
register_aligner(AnnealingAligner(
    "annealing",
    Reference("Entezari, Sedghi, Saukh & Neyshabur, The Role of Permutation Invariance in Linear "
              "Mode Connectivity of Neural Networks", 2022, "https://arxiv.org/abs/2110.06296"),
    summary="simulated annealing over unit swaps, minimising the path's midpoint loss/barrier"))

__all__ = [
    "ActivationMatchingAligner",
    "AnnealingAligner",
    "OtAligner",
    "annealing_matching",
    "ot_barycenter",
    "ot_fusion",
    "ot_matching",
    "ot_transport",
    "AlignInputs",
    "Aligner",
    "FunctionAligner",
    "PamAligner",
    "Params",
    "Reference",
    "SinkhornAligner",
    "SteAligner",
    "StreamingCorrelation",
    "WeightMatchingAligner",
    "activation_matching",
    "align",
    "align_states",
    "aligner_names",
    "get_aligner",
    "merge_many",
    "pam_align",
    "register_aligner",
    "resolve_spec",
    "run_aligner",
    "signature_params",
    "sinkhorn_matching",
    "ste_matching",
    "weight_matching",
    "weight_objective",
]
