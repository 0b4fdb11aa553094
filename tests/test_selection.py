"""Layer allocation math (profiles/selection.py): FedRA's matrix, the exact
knapsack against brute force, and the Fed-piLot and Fisher values."""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from profiles.selection import (chain_knapsack, fedpilot_scores, fedra_matrix, fisher_scores, knapsack,
                                worst_case_count)

# ---------------------------------------------------------------- FedRA


@pytest.mark.parametrize("cover_all", [False, True])
def test_fedra_rows_hold_exactly_their_capacity(cover_all):
    capacities = [1, 3, 6, 0, 12, 4]
    for r in range(20):
        m = fedra_matrix(capacities, 12, seed=5, round=r, cover_all=cover_all)
        assert m.shape == (6, 12)
        assert set(np.unique(m)) <= {0, 1}
        assert m.sum(axis=1).tolist() == capacities


def test_fedra_is_deterministic_per_seed_and_differs_across_rounds_and_seeds():
    caps = [3, 5, 2]
    a = fedra_matrix(caps, 12, seed=1, round=4)
    assert np.array_equal(a, fedra_matrix(caps, 12, seed=1, round=4))
    assert not np.array_equal(a, fedra_matrix(caps, 12, seed=1, round=5))
    assert not np.array_equal(a, fedra_matrix(caps, 12, seed=2, round=4))


def test_fedra_cover_all_covers_every_block_when_capacities_allow():
    for r in range(200):
        rng = random.Random(r)
        caps = [rng.randint(0, 6) for _ in range(rng.randint(1, 5))]
        m = fedra_matrix(caps, 6, seed=0, round=r, cover_all=True)
        covered = int((m.sum(axis=0) > 0).sum())
        assert covered == min(6, sum(caps))  # every block, or as many as the slots allow


def test_fedra_without_cover_all_leaves_blocks_out_sometimes():
    # Two clients of 3 on 6 blocks cover all only when they draw disjoint halves.
    misses = sum(int((fedra_matrix([3, 3], 6, seed=0, round=r).sum(axis=0) == 0).any()) for r in range(50))
    assert misses > 25


def test_fedra_rows_stay_uniform_under_cover_all():
    # Each row on its own is a uniform L_i-subset: every block equally often.
    counts = np.zeros(6)
    rounds = 3000
    for r in range(rounds):
        counts += fedra_matrix([2, 4, 1], 6, seed=3, round=r, cover_all=True)[0]
    expected = rounds * 2 / 6
    assert np.all(np.abs(counts - expected) < 5 * math.sqrt(expected))


def test_fedra_refuses_capacities_beyond_the_model():
    with pytest.raises(ValueError, match=r"capacity must be an integer in \[0, 4\]"):
        fedra_matrix([5], 4, seed=0, round=0)


# ---------------------------------------------------------------- knapsack


def brute_force(values, costs, budget, max_items=None):
    best = 0.0
    for k in range(len(values) + 1):
        if max_items is not None and k > max_items:
            break
        for subset in itertools.combinations(range(len(values)), k):
            if sum(costs[j] for j in subset) <= budget:
                best = max(best, sum(max(values[j], 0) for j in subset if values[j] > 0))
    return best


def total(chosen, seq):
    return sum(seq[j] for j in chosen)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 10), st.integers(0, 40)), min_size=0, max_size=9),
       st.integers(0, 120), st.one_of(st.none(), st.integers(0, 9)))
def test_knapsack_equals_brute_force_with_integer_costs(items, budget, max_items):
    values, costs = [v for v, _ in items], [c for _, c in items]
    chosen = knapsack(values, costs, budget, resolution=max(budget, 1), max_items=max_items)
    assert total(chosen, costs) <= budget
    assert max_items is None or len(chosen) <= max_items
    assert total(chosen, values) == pytest.approx(brute_force(values, costs, budget, max_items), abs=1e-9)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 10), st.floats(0, 5e6)), min_size=1, max_size=9),
       st.floats(1, 2e7), st.integers(1, 64))
def test_coarse_knapsack_fits_and_is_optimal_for_costs_rounded_up(items, budget, resolution):
    values, costs = [v for v, _ in items], [c for _, c in items]
    chosen = knapsack(values, costs, budget, resolution=resolution)
    assert total(chosen, costs) <= budget  # never over, however coarse
    rounded = [math.ceil(Fraction(c) * resolution / Fraction(budget)) for c in costs]  # units, exactly
    # At least the optimum for the costs rounded up, at most the true optimum.
    assert brute_force(values, rounded, resolution) - 1e-9 <= total(chosen, values)
    assert total(chosen, values) <= brute_force(values, costs, budget) + 1e-9


def test_a_budget_that_holds_everything_gets_everything_however_coarse():
    costs = [333_333_337, 250_000_001, 416_666_663]
    assert knapsack([1, 1, 1], costs, sum(costs)) == {0, 1, 2}  # rounding up would have dropped one
    assert chain_knapsack([1, 1, 1], costs, sum(costs), chain=[0, 1]) == {0, 1, 2}


