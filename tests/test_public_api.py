"""The public names of docs/API.md exist (users, examples and acceptance checks rely on them)."""

from __future__ import annotations

import inspect

import pytest

import modeconn as mc

TOP_LEVEL = [
    # models, data, checkpoints
    "models", "data", "save_checkpoint", "load_checkpoint", "Checkpoint", "train",
    # symmetry
    "infer_spec", "PermutationSpec", "Permutation", "random_permutation", "apply_permutation",
    # alignment
    "weight_matching", "activation_matching", "ste_matching", "sinkhorn_matching", "align",
    "reset_bn", "repair", "merge_many",
    # paths
    "LinearPath", "BezierCurve", "PolyChain", "fit_curve", "evaluate_path", "PathEvaluation",
    # merging
    "merge",
]


@pytest.mark.parametrize("name", TOP_LEVEL)
def test_public_name_exists(name):
    assert hasattr(mc, name), f"modeconn.{name} is part of the public API (docs/API.md)"


def test_submodule_functions():
    assert callable(mc.models.create) and callable(mc.models.names)
    assert callable(mc.data.load) and inspect.isclass(mc.data.Splits)


def test_spec_groups_is_a_name_to_size_mapping():
    spec = mc.PermutationSpec.from_axes({"h": 3}, {"w": ("h", None)})
    assert spec.groups == {"h": 3}


def test_every_public_callable_has_a_docstring():
    missing = [
        n for n in mc.__all__
        if callable(getattr(mc, n)) and not inspect.getdoc(getattr(mc, n))
    ]
    assert not missing, f"public names without a docstring: {missing}"
