"""HetLoRA (server/strategies/hetlora.py): truncation, self-pruning, sparsity weights.

Identity 5 of fedlora-algorithms.md section 14: truncate(pad(X)) == X, the
weights sum to 1, pruning only ever decreases a client's rank. Expected
aggregates are recomputed here from dense products and explicit padding.
"""

from __future__ import annotations

import math

import pytest
import torch

from server.strategies import get_strategy
from server.strategies.base import ClientInfo, Factors, StrategyError, Upload
from split.families import block_of
from server.strategies.hetlora import (HetLoRA, pad_factors, pruned_rank, rank_penalty, sparsity_weights,
                                       tail_start, truncate_factors)

from strategy_helpers import (MIXED_ALPHA as ALPHA, MIXED_D_IN as D_IN, MIXED_D_OUT as D_OUT,
                              MIXED_MODULES as MODULES, R_MAX, RANKS, SAMPLES, assert_mixed_rounds_checkpointable,
                              assert_same, clients, gen, initial, mixed_round_with_snapshots, random_upload,
                              uploads)


# ------------------------------------------------------------------ identity 5

@pytest.mark.parametrize("rank", [1, 2, 4, 8])
def test_truncate_of_pad_is_identity(rank):
    g = gen(rank)
    A, B = torch.randn(rank, D_IN, generator=g), torch.randn(D_OUT, rank, generator=g)
    A_pad, B_pad = pad_factors(A, B, R_MAX)
    assert A_pad.shape == (R_MAX, D_IN) and B_pad.shape == (D_OUT, R_MAX)
    assert torch.count_nonzero(A_pad[rank:]) == 0 and torch.count_nonzero(B_pad[:, rank:]) == 0
    A_back, B_back = truncate_factors(A_pad, B_pad, rank)
    assert torch.equal(A_back, A) and torch.equal(B_back, B)


def test_single_upload_round_trips_through_the_state():
    """One client at rank 4: aggregate (weight 1) then download gives X back."""
    g = gen(1)
    s = HetLoRA()
    init = initial(g)
    state = s.init_state(init, [ClientInfo("c4", 4, ALPHA)])
    up = random_upload(g, "c4", 4, 7)
    new = s.aggregate(state, [up], 0).state
    d = s.download(new, ClientInfo("c4", 4, ALPHA), 1)
    assert d.rank == 4
    for m in MODULES:
        assert torch.equal(d.A[m], up.factors[m].A) and torch.equal(d.B[m], up.factors[m].B)
        # Unowned slots: B zero as padding gives, A kept from before so the slot can train.
        assert torch.count_nonzero(new["B"][m][:, 4:]) == 0
        assert torch.equal(new["A"][m][4:], init[m].A[4:])


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


def test_pruned_rank_only_decreases():
    for gamma in (0.5, 0.9, 0.99):
        for r in range(1, 65):
            assert pruned_rank(r, gamma, 1.0, 2.0) == r  # tail grew: keep
            assert pruned_rank(r, gamma, 1.0, 1.0) == r  # no shrink: keep
            p = pruned_rank(r, gamma, 2.0, 1.0)
            assert p >= 1 and p <= r and (p < r or r == 1)
            assert p == max(1, math.floor(gamma * r + 1e-9))
    r, seq = 64, []
    for _ in range(200):
        r = pruned_rank(r, 0.9, 1.0, 0.5)
        seq.append(r)
    assert all(b <= a for a, b in zip(seq, seq[1:])) and seq[-1] == 1
    assert tail_start(100, 0.29) == 29  # not 28 from 0.29 * 100 = 28.999...


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

def test_download_respects_rank_layers_and_options():
    g = gen(6)
    s = get_strategy("hetlora", lam=0.05, gamma=0.75)
    assert isinstance(s, HetLoRA) and s.heterogeneous_ranks
    state = s.init_state(initial(g), clients())
    state = s.aggregate(state, uploads(g), 0).state
    c = ClientInfo("c2", 2, ALPHA, layers=frozenset({1}))
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


