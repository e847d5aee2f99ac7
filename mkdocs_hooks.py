"""mkdocs hooks: the README tour as site pages, CHANGELOG.md as a page, every docs/*.md in the nav.

The README stays the one source of the tour: its part up to "## Models" is the home page, each
later "## " section a page under guide/. Links into docs/ are rewritten to the site's pages;
links to other files of the repository become plain text (they are not part of the site).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
_GUIDE_FROM = "## Models"


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _guide_sections() -> tuple[str, list[tuple[str, str]]]:
    """README -> (home text, [(title, section text)]): split at "## " headings outside code."""
    head: list[str] = []
    sections: list[tuple[str, list[str]]] = []
    fenced = False
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines(keepends=True):
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("## ") and (sections or line.strip() == _GUIDE_FROM):
            title = line[3:].strip()
            sections.append((title, [f"# {title}\n"]))
        elif sections:
            sections[-1][1].append(line)
        else:
            head.append(line)
    return "".join(head), [(t, "".join(body)) for t, body in sections]


def _patch_griffe() -> None:
    """Read Google-style "Example:" sections (this project's spelling) as examples, like
    "Examples:", so doctest outputs render as code instead of markdown."""
    try:
        from griffe._internal.docstrings import google
        from griffe._internal.enumerations import DocstringSectionKind
    except ImportError:  # another griffe layout: "Example:" renders as an admonition
        return
    google._section_kind.setdefault("example", DocstringSectionKind.examples)


_patch_griffe()


def _links(text: str, depth: int, guide: frozenset[str] | set[str] = frozenset()) -> str:
    """Rewrite README links for a page ``depth`` folders below the site root (``guide``: the
    slugs of the sections that became guide pages, for ``#section`` links)."""
    up = "../" * depth

    def fix(m: re.Match[str]) -> str:
        label, target = m.group(1), m.group(2)
        if target.startswith("#") and target[1:] in guide:
            return f"[{label}]({up}guide/{target[1:]}.md)"
        if re.match(r"[a-z]+://|#|mailto:", target):
            return m.group(0)
        if target == "README.md":
            return f"[{label}]({up}index.md)"
        if target.startswith("docs/"):
            return f"[{label}]({up}{target[len('docs/'):]})"
        if target == "CHANGELOG.md":
            return f"[{label}]({up}changelog.md)"
        return label  # a repository file outside the site

    return _LINK.sub(fix, text)


def on_config(config: Any) -> Any:
    """Add the guide pages and every other docs/*.md (results included) to the navigation."""
    _, sections = _guide_sections()
    nav = list(config["nav"] or [])
    listed = {next(iter(item.values())) for item in nav if isinstance(item, dict)}
    nav.insert(1, {"Guide": [{t: f"guide/{_slug(t)}.md"} for t, _ in sections]})
    docs = Path(config["docs_dir"])
    extra = [p.relative_to(docs).as_posix() for p in sorted(docs.rglob("*.md"))]
    extra = [p for p in extra if p not in listed and not p.startswith(("guide/", "results/"))]
    nav += [{_title(docs / p): p} for p in extra]
    results = sorted(p.relative_to(docs).as_posix() for p in (docs / "results").glob("*.md"))
    if results:
        nav.append({"Results": [{_title(docs / p): p} for p in results]})
    config["nav"] = nav
    return config


def _title(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return path.stem


def on_files(files: Files, config: Any) -> Files:
    """Generate index.md, guide/*.md (from README.md) and changelog.md (from CHANGELOG.md)."""
    home, sections = _guide_sections()
    slugs = {_slug(t) for t, _ in sections}
    pages = {"index.md": _links(home, 0, slugs)}
    pages.update({f"guide/{_slug(t)}.md": _links(body, 1, slugs) for t, body in sections})
    changelog = ROOT / "CHANGELOG.md"
    if changelog.is_file():
        pages["changelog.md"] = _links(changelog.read_text(encoding="utf-8"), 0)
    for uri, content in pages.items():
        files.append(File.generated(config, uri, content=content))
    return files
