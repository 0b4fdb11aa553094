"""HetLoRA's server half (server/strategies/hetlora.py): truncation, recorded
pruned ranks, sparsity weights (docs/algorithms.md#hetlora).

truncate(pad(X)) == X, the weights sum to 1, a recorded rank only ever
decreases. Expected aggregates are recomputed here from dense products and
explicit padding. The client half (penalty, self-pruning) is tested in
test_hetlora_client.py, the contract every strategy keeps in
test_strategy_contract.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from server.strategies import get_strategy
from server.strategies.base import ClientInfo, Factors, StrategyError, Upload
from server.strategies.hetlora import HetLoRA, sparsity_weights
from split.families import block_of

from strategy_helpers import (MIXED_ALPHA as ALPHA, MIXED_D_IN as D_IN, MIXED_D_OUT as D_OUT,
                              MIXED_MODULES as MODULES, R_MAX, SAMPLES, assert_same, clients, gen, initial,
                              random_upload, uploads)


# ------------------------------------------------------------------ padding and weights

@pytest.mark.parametrize("rank", [1, 2, 4, 8])
def test_truncate_of_pad_is_identity_through_the_state(rank):
    """One client at rank r: aggregate (weight 1) pads to r_max, download
    truncates back, and gives X back."""
    g = gen(rank)
    s = HetLoRA()
    init = initial(g)
    state = s.init_state(init, [ClientInfo("c", rank, ALPHA)])
    up = random_upload(g, "c", rank, 7)
    new = s.aggregate(state, [up], 0).state
    d = s.download(new, ClientInfo("c", rank, ALPHA), 1)
    assert d.rank == rank
    for m in MODULES:
        assert new["A"][m].shape == (R_MAX, D_IN) and new["B"][m].shape == (D_OUT, R_MAX)
        assert torch.equal(d.A[m], up.factors[m].A) and torch.equal(d.B[m], up.factors[m].B)
        # Unowned slots: B zero as padding gives, A kept from before so the slot can train.
        assert torch.count_nonzero(new["B"][m][:, rank:]) == 0
        assert torch.equal(new["A"][m][rank:], init[m].A[rank:])


def test_sparsity_weights_sum_to_one_and_follow_product_norms():
    g = gen(2)
    pairs = [(torch.randn(r, D_IN, generator=g, dtype=torch.float64),
              torch.randn(D_OUT, r, generator=g, dtype=torch.float64) * (i + 1)) for i, r in enumerate([2, 4, 8])]
    w = sparsity_weights(pairs)
    dense = [float(torch.linalg.matrix_norm(B @ A)) for A, B in pairs]
    assert math.isclose(sum(w), 1.0, rel_tol=1e-12)
    for wk, n in zip(w, dense):
        assert math.isclose(wk, n / sum(dense), rel_tol=1e-9)
    assert sparsity_weights([(A, torch.zeros_like(B)) for A, B in pairs]) is None


# ------------------------------------------------------------------ aggregation

def test_aggregate_matches_hand_computation():
    g = gen(3)
    s = HetLoRA()
    init = initial(g)
    state = s.init_state(init, clients())
    ups = uploads(g)
    new = s.aggregate(state, ups, 0).state
    for m in MODULES:
        norms = [float(torch.linalg.matrix_norm(u.factors[m].B @ u.factors[m].A)) for u in ups]
        w = [n / sum(norms) for n in norms]
        A_exp = torch.zeros(R_MAX, D_IN, dtype=torch.float64)
        B_exp = torch.zeros(D_OUT, R_MAX, dtype=torch.float64)
        for wk, u in zip(w, ups):
            r = u.rank
            for i in range(r):
                A_exp[i] += wk * u.factors[m].A[i]
                B_exp[:, i] += wk * u.factors[m].B[:, i]
        torch.testing.assert_close(new["A"][m], A_exp, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(new["B"][m], B_exp, rtol=1e-12, atol=1e-12)
    # Sample counts do not enter the sparsity weights.
    heavier = [Upload(u.client, u.factors, u.num_samples * (i + 3), u.rank) for i, u in enumerate(ups)]
    again = s.aggregate(state, heavier, 0).state
    assert_same(again["A"], new["A"])


def test_zero_products_fall_back_to_sample_weights():
    g = gen(4)
    s = HetLoRA()
    state = s.init_state(initial(g), clients())
    ups = [Upload(u.client, {m: Factors(f.A, torch.zeros_like(f.B), ALPHA) for m, f in u.factors.items()},
                  u.num_samples, u.rank) for u in uploads(g)]
    new = s.aggregate(state, ups, 0).state
    m = MODULES[0]
    total = sum(SAMPLES.values())
    expected_row0 = sum(SAMPLES[u.client] / total * u.factors[m].A[0] for u in ups)
    torch.testing.assert_close(new["A"][m][0], expected_row0)


def test_pruned_upload_is_recorded_and_ranks_never_grow():
    g = gen(5)
    s = HetLoRA()
    state = s.init_state(initial(g), clients())
    c4 = ClientInfo("c4", 4, ALPHA)
    assert s.download(state, c4, 0).rank == 4
    # c4 pruned to 3 but sends its factors at the download rank: the tail is dropped.
    up = random_upload(g, "c4", 4, 30)
    up = Upload("c4", up.factors, 30, 3)
    new = s.aggregate(state, [up], 0).state
    assert new["ranks"]["c4"] == 3 and state["ranks"]["c4"] == 4
    d = s.download(new, c4, 1)  # ClientInfo still says 4: the state's smaller rank wins
    assert d.rank == 3 and all(a.shape == (3, D_IN) for a in d.A.values())
    for m in MODULES:
        assert torch.count_nonzero(new["B"][m][:, 3:]) == 0
        torch.testing.assert_close(new["B"][m][:, :3], up.factors[m].B[:, :3])
    with pytest.raises(StrategyError, match="only ever decrease"):
        s.aggregate(new, [random_upload(g, "c4", 4, 30)], 1)
    # Other clients keep their ranks.
    assert s.download(new, ClientInfo("c8", 8, ALPHA), 1).rank == 8


# ------------------------------------------------------------------ downloads

def test_download_respects_rank_blocks_and_options():
    g = gen(6)
    s = get_strategy("hetlora", lam=0.05, gamma=0.75)
    state = s.init_state(initial(g), clients())
    state = s.aggregate(state, uploads(g), 0).state
    c = ClientInfo("c2", 2, ALPHA, blocks=frozenset({1}))
    d = s.download(state, c, 1)
    want = [m for m in MODULES if block_of(m) in (1, None)]
    assert sorted(d.A) == sorted(want) == sorted(d.B)
    assert d.rank == 2 and d.alpha == ALPHA
    assert d.options == {"hetlora_lambda": 0.05, "hetlora_gamma": 0.75}
    for m in want:
        assert torch.equal(d.A[m], state["A"][m][:2]) and torch.equal(d.B[m], state["B"][m][:, :2])
    full = s.download(state, ClientInfo("c8", 8, ALPHA), 1)
    assert sorted(full.A) == sorted(MODULES) and full.A[MODULES[0]].shape == (8, D_IN)
    assert HetLoRA().download(state, c, 1).options == {"hetlora_lambda": 1e-3, "hetlora_gamma": 0.99}


def test_refusals_name_the_problem():
    g = gen(10)
    s = HetLoRA()
    with pytest.raises(StrategyError, match="client 'big' trains rank 9, outside 1..8"):
        s.init_state(initial(g), [ClientInfo("big", 9, ALPHA)])
    state = s.init_state(initial(g), clients())
    up = random_upload(g, "c2", 2, 1)
    with pytest.raises(StrategyError, match=f"was trained with alpha 3.0 but this run uses alpha {ALPHA}"):
        s.aggregate(state, [Upload("c2", {m: Factors(f.A, f.B, 3.0) for m, f in up.factors.items()}, 1, 2)], 0)
    with pytest.raises(StrategyError, match="client 'c9' has rank 9, outside 1..8"):
        s.aggregate(state, [random_upload(g, "c9", 9, 1)], 0)


@pytest.mark.parametrize("options, message", [
    (dict(gamma=1.5), r"gamma must lie in \(0, 1\), got 1.5"),
    (dict(hetlora_gamma=0.0), r"gamma must lie in \(0, 1\), got 0.0"),
    (dict(lam=-1.0), "lambda must be non-negative, got -1.0"),
])
def test_refuses_bad_options(options, message):
    with pytest.raises(StrategyError, match=message):
        HetLoRA(**options)


def test_options_have_one_spelling_at_a_time():
    assert HetLoRA(hetlora_lambda=0.1, hetlora_gamma=0.5).lam == 0.1
    assert (HetLoRA().lam, HetLoRA().gamma) == (1e-3, 0.99)
    with pytest.raises(StrategyError, match="not both"):
        HetLoRA(lam=0.1, hetlora_lambda=0.2)
    with pytest.raises(StrategyError, match="has no option foo"):
        get_strategy("hetlora", foo=1)
