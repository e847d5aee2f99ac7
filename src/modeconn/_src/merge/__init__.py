"""Merging: one model from several, by averaging, soups, Fisher, RegMean, task vectors or SLERP.

Every method is registered here, explicitly, as a configured instance; ``merge_methods()`` lists
them in this order.
"""

from __future__ import annotations

from .api import MergedState, merge, merge_methods
from .average import AverageMerge
from .base import MergeInputs, MergeMethod, Params, Reference, get_method, register
from .fisher import FisherMerge, diagonal_fisher, fisher_weighted_average
from .recipe import MergeRecipe
from .regmean import RegMeanMerge, gram_matrices, regmean_solve
from .slerp import SlerpMerge, slerp
from .soup import GreedySoupMerge
from .stream import merge_files, streaming_methods
from .task_arithmetic import (
    DareParams,
    GeneralizedTaskArithmetic,
    TaskArithmeticParams,
    TiesParams,
    disjoint_merge,
    drop_and_rescale,
    magnitude_threshold,
    trim_magnitude,
)
from .tensorwise import TensorPlan, TensorwiseMerge, kth_smallest_abs

register(AverageMerge(
    "average",
    Reference("Wortsman et al., Model soups (uniform soup)", 2022, "https://arxiv.org/abs/2203.05482"),
    summary="weighted average of the models (uniform soup)",
))
register(GreedySoupMerge(
    "soup",
    Reference("Wortsman et al., Model soups (greedy soup)", 2022, "https://arxiv.org/abs/2203.05482"),
    summary="greedy soup: add a model only if held-out accuracy strictly improves",
))
register(FisherMerge(
    "fisher",
    Reference("Matena & Raffel, Merging Models with Fisher-Weighted Averaging", 2022,
              "https://arxiv.org/abs/2111.09832"),
    summary="Fisher-weighted average (diagonal Fisher, exact or empirical)",
))
register(RegMeanMerge(
    "regmean",
    Reference("Jin et al., Dataless Knowledge Fusion by Merging Weights of Language Models", 2023,
              "https://arxiv.org/abs/2212.09849"),
    summary="per Linear/Conv layer least squares on the models' Gram matrices",
))
register(GeneralizedTaskArithmetic(
    "task_arithmetic",
    Reference("Ilharco et al., Editing Models with Task Arithmetic", 2023,
              "https://arxiv.org/abs/2212.04089"),
    params=TaskArithmeticParams, sparsify="none", consensus=False,
    identity_params={"normalize": True},
    summary="base + scale * sum of task vectors (normalize=True: their weighted mean)",
))
register(GeneralizedTaskArithmetic(
    "ties",
    Reference("Yadav et al., TIES-Merging: Resolving Interference When Merging Models", 2023,
              "https://arxiv.org/abs/2306.01708"),
    params=TiesParams, sparsify="magnitude", consensus=True, identity_params={"density": 1.0},
    summary="trim to top-k magnitudes, elect sign, disjoint mean",
))
register(GeneralizedTaskArithmetic(
    "dare",
    Reference("Yu et al., Language Models are Super Mario (DARE)", 2024,
              "https://arxiv.org/abs/2311.03099"),
    params=DareParams, sparsify="random", consensus=False,
    identity_params={"p": 0.0, "normalize": True},
    summary="drop task-vector entries with prob p, rescale by 1/(1-p), then sum or TIES",
))
register(SlerpMerge(
    "slerp",
    Reference("Shoemake, Animating rotation with quaternion curves (SLERP)", 1985,
              "https://doi.org/10.1145/325165.325242"),
    summary="spherical interpolation of two models, per tensor",
))

__all__ = [
    "AverageMerge",
    "DareParams",
    "FisherMerge",
    "GeneralizedTaskArithmetic",
    "GreedySoupMerge",
    "MergeInputs",
    "MergeMethod",
    "MergeRecipe",
    "MergedState",
    "Params",
    "Reference",
    "RegMeanMerge",
    "SlerpMerge",
    "TaskArithmeticParams",
    "TensorPlan",
    "TensorwiseMerge",
    "TiesParams",
    "diagonal_fisher",
    "disjoint_merge",
    "drop_and_rescale",
    "fisher_weighted_average",
    "get_method",
    "gram_matrices",
    "kth_smallest_abs",
    "magnitude_threshold",
    "merge",
    "merge_files",
    "merge_methods",
    "register",
    "regmean_solve",
    "slerp",
    "streaming_methods",
    "trim_magnitude",
]
