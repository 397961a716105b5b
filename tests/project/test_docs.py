"""The README and the documentation site agree with the files and the CLI they describe.

Cheap static checks; the full strict build is ``make docs`` (``mkdocs build --strict``).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import yaml
from helpers import ROOT

DOCS = ROOT / "docs"
README = ROOT / "README.md"

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
COMMAND = re.compile(r"(?<![\w.-])featdenoise ([a-z][a-z-]*)")
MKDOCSTRINGS = re.compile(r"^::: ([\w.]+)\s*$", re.M)


def nav_pages(node) -> list[str]:
    """Every page path of a mkdocs ``nav`` (nested lists of ``{title: path or list}``)."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [page for item in node for page in nav_pages(item)]
    if isinstance(node, dict):
        return [page for value in node.values() for page in nav_pages(value)]
    raise TypeError(f"unexpected nav entry {node!r}")


@pytest.fixture(scope="module")
def nav() -> list[str]:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    assert config["docs_dir"] == "docs"
    return nav_pages(config["nav"])


def doc_pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def code_of(text: str) -> str:
    """The code in a markdown text: fenced blocks, indented blocks and inline code spans."""
    fenced = FENCE.findall(text)
    rest = FENCE.sub("", text)
    indented = [line for line in rest.splitlines() if line.startswith("    ")]
    return "\n".join(fenced + indented + INLINE_CODE.findall(rest))


def relative_links(text: str) -> list[str]:
    """Link targets that are files of the repository (no URL, no bare anchor), anchor dropped."""
    targets = []
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def cli_commands() -> set[str]:
    from featdenoise import cli

    parser = cli.build_parser()
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(subparsers) == 1
    return set(subparsers[0].choices)


def test_every_nav_entry_is_a_page(nav):
    missing = [page for page in nav if not (DOCS / page).is_file()]
    assert not missing, f"mkdocs.yml nav names pages that do not exist under docs/: {missing}"
    assert len(nav) == len(set(nav)), "a page appears twice in the nav"


def test_every_page_is_in_the_nav(nav):
    pages = {p.relative_to(DOCS).as_posix() for p in doc_pages()}
    assert pages, "docs/ holds no page"
    orphans = sorted(pages - set(nav))
    assert not orphans, f"pages missing from mkdocs.yml's nav: {orphans}"


def test_readme_is_one_screen_and_names_the_test_command():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 200
    assert "make test" in text
    assert "Feature Denoising for Improving Adversarial Robustness" in text


@pytest.mark.parametrize("path", [README, *doc_pages()],
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_at_files(path):
    broken = [t for t in relative_links(path.read_text(encoding="utf-8"))
              if not (path.parent / t).exists()]
    assert not broken, f"{path.relative_to(ROOT)} links to missing files: {broken}"


def test_readme_links_to_the_docs():
    linked = {(README.parent / t).resolve() for t in relative_links(README.read_text("utf-8"))}
    for page in ("getting-started.md", "results.md", "benchmarks.md", "api/index.md"):
        assert (DOCS / page).resolve() in linked, f"README does not link docs/{page}"


def test_commands_shown_exist_in_the_cli():
    known = cli_commands()
    assert {"train", "eval", "visualize", "convert", "demo"} <= known
    for path in [README, *doc_pages()]:
        shown = set(COMMAND.findall(code_of(path.read_text(encoding="utf-8"))))
        unknown = sorted(shown - known)
        assert not unknown, f"{path.relative_to(ROOT)} shows commands the CLI lacks: {unknown}"


def test_readme_shows_a_cli_tour():
    shown = set(COMMAND.findall(code_of(README.read_text(encoding="utf-8"))))
    assert len(shown) >= 3, shown


def test_api_pages_name_modules_that_exist():
    named = [m for page in doc_pages() for m in MKDOCSTRINGS.findall(page.read_text("utf-8"))]
    assert named, "no API page uses mkdocstrings (::: module)"
    for module in named:
        base = ROOT / "src" / Path(*module.split("."))
        assert base.with_suffix(".py").is_file() or (base / "__init__.py").is_file(), module


def test_pictures_are_shown():
    shown = {(p.parent / t).resolve() for p in doc_pages()
             for t in relative_links(p.read_text("utf-8")) if t.endswith(".png")}
    for picture in DOCS.glob("*.png"):
        assert picture.resolve() in shown, f"{picture.name} is on no page"