def test_extra_is_averaged_and_downloaded():
    g = gen(7)
    s = HetLoRA()
    state = s.init_state(initial(g), clients())
    heads = {c: torch.randn(3, 4, generator=g, dtype=torch.float64) for c in RANKS}
    ups = uploads(g, lambda c: {"head.weight": heads[c]})
    new = s.aggregate(state, ups, 0).state
    total = sum(SAMPLES.values())
    expected = sum(SAMPLES[c] / total * heads[c] for c in RANKS)
    torch.testing.assert_close(new["extra"]["head.weight"], expected)
    d = s.download(new, ClientInfo("c2", 2, ALPHA), 1)
    torch.testing.assert_close(d.extra["head.weight"], expected)


def test_state_is_checkpointable():
    assert_mixed_rounds_checkpointable(HetLoRA(), gen(8), lambda c: {"head.bias": torch.ones(3)})


def test_inputs_are_not_mutated():
    s = HetLoRA()
    new, assert_unchanged = mixed_round_with_snapshots(s, gen(9))
    d = s.download(new, ClientInfo("c8", 8, ALPHA), 1)
    d.A[MODULES[0]].add_(1.0)  # a caller editing its download must not reach the state
    s.download(new, ClientInfo("c8", 8, ALPHA), 1)
    assert_unchanged()
    assert not torch.equal(new["A"][MODULES[0]], d.A[MODULES[0]])


def test_refusals_name_the_problem():
    g = gen(10)
    s = HetLoRA()
    with pytest.raises(StrategyError, match="rank 9"):
        s.init_state(initial(g), [ClientInfo("big", 9, ALPHA)])
    state = s.init_state(initial(g), clients())
    bad_module = Upload("c2", {"model.layers.9.mlp": Factors(torch.zeros(2, D_IN), torch.zeros(D_OUT, 2), ALPHA)}, 1, 2)
    with pytest.raises(StrategyError, match="unknown module"):
        s.aggregate(state, [bad_module], 0)
    up = random_upload(g, "c2", 2, 1)
    with pytest.raises(StrategyError, match="alpha"):
        s.aggregate(state, [Upload("c2", {m: Factors(f.A, f.B, 3.0) for m, f in up.factors.items()}, 1, 2)], 0)
    with pytest.raises(StrategyError, match="says rank"):
        s.aggregate(state, [Upload("c2", up.factors, 1, 3)], 0)
    with pytest.raises(StrategyError, match="no uploads"):
        s.aggregate(state, [], 0)
    with pytest.raises(StrategyError):
        HetLoRA(gamma=1.5)


# ------------------------------------------------------------------ client penalty

def test_rank_penalty_value_and_gradient_reach_the_tail_only():
    g = gen(11)
    A = torch.randn(8, D_IN, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(D_OUT, 8, generator=g, dtype=torch.float64, requires_grad=True)
    pen = rank_penalty(A, B, 8, 0.5)  # tail = slots 4..7
    expected = torch.linalg.matrix_norm(B.detach()[:, 4:]) * torch.linalg.matrix_norm(A.detach()[4:])
    torch.testing.assert_close(pen.detach(), expected)
    pen.backward()
    assert torch.count_nonzero(A.grad[:4]) == 0 and torch.count_nonzero(B.grad[:, :4]) == 0
    assert torch.all(A.grad[4:].abs().sum(dim=1) > 0) and torch.all(B.grad[:, 4:].abs().sum(dim=0) > 0)
    # Default gamma 0.99 at rank 8: tail is the last slot only.
    A.grad = B.grad = None
    rank_penalty(A, B, 8, 0.99).backward()
    assert torch.count_nonzero(A.grad[:7]) == 0 and torch.count_nonzero(A.grad[7]) > 0
    # At B = 0 (round start) the gradient is finite, not NaN.
    A0 = A.detach().clone().requires_grad_(True)
    B0 = torch.zeros(D_OUT, 8, dtype=torch.float64, requires_grad=True)
    rank_penalty(A0, B0, 8, 0.5).backward()
    assert torch.isfinite(A0.grad).all() and torch.isfinite(B0.grad).all()
