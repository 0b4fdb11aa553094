"""FlexLoRA: ΔW_g = Σ p_k s_k B_k A_k, downloaded as its best rank-r approximation
(docs/algorithms.md#flexlora, with the identities listed there). The contract
every strategy keeps (including the seed of the completion rows) is in
test_strategy_contract.py."""

from __future__ import annotations

import math

import pytest
import torch

from server.strategies.base import ClientInfo, Factors, StrategyError, Upload
from server.strategies.flexlora import FlexLoRA, truncated_svd

D_OUT, D_IN = 20, 16
MODULES = ["encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query", "pooler.dense"]
F64 = torch.float64


def rand_factors(g, rank, alpha, d_out=D_OUT, d_in=D_IN, dtype=F64):
    return Factors(torch.randn(rank, d_in, generator=g, dtype=dtype),
                   torch.randn(d_out, rank, generator=g, dtype=dtype), alpha)


def zero_initial(g, rank, alpha=16.0, modules=MODULES, dtype=F64):
    return {m: Factors(torch.randn(rank, D_IN, generator=g, dtype=dtype), torch.zeros(D_OUT, rank, dtype=dtype), alpha)
            for m in modules}


def make_round(g, ranks, alphas=None, samples=None, modules=MODULES):
    alphas = alphas or [16.0] * len(ranks)
    samples = samples or [10 * (k + 1) for k in range(len(ranks))]
    return [Upload(f"c{k}", {m: rand_factors(g, r, a) for m in modules}, n, r)
            for k, (r, a, n) in enumerate(zip(ranks, alphas, samples))]


def dense_average(uploads, module):
    """Σ p_k (alpha_k / r_k) B_k A_k, written out independently of the strategy."""
    total = sum(u.num_samples for u in uploads)
    out = torch.zeros(D_OUT, D_IN, dtype=F64)
    for u in uploads:
        f = u.factors[module]
        out += (u.num_samples / total) * (f.alpha / f.A.shape[0]) * (f.B @ f.A)
    return out


def best_rank(W, r):
    U, S, Vh = torch.linalg.svd(W)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


def test_hand_computed_diagonal():
    # ΔW_g = 2/3 * 1 * [3,0,0]ᵀ[1,0,0] + 1/3 * 1 * [0,3,0]ᵀ[0,1,0] = diag(2, 1, 0) (alpha 1, rank 1: s = 1)
    e = torch.eye(3, dtype=F64)
    up = [Upload("a", {"m": Factors(e[:1], 3 * e[:, :1], 1.0)}, 2, 1),
          Upload("b", {"m": Factors(e[1:2], 3 * e[:, 1:2], 1.0)}, 1, 1)]
    init = {"m": Factors(torch.ones(3, 3, dtype=F64), torch.zeros(3, 3, dtype=F64), 2.0)}
    s = FlexLoRA()
    state = s.init_state(init, [ClientInfo("a", 1, 1.0), ClientInfo("b", 1, 1.0), ClientInfo("big", 3, 2.0)])
    state = s.aggregate(state, up, 0).state
    assert torch.allclose(state["global"]["m"]["S"][:2], torch.tensor([2.0, 1.0], dtype=F64))
    # rank 1, alpha 2 (s = 2): s B A = diag(2, 0, 0), so B A = diag(1, 0, 0)
    d1 = s.download(state, ClientInfo("a", 1, 1.0), 1)
    assert d1.alpha == 2.0 and d1.rank == 1
    assert torch.allclose(d1.B["m"] @ d1.A["m"], torch.diag(torch.tensor([1.0, 0, 0], dtype=F64)), atol=1e-12)
    assert torch.allclose(d1.A["m"].abs(), e[:1])  # all singular values sit in B, A is a unit row
    # rank 3 (s = 2/3): the whole ΔW_g, plus a zero-valued third direction that is still a unit row
    d3 = s.download(state, ClientInfo("big", 3, 2.0), 1)
    assert torch.allclose((2.0 / 3) * d3.B["m"] @ d3.A["m"], torch.diag(torch.tensor([2.0, 1.0, 0], dtype=F64)),
                          atol=1e-12)
    assert torch.allclose(d3.A["m"] @ d3.A["m"].T, torch.eye(3, dtype=F64), atol=1e-12)
    assert torch.allclose(d3.B["m"][:, 2], torch.zeros(3, dtype=F64))


