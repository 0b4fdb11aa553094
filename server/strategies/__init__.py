"""Aggregation strategies, one method per module, behind one contract (base.py).

Importing the package registers every method; names and capabilities come from
the classes themselves (``Strategy.name``, ``heterogeneous_ranks``,
``block_subsets``).
"""

from __future__ import annotations

import inspect

# Imported for registration, in the order the CLI and the docs list the methods.
from . import fedit, ffa, rolora, fedsa, flexlora, flora, fedex, lorafair, hetlora, rbla  # noqa: F401, I001
from . import rank_clustering, layermean  # noqa: F401, I001
from .base import REGISTRY, Strategy, StrategyError, methods_with


def strategy_names() -> list[str]:
    """Every registered method name, in registration order."""
    return list(REGISTRY)


def strategy_class(name: str) -> type[Strategy]:
    """The class of the strategy called ``name`` (case, ``-`` and ``_`` ignored)."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in REGISTRY:
        raise StrategyError(f"unknown strategy {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[key]


def get_strategy(name: str, **options) -> Strategy:
    """An instance of the strategy called ``name`` (options go to its constructor)."""
    cls = strategy_class(name)
    key = cls.name
    known = [p for p in inspect.signature(cls).parameters if p != "seed"]
    unknown = sorted(set(options) - set(known) - {"seed"})
    if unknown:
        raise StrategyError(f"{key} has no option {', '.join(unknown)}; its options: {', '.join(known) or 'none'} "
                            f"(docs/algorithms.md#{key})")
    return cls(**options)


__all__ = ["REGISTRY", "Strategy", "StrategyError", "get_strategy", "methods_with", "strategy_class",
           "strategy_names"]
