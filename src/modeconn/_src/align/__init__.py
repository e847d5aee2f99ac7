"""Alignment: every method returns the Permutation that maps model B's hidden units onto A's."""

from __future__ import annotations

from .activation import StreamingCorrelation, activation_matching
from .api import align, align_states, aligner_names, get_aligner, register_aligner
from .many import merge_many
from .weight import weight_matching, weight_objective

__all__ = [
    "StreamingCorrelation",
    "activation_matching",
    "align",
    "align_states",
    "aligner_names",
    "get_aligner",
    "merge_many",
    "register_aligner",
    "weight_matching",
    "weight_objective",
]
