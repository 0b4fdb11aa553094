"""FLoRA: stacked factors sum the products exactly; the sum is merged into the
base and clients restart from a fresh LoRA (docs/algorithms.md#flora, with the
identities listed there). The contract every strategy keeps (including the
seed of the fresh A) is in test_strategy_contract.py."""

from __future__ import annotations

import math

import pytest
import torch

from server.strategies import get_strategy
from server.strategies.base import ClientInfo, Factors, StrategyError, Upload
from server.strategies.flora import FLoRA, stack_factors

D_OUT, D_IN = 12, 7  # not square, so an orientation mistake cannot go unnoticed
MODULES = ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn", "score"]
F64 = torch.float64


def rand_factors(g, rank, alpha):
    return Factors(torch.randn(rank, D_IN, generator=g, dtype=F64), torch.randn(D_OUT, rank, generator=g, dtype=F64),
                   alpha)


def zero_initial(rank=8, alpha=16.0):
    g = torch.Generator().manual_seed(99)
    return {m: Factors(torch.randn(rank, D_IN, generator=g, dtype=F64), torch.zeros(D_OUT, rank, dtype=F64), alpha)
            for m in MODULES}


def make_round(g, ranks, alphas, samples, modules=MODULES):
    return [Upload(f"c{k}", {m: rand_factors(g, r, a) for m in modules}, n, r)
            for k, (r, a, n) in enumerate(zip(ranks, alphas, samples))]


def product_sum(uploads, module):
    """Σ p_k (alpha_k / r_k) B_k A_k by a plain loop."""
    total = sum(u.num_samples for u in uploads)
    out = torch.zeros(D_OUT, D_IN, dtype=F64)
    for u in uploads:
        f = u.factors[module]
        out += u.num_samples / total * f.alpha / f.A.shape[0] * (f.B @ f.A)
    return out


def test_stacking_is_exact_with_mixed_ranks_and_alphas():
    g = torch.Generator().manual_seed(0)
    ranks, alphas, ws = [1, 4, 2, 8], [2.0, 8.0, 4.0, 16.0], [0.1, 0.2, 0.3, 0.4]
    factors = [rand_factors(g, r, a) for r, a in zip(ranks, alphas)]
    A, B = stack_factors(ws, factors)
    assert A.shape == (sum(ranks), D_IN) and B.shape == (D_OUT, sum(ranks))
    expected = sum(w * (a / r) * (f.B @ f.A) for w, r, a, f in zip(ws, ranks, alphas, factors))
    assert torch.allclose(B @ A, expected, atol=1e-12)
    # the weights sit on A, the scales on B (FLoRA's layout)
    assert torch.allclose(A[1:5], 0.2 * factors[1].A) and torch.allclose(B[:, 1:5], 2.0 * factors[1].B)


def test_hand_computed_base_delta():
    # p = (1/4, 3/4); s_a = 2/1, s_b = 2/1; ΔW = 1/4*2*[1;2][3 4] + 3/4*2*[0;1][1 1]
    #                                       = [[1.5, 2], [3, 4]] + [[0, 0], [1.5, 1.5]]
    ups = [Upload("a", {"m": Factors(torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0], [2.0]]), 2.0)}, 1, 1),
           Upload("b", {"m": Factors(torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0], [1.0]]), 2.0)}, 3, 1)]
    s = FLoRA()
    init = {"m": Factors(torch.zeros(2, 2), torch.zeros(2, 2), 2.0)}
    result = s.aggregate(s.init_state(init, [ClientInfo("a", 1, 2.0), ClientInfo("b", 1, 2.0)]), ups, 0)
    assert torch.allclose(result.base_deltas["m"], torch.tensor([[1.5, 2.0], [4.5, 5.5]]))
    assert result.state["stacked_rank"] == 2 and result.state["download_floats"] == 2 * (2 + 2)


def test_base_delta_equals_weighted_product_sum_in_standard_orientation():
    g = torch.Generator().manual_seed(1)
    ranks, alphas, samples = [2, 4, 8], [4.0, 8.0, 16.0], [100, 10, 1]
    ups = make_round(g, ranks, alphas, samples)
    s = get_strategy("flora")
    clients = [ClientInfo(f"c{k}", r, a) for k, (r, a) in enumerate(zip(ranks, alphas))]
    result = s.aggregate(s.init_state(zero_initial(), clients), ups, 0)
    assert set(result.base_deltas) == set(MODULES)
    for m in MODULES:
        assert result.base_deltas[m].shape == (D_OUT, D_IN)
        assert torch.allclose(result.base_deltas[m], product_sum(ups, m), atol=1e-12)
    st = result.state
    assert st["stacked_rank"] == 14
    assert st["stacked_ranks"] == {m: 14 for m in MODULES}
    assert st["download_floats"] == len(MODULES) * 14 * (D_OUT + D_IN)


def test_merging_rounds_accumulates_in_the_base():
    g = torch.Generator().manual_seed(2)
    s = FLoRA()
    state = s.init_state(zero_initial(), [ClientInfo("c0", 2, 4.0), ClientInfo("c1", 3, 6.0)])
    W0 = torch.randn(D_OUT, D_IN, generator=g, dtype=F64)
    W, expected = W0.clone(), W0.clone()
    for t in range(3):
        ups = make_round(g, [2, 3], [4.0, 6.0], [5, 7])
        result = s.aggregate(state, ups, t)
        state = result.state
        W = W + result.base_deltas[MODULES[0]]
        expected = expected + product_sum(ups, MODULES[0])
    assert torch.allclose(W, expected, atol=1e-12)


def test_download_is_fresh_at_the_clients_rank():
    s = FLoRA(seed=5)
    state = s.init_state(zero_initial(), [ClientInfo("a", 2, 16.0), ClientInfo("b", 8, 16.0)])
    for r in (2, 8):
        d = s.download(state, ClientInfo("a", r, 16.0), 3)
        assert d.fresh and d.trainable == "both" and d.rank == r and d.alpha == 16.0
        assert set(d.A) == set(d.B) == set(MODULES)
        for m in MODULES:
            assert d.A[m].shape == (r, D_IN) and d.B[m].shape == (D_OUT, r)
            assert torch.count_nonzero(d.B[m]) == 0
            bound = 1 / math.sqrt(D_IN)  # PEFT's Kaiming-uniform(a=√5) bound
            assert d.A[m].abs().max() <= bound and d.A[m].abs().max() > bound / 2
    again = s.download(state, ClientInfo("a", 2, 16.0), 3)
    other_round = s.download(state, ClientInfo("a", 2, 16.0), 4)
    other_client = s.download(state, ClientInfo("b", 2, 16.0), 3)
    first = s.download(state, ClientInfo("a", 2, 16.0), 3)
    assert torch.equal(again.A[MODULES[0]], first.A[MODULES[0]])
    assert not torch.equal(other_round.A[MODULES[0]], first.A[MODULES[0]])
    assert not torch.equal(other_client.A[MODULES[0]], first.A[MODULES[0]])


def test_init_refuses_a_nonzero_initial_lora():
    g = torch.Generator().manual_seed(4)
    nonzero = {m: rand_factors(g, 2, 4.0) for m in MODULES}
    with pytest.raises(StrategyError, match="is not zero, but FLoRA starts every round from a fresh LoRA"):
        FLoRA().init_state(nonzero, [ClientInfo("a", 2, 4.0)])