def test_best_rank_r_truncation_and_full_rank_with_mixed_ranks_and_alphas():
    g = torch.Generator().manual_seed(0)
    ranks, alphas = [2, 3, 5], [16.0, 8.0, 32.0]
    up = make_round(g, ranks, alphas, samples=[5, 30, 12])
    clients = [ClientInfo(f"c{k}", r, a) for k, (r, a) in enumerate(zip(ranks, alphas))]
    clients.append(ClientInfo("full", 10, 16.0))
    s = FlexLoRA()
    state = s.aggregate(s.init_state(zero_initial(g, 10), clients), up, 0).state
    for module in MODULES:
        W = dense_average(up, module)
        assert torch.linalg.matrix_rank(W) == 10
        S = torch.linalg.svd(W).S
        for r in (1, 2, 3, 5, 10):
            d = s.download(state, ClientInfo("x", r, 16.0), 1)
            approx = (16.0 / r) * d.B[module] @ d.A[module]
            assert torch.allclose(approx, best_rank(W, r), atol=1e-10), (module, r)
            # Eckart–Young: the error is exactly the discarded singular values
            assert math.isclose(float((W - approx).norm()), float(S[r:].norm()), rel_tol=1e-9, abs_tol=1e-10)
        d = s.download(state, ClientInfo("full", 10, 16.0), 1)
        assert torch.allclose((16.0 / 10) * d.B[module] @ d.A[module], W, atol=1e-10)


