"""Aggregation strategies, one method per module, behind one contract (base.py).

Importing the package registers every method; names and capabilities come from
the classes themselves (``Strategy.name``, ``heterogeneous_ranks``,
``block_subsets``).
"""

from __future__ import annotations

# Imported for registration, in the order the CLI and the docs list the methods.
from . import fedit, ffa, rolora, fedsa, flexlora, flora, fedex, lorafair, hetlora, rbla  # noqa: F401, I001
from . import rank_clustering, layermean  # noqa: F401, I001
from .base import REGISTRY, Strategy, StrategyError, methods_with


def strategy_names() -> list[str]:
    """Every registered method name, in registration order."""
    return list(REGISTRY)


def get_strategy(name: str, **options) -> Strategy:
    """An instance of the strategy called ``name`` (options go to its constructor)."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in REGISTRY:
        raise StrategyError(f"unknown strategy {name!r}; known: {', '.join(REGISTRY)}")
    try:
        return REGISTRY[key](**options)
    except TypeError as exc:  # an option the method does not have
        raise StrategyError(f"{key}: bad strategy option ({exc}); see docs/algorithms.md#{key}") from None


__all__ = ["REGISTRY", "Strategy", "StrategyError", "get_strategy", "methods_with", "strategy_names"]
