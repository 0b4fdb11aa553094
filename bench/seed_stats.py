"""Figures over seeds, and the rule for a claim: a method is ahead of or
behind a baseline only where its difference, paired by seed, exceeds the
spread of that difference over at least 3 seeds."""

from __future__ import annotations

import statistics

MIN_SEEDS = 3


def spread(values: list[float]) -> str:
    """Mean ± sample standard deviation (the mean alone for one value)."""
    mean = statistics.fmean(values)
    return f"{mean:+.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:+.3f}"


def mean_sd(values: list[float]) -> str:
    """Mean ± sample standard deviation of accuracies (unsigned)."""
    mean = statistics.fmean(values)
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:.3f}"


def paired(mine: dict[int, float], base: dict[int, float]) -> list[float]:
    """Per-seed differences mine - base over the seeds both ran."""
    return [mine[s] - base[s] for s in sorted(mine) if s in base]


def verdict(diffs: list[float], baseline: str) -> str:
    """"ahead of"/"behind" ``baseline`` only where the mean paired difference
    exceeds its standard deviation over at least ``MIN_SEEDS`` seeds."""
    if len(diffs) < MIN_SEEDS:
        return f"fewer than {MIN_SEEDS} seeds: no claim"
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    if abs(mean) <= sd:
        return "within the spread"
    return f"ahead of {baseline}" if mean > 0 else f"behind {baseline}"
