"""RBLA (server/strategies/rbla.py): each rank slot averaged over the clients
that own it (docs/algorithms.md#rbla).

With equal ranks RBLA is FedIT (sum p_k A_k, sum p_k B_k); slot i averages
only over clients with r_k > i. Expected aggregates are recomputed here slot
by slot. The contract every strategy keeps is in test_strategy_contract.py.
"""

from __future__ import annotations

import pytest
import torch

from server.strategies.base import ClientInfo, Factors, StrategyError, Upload
from server.strategies.rbla import RBLA
from split.families import block_of

from strategy_helpers import (MIXED_ALPHA as ALPHA, MIXED_MODULES as MODULES, R_MAX, SAMPLES, clients, gen,
                              initial, random_upload, uploads)


def fedit(ups, m):
    total = sum(u.num_samples for u in ups)
    A = sum(u.num_samples / total * u.factors[m].A for u in ups)
    B = sum(u.num_samples / total * u.factors[m].B for u in ups)
    return A, B


# ------------------------------------------------------------------ slot means

def test_equal_ranks_at_r_max_is_fedit():
    g = gen(1)
    s = RBLA()
    cl = [ClientInfo(c, R_MAX, ALPHA) for c in SAMPLES]
    state = s.init_state(initial(g), cl)
    ups = [random_upload(g, c, R_MAX, n) for c, n in SAMPLES.items()]
    new = s.aggregate(state, ups, 0).state
    for m in MODULES:
        A, B = fedit(ups, m)
        torch.testing.assert_close(new["A"][m], A, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(new["B"][m], B, rtol=1e-12, atol=1e-12)


def test_equal_ranks_below_r_max_is_fedit_on_the_clients_slots():
    g = gen(2)
    s = RBLA()
    init = initial(g)
    cl = [ClientInfo(c, 4, ALPHA) for c in SAMPLES]
    state = s.init_state(init, cl)
    ups = [random_upload(g, c, 4, n) for c, n in SAMPLES.items()]
    new = s.aggregate(state, ups, 0).state
    for m in MODULES:
        A, B = fedit(ups, m)
        d = s.download(new, cl[0], 1)
        torch.testing.assert_close(d.A[m], A, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(d.B[m], B, rtol=1e-12, atol=1e-12)
        # Slots nobody owns keep their previous value.
        assert torch.equal(new["A"][m][4:], init[m].A[4:]) and torch.equal(new["B"][m][:, 4:], init[m].B[:, 4:])


def test_each_slot_averages_only_over_its_owners():
    g = gen(3)
    s = RBLA()
    state = s.init_state(initial(g), clients())
    ups = uploads(g)
    new = s.aggregate(state, ups, 0).state
    for m in MODULES:
        for i in range(R_MAX):
            owners = [u for u in ups if u.rank > i]
            n = sum(u.num_samples for u in owners)
            A_i = sum(u.num_samples / n * u.factors[m].A[i] for u in owners)
            B_i = sum(u.num_samples / n * u.factors[m].B[:, i] for u in owners)
            torch.testing.assert_close(new["A"][m][i], A_i, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(new["B"][m][:, i], B_i, rtol=1e-12, atol=1e-12)
        # Slots 4..7 belong to the rank-8 client alone: its values, undiluted by zero padding.
        c8 = next(u for u in ups if u.client == "c8")
        torch.testing.assert_close(new["A"][m][4:], c8.factors[m].A[4:], rtol=1e-12, atol=1e-12)
    # A non-owner cannot move a slot: change the rank-2 client's samples, slots >= 2 stay.
    moved = [Upload(u.client, u.factors, 1000 if u.client == "c2" else u.num_samples, u.rank) for u in ups]
    other = s.aggregate(state, moved, 0).state
    for m in MODULES:
        torch.testing.assert_close(other["A"][m][2:], new["A"][m][2:], rtol=1e-12, atol=1e-12)
        assert not torch.allclose(other["A"][m][:2], new["A"][m][:2])


def test_truncate_of_pad_is_identity_through_the_state():
    g = gen(4)
    s = RBLA()
    state = s.init_state(initial(g), clients())
    up = random_upload(g, "c4", 4, 3)
    new = s.aggregate(state, [up], 0).state
    d = s.download(new, ClientInfo("c4", 4, ALPHA), 1)
    for m in MODULES:
        assert torch.equal(d.A[m], up.factors[m].A) and torch.equal(d.B[m], up.factors[m].B)


def test_modules_average_over_the_uploads_that_carry_them():
    g = gen(5)
    s = RBLA()
    init = initial(g)
    state = s.init_state(init, [ClientInfo("a", 4, ALPHA, blocks=frozenset({0})), ClientInfo("b", 8, ALPHA)])
    block0 = [m for m in MODULES if block_of(m) == 0]
    ua = random_upload(g, "a", 4, 5, modules=block0)
    ua = Upload("a", ua.factors, 5, 4, blocks=frozenset({0}))
    ub = random_upload(g, "b", 8, 15, modules=MODULES[:2] + MODULES[-1:])
    new = s.aggregate(state, [ua, ub], 0).state
    m0 = block0[0]
    torch.testing.assert_close(new["A"][m0][:4], 0.25 * ua.factors[m0].A + 0.75 * ub.factors[m0].A[:4])
    torch.testing.assert_close(new["A"][m0][4:], ub.factors[m0].A[4:])
    untouched = [m for m in MODULES if m not in ua.factors and m not in ub.factors]
    assert untouched
    for m in untouched:
        assert torch.equal(new["A"][m], init[m].A) and torch.equal(new["B"][m], init[m].B)


# ------------------------------------------------------------------ downloads and state

def test_download_respects_rank_and_blocks():
    g = gen(6)
    s = RBLA()
    state = s.init_state(initial(g), clients())
    state = s.aggregate(state, uploads(g), 0).state
    c = ClientInfo("c4", 4, ALPHA, blocks=frozenset({0, 2}))
    d = s.download(state, c, 1)
    want = [m for m in MODULES if block_of(m) in (0, 2, None)]
    assert sorted(d.A) == sorted(want) == sorted(d.B)
    assert d.rank == 4 and d.alpha == ALPHA
    for m in want:
        assert torch.equal(d.A[m], state["A"][m][:4]) and torch.equal(d.B[m], state["B"][m][:, :4])
    with pytest.raises(StrategyError, match="client 'big' trains rank 9, outside 1..8"):
        s.download(state, ClientInfo("big", 9, ALPHA), 1)


def test_refusals_name_the_problem():
    g = gen(10)
    s = RBLA()
    state = s.init_state(initial(g), clients())
    up = random_upload(g, "c8", 8, 1)
    with pytest.raises(StrategyError, match=f"client 'c8': {MODULES[0]} has rank 8 but the upload says rank 4"):
        s.aggregate(state, [Upload("c8", up.factors, 1, 4)], 0)  # RBLA does not prune
    with pytest.raises(StrategyError, match="client 'c9' has rank 9, outside 1..8"):
        s.aggregate(state, [random_upload(g, "c9", 9, 1)], 0)
    with pytest.raises(StrategyError, match=f"was trained with alpha 3.0 but this run uses alpha {ALPHA}"):
        s.aggregate(state, [Upload("c8", {m: Factors(f.A, f.B, 3.0) for m, f in up.factors.items()}, 1, 8)], 0)
