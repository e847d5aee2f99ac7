"""The public names of docs/API.md exist (users, examples and acceptance checks rely on them)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
from torch import nn

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
]  # fmt: skip


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
    ]  # fmt: skip
    assert not missing, f"public names without a docstring: {missing}"


# --- the curated __all__ -----------------------------------------------------------------------


def _imported_public_names() -> set[str]:
    """Every non-private name ``modeconn/__init__.py`` imports (read from its source)."""
    tree = ast.parse(Path(mc.__file__).read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            names.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.asname or a.name.split(".")[0] for a in node.names)
    return {n for n in names if not n.startswith("_")}


def test_all_is_curated_and_complete():
    listed = [n for n in mc.__all__ if n != "__version__"]
    assert len(listed) == len(set(listed)), "a name is listed twice in __all__"
    assert set(listed) == _imported_public_names(), (
        "__all__ and the imports of modeconn/__init__.py differ: "
        f"only listed {sorted(set(listed) - _imported_public_names())}, "
        f"only imported {sorted(_imported_public_names() - set(listed))}"
    )
    assert "annotations" not in mc.__all__  # the old dir() trick exported `from __future__`
    assert all(hasattr(mc, n) for n in mc.__all__)


def test_docs_api_md_lists_every_public_name():
    doc = Path(__file__).resolve().parents[1] / "docs" / "API.md"
    text = doc.read_text()
    missing = [n for n in mc.__all__ if f"`{n}" not in text and f"mc.{n}" not in text]
    assert not missing, f"docs/API.md does not document {missing}"


# --- signatures: the parameters docs/API.md promises ----------------------------------------
# (name, parameters in order: "x" required, "x=default" with that default, "*" starts the
# keyword-only ones, "**" accepts extra keywords). Signatures may grow optional keywords; the
# required parameters must be exactly these.

SIGNATURES = {
    "models.create": "name, *, **",
    "models.names": "",
    "data.load": "source, **",
    "save_checkpoint": "path, model_or_state, *, meta=None",
    "load_checkpoint": "path",
    "Checkpoint.build": "self, model=None, **",
    "infer_spec": "model, example_inputs",
    "random_permutation": "spec, seed=0",
    "apply_permutation": "spec, perm, state",
    "weight_matching": "spec, state_a, state_b, *, max_iter=100, seed=0",
    "activation_matching": "model_a, model_b, data, *, spec=None",
    "ste_matching": "model_a, model_b, data",
    "sinkhorn_matching": "model_a, model_b, data=None",
    "align": "model_a, model_b, *, method='weight', data=None",
    "reset_bn": "model, data",
    "repair": "model_a, model_b, model_merged, data, *, alpha=0.5",
    "LinearPath": "state_a, state_b",
    "BezierCurve": "points",
    "PolyChain": "points",
    "LinearPath.state": "self, t",
    "fit_curve": "model_a, model_b, data, *, kind='bezier', bends=1, align=None, epochs",
    "evaluate_path": "model, path, data, *, ts=25, bn_data=None",
    "PathEvaluation.barrier": "self, metric='loss'",
    "PathEvaluation.to_dict": "self",
    "merge": "states, *, method='average', **",
}


def _resolve(dotted: str):
    obj = mc
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signature_matches_api_md(name):
    params = list(inspect.signature(_resolve(name)).parameters.values())
    P = inspect.Parameter
    promised = [p.strip() for p in SIGNATURES[name].split(",") if p.strip()]
    keyword_only = False
    for item in promised:
        if item == "*":
            keyword_only = True
            continue
        if item == "**":
            assert any(p.kind is P.VAR_KEYWORD for p in params), f"{name} takes no **kwargs"
            continue
        pname, _, default = item.partition("=")
        got = {p.name: p for p in params}.get(pname)
        assert got is not None, f"{name} has no parameter {pname!r}"
        if keyword_only:
            assert got.kind is P.KEYWORD_ONLY, f"{name}: {pname} should be keyword-only"
        else:
            assert got.kind is P.POSITIONAL_OR_KEYWORD, f"{name}: {pname} should be positional"
        if default:
            assert got.default is not P.empty, f"{name}: {pname} should be optional"
            if default != "...":
                assert got.default == ast.literal_eval(default), f"{name}: {pname} default"
        elif pname in ("epochs",):  # documented as `epochs=...`: optional, any default
            assert got.default is not P.empty
        else:
            assert got.default is P.empty, f"{name}: {pname} should be required"
    # no other required parameter
    names = {i.partition("=")[0] for i in promised}
    extra = [
        p.name for p in params
        if p.default is P.empty and p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)
        and p.name not in names
    ]  # fmt: skip
    assert not extra, f"{name} requires parameters docs/API.md does not list: {extra}"
    # the documented positional parameters come first, in order
    positional = [i.partition("=")[0] for i in promised[: promised.index("*")]] if (
        "*" in promised
    ) else [i.partition("=")[0] for i in promised if i != "**"]
    head = [p.name for p in params if p.kind is P.POSITIONAL_OR_KEYWORD][: len(positional)]
    assert head == positional, f"{name}: positional parameters {head}, promised {positional}"


# --- behaviour promised by docs/API.md, on a tiny model ----------------------------------------


def test_api_md_walkthrough_on_a_tiny_model(tmp_path):
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long()
    net_a = mc.models.create("mlp", input_shape=(4,), num_classes=2, width=8, depth=1, seed=0)
    net_b = mc.models.create("mlp", input_shape=(4,), num_classes=2, width=8, depth=1, seed=1)
    # checkpoints: .state, .meta, .build()
    mc.save_checkpoint(tmp_path / "a.safetensors", net_a, meta={"seed": 0})
    ck = mc.load_checkpoint(tmp_path / "a.safetensors")
    assert ck.meta["seed"] == 0 and set(ck.state) == set(net_a.state_dict())
    assert isinstance(ck.build(), nn.Module)
    # symmetry
    spec = mc.infer_spec(net_a, x[:2])
    assert spec.groups == {"layers.0": 8}
    perm = mc.random_permutation(spec, seed=0)
    assert set(perm) == {"layers.0"}
    # alignment: each method maps B onto A; sinkhorn needs no data
    for p in (
        mc.weight_matching(spec, net_a.state_dict(), net_b.state_dict(), max_iter=5, seed=0),
        mc.activation_matching(net_a, net_b, (x, y)),
        mc.sinkhorn_matching(net_a, net_b),
    ):
        assert isinstance(p, mc.Permutation) and sorted(p["layers.0"].tolist()) == list(range(8))
    b_aligned = mc.align(net_a, net_b, method="weight")
    assert isinstance(b_aligned, nn.Module) and b_aligned is not net_b
    torch.testing.assert_close(b_aligned(x), net_b(x))
    # paths: fit_curve -> BezierCurve | PolyChain; evaluate_path -> PathEvaluation
    curve = mc.fit_curve(net_a, net_b, (x, y), kind="bezier", bends=1, epochs=1, progress=False)
    assert isinstance(curve, mc.BezierCurve)
    chain = mc.fit_curve(net_a, net_b, (x, y), kind="polychain", epochs=1, progress=False)
    assert isinstance(chain, mc.PolyChain)
    ev = mc.evaluate_path(net_a, curve, (x, y), ts=5, bn_data=None, progress=False)
    assert isinstance(ev, mc.PathEvaluation)
    assert all(isinstance(t, torch.Tensor) and len(t) == 5 for t in (ev.ts, ev.loss, ev.accuracy))
    assert ev.barrier("loss") >= 0 and 0 <= ev.barrier("error") <= 1
    assert isinstance(ev.to_dict(), dict)
    # merging: every documented method is registered
    documented = {"average", "soup", "fisher", "regmean", "task_arithmetic", "ties", "dare",
                  "slerp"}  # fmt: skip
    assert documented <= set(mc.merge_methods())
    merged = mc.merge([net_a.state_dict(), net_b.state_dict()], method="average")
    torch.testing.assert_close(
        merged["head.weight"], (net_a.head.weight + net_b.head.weight).detach() / 2
    )
