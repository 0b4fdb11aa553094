"""Which blocks each client trains in a round: the math of layer allocation.

Pure functions, no I/O and no model: the coordinator (server/allocation.py)
feeds them capacities, memory costs and scores and applies the result.

- ``fedra_matrix``: FedRA's random allocation matrix (arXiv 2311.11227).
- ``knapsack``: the exact 0/1 knapsack Fed-piLot solves per client
  (arXiv 2410.10200), over memory discretised upwards; ``chain_knapsack``
  with the blocks below the cut chosen as a tail (backward reaches them
  through every block above), ``worst_case_count`` for random draws.
- ``fedpilot_scores`` / ``fisher_scores``: the knapsack's values.

docs/algorithms.md#fedpilot states the formulas and why.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from fractions import Fraction

import numpy as np

from split.seeds import stable_seed

DEFAULT_RESOLUTION = 1000  # memory units a budget is cut into for the knapsack
PILOT_GLOBAL_WEIGHT = 0.5  # share of the global term in the Fed-piLot score
# Added to the value of a block the client never trained: measured values lie
# in [0, 1], so each client tries every block it can afford before the
# measurements decide.
EXPLORE_BONUS = 1.0


# ---------------------------------------------------------------- FedRA


def fedra_matrix(capacities: Sequence[int], num_blocks: int, seed: int, round: int,
                 cover_all: bool = False) -> np.ndarray:
    """FedRA's allocation matrix for one round: row i holds exactly
    ``capacities[i]`` ones, the blocks client i trains, drawn uniformly
    without replacement; a function of (seed, round) alone.

    With ``cover_all`` the rows together cover every block whenever the
    capacities add up to ``num_blocks`` or more (and as many blocks as they
    can otherwise). The draw stays uniform per row: the blocks are shuffled,
    ``min(num_blocks, sum L_i)`` of the clients' slots (client i has L_i) are
    drawn uniformly without replacement and each drawn slot receives the next
    shuffled block, so every block lands in a distinct slot; each client then
    fills its remaining slots uniformly from the blocks it does not hold yet.
    The whole procedure commutes with relabelling the blocks, so each row on
    its own is still a uniform L_i-subset; only the rows' joint law changes
    (they avoid leaving a block out)."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    bad = [c for c in capacities if not (isinstance(c, int) and 0 <= c <= num_blocks)]
    if bad:
        raise ValueError(f"every capacity must be an integer in [0, {num_blocks}], got {bad[:3]}")
    rng = random.Random(stable_seed(seed, "fedra", round))
    matrix = np.zeros((len(capacities), num_blocks), dtype=np.int8)
    if not cover_all:
        for i, capacity in enumerate(capacities):
            matrix[i, rng.sample(range(num_blocks), capacity)] = 1
        return matrix
    blocks = list(range(num_blocks))
    rng.shuffle(blocks)
    slots = [i for i, capacity in enumerate(capacities) for _ in range(capacity)]
    for slot, block in zip(rng.sample(slots, min(num_blocks, len(slots))), blocks):
        matrix[slot, block] = 1
    for i, capacity in enumerate(capacities):
        free = [b for b in range(num_blocks) if not matrix[i, b]]
        matrix[i, rng.sample(free, capacity - int(matrix[i].sum()))] = 1
    return matrix


# ---------------------------------------------------------------- knapsack


def _units(cost, budget, resolution: int) -> int:
    """``cost`` in units of ``budget / resolution``, rounded up, computed
    exactly (``Fraction`` holds floats and ints without rounding)."""
    if budget == 0:
        return 0 if cost == 0 else resolution + 1
    return math.ceil(Fraction(cost) * resolution / Fraction(budget))