def test_knapsack_on_block_memory_prefers_value_per_byte():
    # Lower blocks cost more (activations above them): two cheap high blocks beat one costly low one.
    values, costs = [1.0, 0.9, 0.8, 0.7], [800, 500, 300, 200]
    assert knapsack(values, costs, 600) == {2, 3}
    assert knapsack(values, costs, 1300) == {1, 2, 3}
    assert knapsack(values, costs, 1300, resolution=1300, max_items=2) == {0, 1}  # exactly the budget
    # 1000 units of 1.3: 800 and 500 round up to 616 + 385 units, one too many; the rounding never overfills.
    assert knapsack(values, costs, 1300, max_items=2) == {0, 2}
    assert knapsack(values, costs, 1300, max_items=1) == {0}
    assert knapsack(values, costs, 100) == frozenset()


def closure(subset, chain):
    """``subset`` with every chain item above its lowest chain item."""
    low = min((j for j in subset if j in chain), default=None)
    return set(subset) | ({j for j in chain if j >= low} if low is not None else set())


@settings(max_examples=120, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 10), st.integers(0, 40)), min_size=1, max_size=8), st.integers(0, 150),
       st.integers(0, 4), st.one_of(st.none(), st.integers(0, 8)))
def test_chain_knapsack_equals_brute_force_over_tail_closed_sets(items, budget, chain_length, max_items):
    values, costs = [v for v, _ in items], [c for _, c in items]
    chain = list(range(min(chain_length, len(items))))  # the lowest blocks: those below the cut
    chosen = chain_knapsack(values, costs, budget, chain, resolution=max(budget, 1), max_items=max_items)
    assert closure(chosen, chain) == set(chosen)  # a chain item comes with every chain item above it
    assert total(chosen, costs) <= budget and (max_items is None or len(chosen) <= max_items)
    best = 0.0
    for k in range(len(items) + 1):
        for subset in itertools.combinations(range(len(items)), k):
            fits = closure(subset, chain) == set(subset) and total(subset, costs) <= budget
            if fits and (max_items is None or k <= max_items):
                best = max(best, total(subset, values))
    assert total(chosen, values) == pytest.approx(best, abs=1e-9)


@settings(max_examples=120, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=7), st.integers(0, 150), st.integers(0, 4))
def test_worst_case_count_fits_every_draw(costs, budget, chain_length):
    chain = list(range(min(chain_length, len(costs))))
    k = worst_case_count(costs, budget, chain)
    for subset in itertools.combinations(range(len(costs)), k):  # every draw of k fits, its chain tail included
        assert total(closure(subset, chain), costs) <= budget
    if k < len(costs):  # and some draw of k + 1 would not
        assert any(total(closure(s, chain), costs) > budget for s in itertools.combinations(range(len(costs)), k + 1))


def test_a_block_below_the_cut_brings_the_blocks_above_it():
    # Blocks 0, 1 are below the cut: training 0 alone would still keep 1's activations.
    values, costs = [1.0, 0.1, 0.9, 0.8], [300, 300, 200, 200]
    # Byte-exact resolutions: nothing is rounded.
    assert knapsack(values, costs, 700, resolution=700) == {0, 2, 3}  # overruns: block 1 keeps its activations
    assert chain_knapsack(values, costs, 700, chain=[0, 1], resolution=700) == {1, 2, 3}
    assert chain_knapsack(values, costs, 800, chain=[0, 1], resolution=800) == {0, 1, 2}


def test_knapsack_refuses_bad_input():
    with pytest.raises(ValueError, match="2 values but 1 costs"):
        knapsack([1, 2], [1], 3)
    with pytest.raises(ValueError, match="costs must be >= 0"):
        knapsack([1], [-1], 3)
    with pytest.raises(ValueError, match="every value must be finite"):
        knapsack([float("nan")], [1], 3)


# ---------------------------------------------------------------- values


def test_fedpilot_scores_follow_local_global_and_agreement():
    blocks = [0, 1, 2, 3]
    local = {0: 2.0, 1: 2.0, 2: 1.0}
    agreement = {0: 1.0, 1: -1.0, 2: 1.0}
    glob = {0: 4.0, 1: 4.0, 2: 4.0, 3: 2.0}
    v = fedpilot_scores(blocks, local, agreement, glob)
    assert v[0] == pytest.approx(1.0)  # largest update, agreeing: full local and global terms
    assert v[1] == pytest.approx(0.5)  # the same update against the federation's direction keeps the global term
    assert v[2] == pytest.approx(0.5 * 0.5 + 0.5)
    assert v[3] == pytest.approx(0.5 + 0.5 * 0.5 + 1)  # never trained here: optimistic, and explored first
    assert fedpilot_scores([5], {}, {}, {})[5] == 2.0  # nothing known: above every measured value


def test_fisher_scores_are_relative_and_optimistic():
    v = fisher_scores([0, 1, 2], {0: 4.0, 1: 1.0})
    assert v == {0: 1.0, 1: 0.25, 2: 2.0}  # never measured: above every measured value
