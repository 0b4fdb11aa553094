"""The layer rule (docs/architecture.md): imports run split <- profiles <- {edge,
server}; edge and server never import each other; the CLI (split/cli.py) is the
one composition root that imports both sides."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("split", "profiles", "edge", "server")
COMPOSITION_ROOT = Path("split/cli.py")
# What each package may import from the project (besides itself).
ALLOWED = {"split": set(), "profiles": {"split"}, "edge": {"split", "profiles"}, "server": {"split", "profiles"}}


def project_imports(source: str, package: str) -> set[str]:
    """The project packages a module of ``package`` imports, anywhere in it
    (function-local imports included), relative imports resolved."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [package] if node.level else [node.module or ""]
        else:
            continue
        found |= {name.split(".")[0] for name in names if name.split(".")[0] in PACKAGES}
    return found - {package}


def modules():
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def imports_of(path: Path) -> set[str]:
    return project_imports(path.read_text(), path.relative_to(ROOT).parts[0])


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_one_way(path):
    rel = path.relative_to(ROOT)
    imported = imports_of(path)
    if rel == COMPOSITION_ROOT:
        assert imported <= {"edge", "server", "profiles"}
        return
    forbidden = imported - ALLOWED[rel.parts[0]]
    assert not forbidden, f"{rel} imports {sorted(forbidden)}, against the layer rule"


def test_the_checker_sees_violations():
    # Function-local imports of the other side, in either spelling, are caught.
    source = "def f():\n    from server.rounds import Coordinator\n    import server.service\n"
    assert project_imports(source, "edge") == {"server"}
    assert project_imports("from . import client\nfrom .data import x\n", "edge") == set()
    assert imports_of(ROOT / "server" / "strategies" / "common.py") == {"split"}


def test_only_the_composition_root_imports_both_sides():
    both = [p.relative_to(ROOT) for p in modules() if {"edge", "server"} <= imports_of(p)]
    assert both == [COMPOSITION_ROOT]