def knapsack(values: Sequence[float], costs: Sequence[float], budget: float,
             resolution: int = DEFAULT_RESOLUTION, max_items: int | None = None) -> frozenset[int]:
    """The indices of the items of largest total value whose costs fit in
    ``budget`` (and, with ``max_items``, at most that many items): an exact
    0/1 knapsack by dynamic programming over the budget cut into
    ``resolution`` units.

    Each cost is rounded UP to whole units, so a chosen set truly fits: its
    true cost is at most its units times ``budget / resolution``, at most the
    budget. The answer is optimal for the rounded costs; a set that fits only
    by less than one unit per item may be missed (with integer costs and
    ``resolution >= budget`` nothing is rounded and the answer is exact).
    Items with a value <= 0 are never chosen; ties go to the earlier items."""
    n = len(values)
    if len(costs) != n:
        raise ValueError(f"{n} values but {len(costs)} costs")
    for what, seq in (("value", values), ("cost", costs)):
        if not all(math.isfinite(x) for x in seq):
            raise ValueError(f"every {what} must be finite")
    if any(c < 0 for c in costs):
        raise ValueError("costs must be >= 0")
    if not (math.isfinite(budget) and budget >= 0):
        raise ValueError(f"the budget must be a finite number >= 0, got {budget}")
    if not (isinstance(resolution, int) and resolution >= 1):
        raise ValueError(f"resolution must be an integer >= 1, got {resolution}")
    limit = n if max_items is None else min(max_items, n)
    if limit < 0:
        raise ValueError(f"max_items must be >= 0, got {max_items}")
    worth = [j for j in range(n) if values[j] > 0]
    if len(worth) <= limit and sum(costs[j] for j in worth) <= budget:
        return frozenset(worth)  # everything of value fits: no rounding can do better
    units = [_units(c, budget, resolution) for c in costs]
    # best[k, w]: the largest value of at most k items within w units.
    best = np.zeros((limit + 1, resolution + 1))
    taken = np.zeros((n, limit + 1, resolution + 1), dtype=bool)
    for j in range(n):
        w, v = units[j], float(values[j])
        if v <= 0 or w > resolution or limit == 0:
            continue
        with_j = np.full_like(best, -np.inf)
        with_j[1:, w:] = best[:-1, :resolution + 1 - w] + v
        taken[j] = with_j > best
        best = np.where(taken[j], with_j, best)
    chosen, k, w = set(), limit, resolution
    for j in reversed(range(n)):
        if taken[j, k, w]:
            chosen.add(j)
            k, w = k - 1, w - units[j]
    return frozenset(chosen)


def chain_knapsack(values: Sequence[float], costs: Sequence[float], budget: float, chain: Sequence[int],
                   resolution: int = DEFAULT_RESOLUTION, max_items: int | None = None) -> frozenset[int]:
    """``knapsack`` where the items of ``chain`` (indices, lowest first: a
    client's blocks below the cut) are chosen as a tail: choosing one chooses
    every later one. Training a block below the cut makes backward run
    through every block between it and the cut, and those keep their
    activations whether they train or not; so they train too (it adds only
    their LoRA state), and in that case the blocks' costs add up exactly.
    Solved exactly: one knapsack over the other items for each possible
    lowest chain item (or none), keeping the best."""
    chain = list(chain)
    if sorted(set(chain)) != chain or any(not 0 <= j < len(values) for j in chain):
        raise ValueError(f"the chain must list distinct item indices in increasing order, got {chain}")
    others = [j for j in range(len(values)) if j not in set(chain)]
    limit = len(values) if max_items is None else max_items
    if not (isinstance(resolution, int) and resolution >= 1):
        raise ValueError(f"resolution must be an integer >= 1, got {resolution}")
    # Every sub-problem cuts what the forced items leave into units no finer than the budget's.
    unit = Fraction(budget) / resolution
    best, best_value = frozenset(), -math.inf
    for start in range(len(chain) + 1):  # chain[start:] is forced; start == len(chain): no chain item
        forced = chain[start:]
        room = budget - sum(costs[j] for j in forced)
        if room < 0 or len(forced) > limit:
            continue
        units = max(1, math.floor(Fraction(room) / unit)) if unit > 0 else 1
        rest = knapsack([values[j] for j in others], [costs[j] for j in others], room, units, limit - len(forced))
        chosen = frozenset(forced) | {others[i] for i in rest}
        value = sum(values[j] for j in chosen)
        if value > best_value:
            best, best_value = chosen, value
    return best