@pytest.mark.parametrize("shape", [(40, 30, 8), (30, 40, 8), (40, 30, 70), (30, 40, 70)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_routes_match_dense_svd(shape, dtype):
    m, n, N = shape
    g = torch.Generator().manual_seed(m + n + N)
    L = torch.randn(m, N, generator=g, dtype=F64)
    R = torch.randn(N, n, generator=g, dtype=F64)
    U, S, Vh = torch.linalg.svd(L @ R)
    for k in (1, 5, 8, 30):
        t = min(k, N, m, n)
        ref = U[:, :t] @ torch.diag(S[:t]) @ Vh[:t]
        tol = 1e-10 if dtype == F64 else 2e-5
        for route in ("factors", "gram", "svd", "auto"):
            u, s, vh = truncated_svd(L.to(dtype), R.to(dtype), k, route)
            assert u.shape == (m, t) and vh.shape == (t, n) and s.shape == (t,)
            assert torch.all(s[:-1] >= s[1:])
            got = ((u * s) @ vh).to(F64)
            assert torch.allclose(got, ref, atol=tol * float(S[0])), (route, k)
            assert torch.allclose(s.to(F64), S[:t], rtol=tol * 10, atol=tol * float(S[0]))
            # orthonormal singular vectors
            assert torch.allclose((vh @ vh.T).to(F64), torch.eye(t, dtype=F64), atol=tol * 10)


def test_strategy_routes_agree():
    g = torch.Generator().manual_seed(3)
    up = make_round(g, [1, 2, 4], samples=[1, 2, 3])
    clients = [ClientInfo("c", r, 16.0) for r in (1, 2, 4, 7)]
    init = zero_initial(g, 7)
    out = {}
    for route in ("factors", "gram", "svd"):
        s = FlexLoRA(route=route)
        state = s.aggregate(s.init_state(init, clients), up, 0).state
        out[route] = [s.download(state, ClientInfo("c", r, 16.0), 1) for r in (1, 2, 4, 7)]
    for route in ("gram", "svd"):
        for a, b in zip(out["factors"], out[route]):
            for m in MODULES:
                assert torch.allclose(a.B[m] @ a.A[m], b.B[m] @ b.A[m], atol=1e-10)


def test_download_respects_rank():
    g = torch.Generator().manual_seed(4)
    s = FlexLoRA()
    clients = [ClientInfo("a", 2, 16.0), ClientInfo("b", 6, 16.0)]
    state = s.aggregate(s.init_state(zero_initial(g, 6), clients), make_round(g, [2, 6]), 0).state
    for r in (2, 6):
        d = s.download(state, ClientInfo("x", r, 16.0), 1)
        assert d.rank == r and set(d.A) == set(d.B) == set(MODULES)
        assert all(d.A[m].shape == (r, D_IN) and d.B[m].shape == (D_OUT, r) for m in MODULES)
        assert not d.fresh and d.trainable == "both"


def test_rank_above_every_rank_in_use_gets_best_available_plus_zero_directions():
    g = torch.Generator().manual_seed(5)
    s = FlexLoRA()
    up = make_round(g, [3, 4])
    state = s.aggregate(s.init_state(zero_initial(g, 4), [ClientInfo("a", 3, 16.0), ClientInfo("b", 4, 16.0)]),
                        up, 0).state
    d = s.download(state, ClientInfo("late", 9, 16.0), 1)
    W = dense_average(up, MODULES[0])
    assert torch.allclose((16.0 / 9) * d.B[MODULES[0]] @ d.A[MODULES[0]], best_rank(W, 4), atol=1e-10)
    assert torch.allclose(d.A[MODULES[0]] @ d.A[MODULES[0]].T, torch.eye(9, dtype=F64), atol=1e-10)
    # deterministic: the same call again gives the same completion rows
    assert torch.equal(s.download(state, ClientInfo("late", 9, 16.0), 1).A[MODULES[0]], d.A[MODULES[0]])


def test_zero_initial_lora_hands_out_its_own_rows():
    g = torch.Generator().manual_seed(6)
    init = zero_initial(g, 8)
    s = FlexLoRA()
    state = s.init_state(init, [ClientInfo("a", 4, 16.0), ClientInfo("b", 8, 16.0)])
    d = s.download(state, ClientInfo("a", 4, 16.0), 0)
    for m in MODULES:
        assert torch.equal(d.A[m], init[m].A[:4])
        assert torch.equal(d.B[m], torch.zeros(D_OUT, 4, dtype=F64))


def test_nonzero_initial_lora_is_truncated_optimally():
    g = torch.Generator().manual_seed(7)
    init = {m: rand_factors(g, 6, 12.0) for m in MODULES}
    s = FlexLoRA()
    state = s.init_state(init, [ClientInfo("a", 2, 12.0), ClientInfo("b", 6, 12.0)])
    for r in (2, 6):
        d = s.download(state, ClientInfo("x", r, 12.0), 0)
        for m in MODULES:
            assert torch.allclose((12.0 / r) * d.B[m] @ d.A[m], best_rank(init[m].delta(), r), atol=1e-10)


def test_each_round_replaces_the_global_lora():
    g = torch.Generator().manual_seed(8)
    s = FlexLoRA()
    clients = [ClientInfo("a", 8, 16.0), ClientInfo("b", 8, 16.0)]
    state = s.init_state(zero_initial(g, 8), clients)
    first = make_round(g, [2, 3])
    second = make_round(g, [1, 2])
    state = s.aggregate(state, first, 0).state
    result = s.aggregate(state, second, 1)
    assert result.base_deltas == {}  # W0 is never modified
    d = s.download(result.state, ClientInfo("a", 8, 16.0), 2)
    for m in MODULES:
        assert torch.allclose(2.0 * d.B[m] @ d.A[m], dense_average(second, m), atol=1e-10)


def test_module_without_uploads_keeps_its_global_lora():
    g = torch.Generator().manual_seed(9)
    s = FlexLoRA()
    clients = [ClientInfo("a", 2, 16.0), ClientInfo("b", 3, 16.0)]
    state = s.aggregate(s.init_state(zero_initial(g, 3), clients), make_round(g, [2, 3]), 0).state
    partial = make_round(g, [2, 3], modules=MODULES[:1])
    new = s.aggregate(state, partial, 1).state
    assert torch.equal(new["global"][MODULES[1]]["US"], state["global"][MODULES[1]]["US"])
    assert not torch.allclose(new["global"][MODULES[0]]["US"], state["global"][MODULES[0]]["US"])


def test_factors_above_the_declared_rank_are_refused():
    # FlexLoRA clients do not prune: an upload holds exactly its declared rank.
    g = torch.Generator().manual_seed(12)
    s = FlexLoRA()
    state = s.init_state(zero_initial(g, 4), [ClientInfo("a", 4, 16.0)])
    with pytest.raises(StrategyError, match=f"client 'a': {MODULES[0]} has rank 3 but the upload says rank 2"):
        s.aggregate(state, [Upload("a", {MODULES[0]: rand_factors(g, 3, 16.0)}, 1, 2)], 0)
