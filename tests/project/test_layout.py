"""The package stays readable: no module over 400 lines, no function over 60 (its docstring not
counted), the import rules of pyproject.toml hold (`ruff`, `lint-imports`), and no test module
imports another.

Run by itself to list what is over: ``python tests/project/test_layout.py [PATH ...]``.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

SRC = ROOT / "src" / "featdenoise"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60

# Named exceptions, each with its reason: {"path relative to src/featdenoise[:function]": why}.
EXCEPTIONS: dict[str, str] = {}


def _docstring_lines(node: ast.AST) -> int:
    body = getattr(node, "body", [])
    if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)):
        return body[0].end_lineno - body[0].lineno + 1
    return 0


def function_lengths(path: Path) -> list[tuple[str, int]]:
    """``(qualified name, lines without the docstring)`` for every function of ``path``."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                length = child.end_lineno - child.lineno + 1 - _docstring_lines(child)
                found.append((name, length))
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    visit(ast.parse(path.read_text()), "")
    return found


def over_limits(paths: list[Path]) -> list[str]:
    """Every module over MAX_MODULE_LINES and function over MAX_FUNCTION_LINES, less the named
    exceptions."""
    problems = []
    for path in sorted(p for root in paths for p in ([root] if root.is_file()
                                                       else root.rglob("*.py"))):
        rel = path.relative_to(SRC).as_posix()
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES and rel not in EXCEPTIONS:
            problems.append(f"{rel}: {lines} lines (at most {MAX_MODULE_LINES})")
        for name, length in function_lengths(path):
            if length > MAX_FUNCTION_LINES and f"{rel}:{name}" not in EXCEPTIONS:
                problems.append(f"{rel}:{name}: {length} lines (at most {MAX_FUNCTION_LINES})")
    return problems


def test_modules_and_functions_read_in_one_sitting():
    problems = over_limits([SRC])
    assert not problems, "\n".join(problems)


def test_exceptions_are_still_needed():
    stale = []
    for key in EXCEPTIONS:
        rel, _, name = key.partition(":")
        path = SRC / rel
        if not path.is_file():
            stale.append(key)
        elif not name and len(path.read_text().splitlines()) <= MAX_MODULE_LINES:
            stale.append(key)
        elif name and dict(function_lengths(path)).get(name, 0) <= MAX_FUNCTION_LINES:
            stale.append(key)
    assert not stale, f"exceptions no longer needed (remove them): {stale}"


def test_no_test_module_imports_another():
    """Shared code lives in tests/helpers.py (and tests/gpu/gpu_utils.py for the GPU checks)."""
    found = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.relative_to(ROOT)} imports {n}" for n in names
                      if n.split(".")[-1].startswith("test_")]
    assert not found, found


def _tool(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    found = str(exe) if exe.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed; run `make install`")
    return found


def test_ruff_rules_hold():
    """Imports at module top (PLC0415), small signatures (PLR0913), simple functions (C901)."""
    run = subprocess.run([_tool("ruff"), "check", "src", "tests", "scripts"], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_layers_and_no_circles():
    """The import-linter contracts of pyproject.toml: each package imports only downward, and
    the modules of a package import one another without circles."""
    run = subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=ROOT, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr


if __name__ == "__main__":
    for line in over_limits([Path(a).resolve() for a in sys.argv[1:]] or [SRC]):
        print(line)
