"""The architecture, checked: one direction of dependency, short functions, a README that matches the tree.

Stage packages never import ``pipelines`` (it composes them); ``common`` imports no package of
this project, so anything may use it. The allowed edges below are the whole dependency graph: a new
edge is a design decision, made here on purpose, not by a stray import.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "dataprep", "slurm", "trainer", "evals", "pipelines")
# package -> the project packages it may import (besides itself)
ALLOWED = {
    "common": set(),
    "dataprep": {"common"},
    "slurm": {"common"},
    "trainer": {"common", "dataprep"},
    "evals": {"common", "dataprep", "slurm", "trainer"},
    "pipelines": {"common", "dataprep", "slurm", "trainer", "evals"},
}
MAX_FUNCTION_LINES = 60


def _modules(*packages: str) -> list[Path]:
    return sorted(p for pkg in packages for p in (REPO / pkg).rglob("*.py"))


def _imported_packages(path: Path) -> dict[str, int]:
    """Project packages ``path`` imports anywhere (module level or inside functions) -> first line."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            if top in PACKAGES:
                found.setdefault(top, node.lineno)
    return found


def test_the_packages_are_the_ones_the_layering_knows():
    tops = {p.parent.name for p in REPO.glob("*/__init__.py")}
    assert tops == set(PACKAGES), "a new top-level package needs its place in ALLOWED (and the README's architecture paragraph)"


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_only_go_down(package):
    upward = []
    for path in _modules(package):
        for imported, line in _imported_packages(path).items():
            if imported != package and imported not in ALLOWED[package]:
                upward.append(f"{path.relative_to(REPO)}:{line} imports {imported}")
    assert not upward, f"{package} may import only {sorted(ALLOWED[package]) or 'nothing of this project'}:\n" + "\n".join(upward)


def test_no_stage_imports_pipelines():
    """The rule the issue states, spelled out on its own: 0 upward imports from stage packages."""
    offenders = [f"{p.relative_to(REPO)}" for pkg in PACKAGES if pkg != "pipelines" for p in _modules(pkg)
                 if "pipelines" in _imported_packages(p)]  # fmt: skip
    assert offenders == []


def test_no_function_is_longer_than_60_lines():
    long = []
    for path in _modules(*PACKAGES, "bench"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, "split these:\n" + "\n".join(long)


def test_the_readme_architecture_paragraph_matches_the_tree():
    text = (REPO / "README.md").read_text()
    m = re.search(r"^## Architecture\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, "README.md needs an '## Architecture' section"
    section = m.group(1)
    for package in PACKAGES:
        assert f"`{package}/`" in section, f"the architecture paragraph does not describe {package}/"
    for ref in sorted(set(re.findall(r"`([a-z_]+/[a-z_]+\.py)`", section))):
        assert (REPO / ref).is_file(), f"README's architecture paragraph names {ref}, which does not exist"
    for a, b in re.findall(r"`([a-z]+)/` → `([a-z]+)/`", section):
        assert b in ALLOWED[a], f"README says {a}/ → {b}/, which the layering does not allow"
