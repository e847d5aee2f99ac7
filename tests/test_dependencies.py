"""Every import in src/ is provided by a declared dependency, or by an extra behind a clear message.

A plain ``pip install modeconn`` gets only ``[project].dependencies``: an import satisfied by an
extra or a dev tool by chance breaks for users (``click`` did: typer stopped bringing it).
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

import modeconn as mc

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def _norm(req: str) -> str:
    return re.split(r"[\s<>=!~;\[]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _imports(tree: ast.AST):
    """Yield (node, top-level module, lazy, guarded-with-install-hint) for each absolute import."""
    parents: dict[int, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[id(child)] = node
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods = [node.module]
        else:
            continue
        lazy = optional = guarded = False
        p = parents.get(id(node))
        while p is not None:
            if isinstance(p, ast.FunctionDef | ast.AsyncFunctionDef):
                lazy = True
            if isinstance(p, ast.Try):
                optional = True
                for h in p.handlers:
                    names = ast.unparse(h.type) if h.type is not None else "BaseException"
                    if "ImportError" in names or "ModuleNotFoundError" in names:
                        guarded = guarded or "modeconn[" in ast.unparse(h)
            p = parents.get(id(p))
        for m in mods:
            yield node, m.split(".")[0], lazy, optional, guarded


def test_every_import_is_declared_or_behind_an_extra_with_a_message():
    proj = _project()
    declared = {_norm(d) for d in proj["dependencies"]}
    extras = {_norm(d) for ds in proj["optional-dependencies"].values() for d in ds}
    own = {p.stem if p.is_file() else p.name for p in SRC.iterdir() if not p.name.startswith(".")}
    dists = md.packages_distributions()
    problems = []
    for f in sorted(SRC.rglob("*.py")):
        for node, top, lazy, optional, guarded in _imports(ast.parse(f.read_text(), str(f))):
            if top in sys.stdlib_module_names or top == "__future__" or top in own:
                continue
            provs = {_norm(d) for d in dists.get(top, [])}
            where = f"{f.relative_to(ROOT)}:{node.lineno}"
            if provs & declared:
                continue
            if provs & extras:
                if not (lazy and guarded):
                    problems.append(
                        f"{where}: `import {top}` comes from an extra; import it inside the "
                        "function with mc.require(module, extra) or a try/except ImportError "
                        "that names 'pip install modeconn[extra]'"
                    )
                continue
            if not optional:
                problems.append(f"{where}: `import {top}`: no declared dependency provides it")
    assert not problems, "\n".join(problems)


def test_extras_name_only_known_packages():
    # every extra's requirement is a real distribution name (a typo installs nothing)
    for extra, reqs in _project()["optional-dependencies"].items():
        for r in reqs:
            assert re.fullmatch(r"[A-Za-z0-9._\[\],-]+\s*([<>=!~]=?.*)?", r), (extra, r)


def test_require_names_the_extra():
    with pytest.raises(ImportError, match=r"pip install 'modeconn\[ot\]'"):
        mc.require("modeconn_no_such_package", "ot", feature="exact OT")


def test_cli_runs_without_the_click_package():
    # a plain install has typer's vendored click only: `modeconn --help` broke on `import click`
    pytest.importorskip("typer._click", reason="this typer still uses the click package")
    code = (
        "import sys; sys.modules['click'] = None; sys.argv = ['modeconn', '--help']\n"
        "import _modeconn_cli; _modeconn_cli.main()"
    )
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "train" in r.stdout