def worst_case_count(costs: Sequence[float], budget: float, chain: Sequence[int] = ()) -> int:
    """The most items that fit in ``budget`` whichever are drawn (FedRA draws
    blocks at random), counting for a drawn chain item (a block below the
    cut) every chain item above it, as ``chain_knapsack`` explains."""
    chain_set = set(chain)
    free = sorted((costs[j] for j in range(len(costs)) if j not in chain_set), reverse=True)
    tails = [sum(costs[j] for j in chain if j >= low) for low in chain]  # the cost a lowest chain item brings
    above = [sum(1 for j in chain if j > low) for low in chain]

    def worst(k: int) -> float:
        cases = [sum(free[:k])] if k <= len(free) else []
        for tail, room in zip(tails, above):
            m = min(k - 1, len(free))
            if k >= 1 and k - 1 - m <= room:
                cases.append(tail + sum(free[:m]))
        return max(cases)

    return max((k for k in range(len(costs) + 1) if worst(k) <= budget), default=0)


# ---------------------------------------------------------------- values


def _relative(known: Mapping[int, float]) -> dict[int, float]:
    """Each value over the largest (all zero: all zero)."""
    top = max(known.values(), default=0.0)
    return {b: (v / top if top > 0 else 0.0) for b, v in known.items()}


def fedpilot_scores(blocks: Sequence[int], local: Mapping[int, float], agreement: Mapping[int, float],
                    global_: Mapping[int, float], global_weight: float = PILOT_GLOBAL_WEIGHT) -> dict[int, float]:
    """One client's Fed-piLot value of each block, from the latest updates
    (the stand-in for the paper's IG-Score; docs/algorithms.md#fedpilot):

        v_l = (1 - w) * u_l * (1 + c_l) / 2 + w * g_l

    ``local[l]``: the norm of this client's last update of block l, over the
    largest of its blocks (u_l); ``agreement[l]``: the cosine between that
    update and the global update of block l in the same round (c_l);
    ``global_[l]``: the norm of block l's latest global update over the
    largest block's (g_l); ``w``: ``global_weight``. The local term is what
    this client's data moves in the block, discounted as its direction
    departs from the federation's; the global term is how much the block
    moves for everyone. An unknown quantity takes its largest value (u = 1,
    c = 1, g = 1), and a block this client never trained gets
    ``EXPLORE_BONUS`` on top: it is explored before measured blocks."""
    if not 0 <= global_weight <= 1:
        raise ValueError(f"global_weight must be in [0, 1], got {global_weight}")
    u, g = _relative(local), _relative(global_)
    out = {}
    for b in blocks:
        if b in u:
            c = min(1.0, max(-1.0, agreement.get(b, 1.0)))
            mine = u[b] * (1 + c) / 2
        else:
            mine = 1.0
        out[b] = (1 - global_weight) * mine + global_weight * g.get(b, 1.0) + (0.0 if b in u else EXPLORE_BONUS)
    return out


def fisher_scores(blocks: Sequence[int], fisher: Mapping[int, float]) -> dict[int, float]:
    """One client's Fisher value of each block: its latest per-step sum of
    squared gradients of the block's LoRA parameters, over the largest
    block's; a block never measured takes the largest value, 1, plus
    ``EXPLORE_BONUS``: it is measured before measured blocks are preferred."""
    rel = _relative(fisher)
    return {b: rel.get(b, 1.0 + EXPLORE_BONUS) for b in blocks}
