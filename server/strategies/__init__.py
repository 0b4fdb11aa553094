"""Aggregation strategies, one module each, behind one interface (base.py)."""

from __future__ import annotations

import importlib

from .base import Strategy, StrategyError

# name -> (module, class); modules are imported on first use.
REGISTRY: dict[str, tuple[str, str]] = {
    "fedit": ("fedit", "FedIT"),
    "ffa": ("ffa", "FFALoRA"),
    "rolora": ("rolora", "RoLoRA"),
    "fedsa": ("fedsa", "FedSALoRA"),
    "layermean": ("layermean", "LayerMean"),
    "flexlora": ("flexlora", "FlexLoRA"),
    "flora": ("flora", "FLoRA"),
    "fedex": ("fedex", "FedExLoRA"),
    "lorafair": ("lorafair", "LoRAFAIR"),
    "hetlora": ("hetlora", "HetLoRA"),
    "rbla": ("rbla", "RBLA"),
    "fedinc": ("fedinc", "RankClustering"),
}


def get_strategy(name: str, **options) -> Strategy:
    """An instance of the strategy called ``name`` (options go to its constructor)."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in REGISTRY:
        raise StrategyError(f"unknown strategy {name!r}; known: {', '.join(REGISTRY)}")
    module, cls = REGISTRY[key]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)(**options)
