"""LoRA-FAIR: FedIT plus a server-side correction ΔB that aligns (B̄+ΔB)Ā with
ΔW = Σ p_k B_k A_k (docs/algorithms.md#lorafair: λ → ∞ gives FedIT, λ = 0
drives the cosine to 1). The contract every strategy keeps is in
test_strategy_contract.py."""

from __future__ import annotations

import pytest
import torch

from server.strategies import get_strategy
from server.strategies.base import ClientInfo, Factors, StrategyError, Upload
from server.strategies.lorafair import LoRAFAIR, cosine, fair_correction

D_OUT, D_IN, RANK, ALPHA = 24, 16, 3, 6.0
MODULES = ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value",
           "encoder.layer.1.output.dense"]
SHAPES = {MODULES[0]: (D_OUT, D_IN), MODULES[1]: (D_OUT, D_IN), MODULES[2]: (D_IN, D_OUT)}
F64 = torch.float64
SAMPLES = [10, 20, 30, 40]


def initial(g):
    return {m: Factors(torch.randn(RANK, d_in, generator=g, dtype=F64), torch.zeros(d_out, RANK, dtype=F64), ALPHA)
            for m, (d_out, d_in) in SHAPES.items()}


def aligned_round(g, init, drift=0.3):
    """Clients whose A_k = M_k A0 stay in the row space of the shared start A0, so
    ΔW lies in the row space of Ā and a cosine of 1 is reachable, while FedIT's
    B̄Ā is visibly off (B̄Ā ≠ Σ p_k B_k A_k)."""
    ups = []
    for k, n in enumerate(SAMPLES):
        factors = {}
        for m, (d_out, d_in) in SHAPES.items():
            M = torch.eye(RANK, dtype=F64) + drift * torch.randn(RANK, RANK, generator=g, dtype=F64)
            factors[m] = Factors(M @ init[m].A, 0.1 * torch.randn(d_out, RANK, generator=g, dtype=F64), ALPHA)
        ups.append(Upload(f"c{k}", factors, n, RANK))
    return ups


def clients():
    return [ClientInfo(f"c{k}", RANK, ALPHA, None, n) for k, n in enumerate(SAMPLES)]


def fedit_pair(ups, m):
    total = sum(u.num_samples for u in ups)
    A = sum(u.num_samples / total * u.factors[m].A for u in ups)
    B = sum(u.num_samples / total * u.factors[m].B for u in ups)
    return A, B


def ideal(ups, m):
    total = sum(u.num_samples for u in ups)
    return sum(u.num_samples / total * u.factors[m].B @ u.factors[m].A for u in ups)


def test_hand_computed_fedit_limit():
    # p = (1/4, 3/4): Ā = [1/4*2 + 3/4*6] = [5], B̄ = [1/4*4 + 3/4*0] = [1]; λ = inf leaves B̄ alone
    ups = [Upload("a", {"m": Factors(torch.tensor([[2.0]]), torch.tensor([[4.0]]), 1.0)}, 1, 1),
           Upload("b", {"m": Factors(torch.tensor([[6.0]]), torch.tensor([[0.0]]), 1.0)}, 3, 1)]
    s = LoRAFAIR(lam=float("inf"))
    state = s.init_state({"m": Factors(torch.ones(1, 1), torch.zeros(1, 1), 1.0)}, [ClientInfo("a", 1, 1.0)])
    state = s.aggregate(state, ups, 0).state
    assert torch.equal(state["A"]["m"], torch.tensor([[5.0]]))
    assert torch.equal(state["B"]["m"], torch.tensor([[1.0]]))
    assert state["cosine"]["m"] == pytest.approx(1.0)  # 1x1: every nonzero product points the same way


def test_huge_lambda_reduces_to_fedit():
    g = torch.Generator().manual_seed(0)
    init = initial(g)
    ups = aligned_round(g, init)
    s = LoRAFAIR(lam=1e6, steps=50, lr=1e-3)
    state = s.aggregate(s.init_state(init, clients()), ups, 0).state
    for m in MODULES:
        A, B = fedit_pair(ups, m)
        assert torch.allclose(state["A"][m], A, atol=1e-12)
        assert torch.allclose(state["B"][m], B, atol=1e-12)  # ΔB = 0: proximal step, not a wobble
        assert state["cosine"][m] == pytest.approx(cosine(ideal(ups, m), B, A), abs=1e-9)
    # the same as the registered FedIT strategy
    fedit = get_strategy("fedit")
    ref = fedit.aggregate(fedit.init_state(init, clients()), ups, 0).state
    for m in MODULES:
        assert torch.allclose(state["B"][m], ref["B"][m], atol=1e-12)


def test_zero_lambda_drives_the_cosine_to_one():
    g = torch.Generator().manual_seed(1)
    init = initial(g)
    ups = aligned_round(g, init)
    s = LoRAFAIR(lam=0.0, steps=300, lr=1e-3)
    state = s.aggregate(s.init_state(init, clients()), ups, 0).state
    for m in MODULES:
        A, B = fedit_pair(ups, m)
        W = ideal(ups, m)
        before = cosine(W, B, A)
        assert before < 0.99  # FedIT's product is visibly off
        after = cosine(W, state["B"][m], state["A"][m])
        assert after > 1 - 1e-6
        assert state["cosine"][m] == pytest.approx(after, abs=1e-9)


def test_default_lambda_improves_on_fedit_and_keeps_a():
    g = torch.Generator().manual_seed(2)
    init = initial(g)
    ups = aligned_round(g, init)
    s = LoRAFAIR(steps=300, lr=1e-3)  # lam = 0.01
    state = s.aggregate(s.init_state(init, clients()), ups, 0).state
    for m in MODULES:
        A, B = fedit_pair(ups, m)
        W = ideal(ups, m)
        assert torch.allclose(state["A"][m], A, atol=1e-12)  # only B is corrected
        assert not torch.allclose(state["B"][m], B, atol=1e-3)
        before, after = cosine(W, B, A), cosine(W, state["B"][m], A)
        assert before < 0.99 and 1 - after < 0.01 * (1 - before)  # most of the gap closed


def test_correction_shrinks_as_lambda_grows():
    g = torch.Generator().manual_seed(3)
    init = initial(g)
    ups = aligned_round(g, init)
    m = MODULES[0]
    A, B = fedit_pair(ups, m)
    W = ideal(ups, m)
    norms = [float(fair_correction(W, A, B, lam, 300, 1e-3).norm()) for lam in (0.01, 0.1, 0.3, 1e3)]
    assert norms[0] > norms[1] > norms[2] > 0 and norms[3] == 0.0


def test_modules_solved_together_match_one_by_one_and_are_deterministic():
    g = torch.Generator().manual_seed(4)
    init = initial(g)
    ups = aligned_round(g, init)
    s = LoRAFAIR(lam=0.05, steps=80, lr=1e-3)
    state0 = s.init_state(init, clients())
    first = s.aggregate(state0, ups, 0).state
    second = s.aggregate(state0, ups, 0).state
    for m in MODULES:
        assert torch.equal(first["B"][m], second["B"][m])
        A, B = fedit_pair(ups, m)
        alone = B + fair_correction(ideal(ups, m), A, B, 0.05, 80, 1e-3)
        assert torch.allclose(first["B"][m], alone, atol=1e-9)


def test_download_rank_and_head():
    g = torch.Generator().manual_seed(5)
    init = initial(g)
    ups = aligned_round(g, init)
    ups[1].head["classifier.bias"] = torch.tensor([2.0, 4.0])
    s = get_strategy("lorafair", steps=10, lr=1e-3)
    state = s.aggregate(s.init_state(init, clients()), ups, 0).state
    d = s.download(state, clients()[0], 1)
    assert d.rank == RANK and d.alpha == ALPHA and not d.fresh and d.trainable == "both"
    assert set(d.A) == set(d.B) == set(MODULES)
    for m, (d_out, d_in) in SHAPES.items():
        assert d.A[m].shape == (RANK, d_in) and d.B[m].shape == (d_out, RANK)
        assert torch.equal(d.B[m], state["B"][m])
    assert torch.equal(d.head["classifier.bias"], torch.tensor([2.0, 4.0]))


@pytest.mark.parametrize("options", [dict(lam=-1.0), dict(steps=-1), dict(lr=0.0)])
def test_refuses_bad_options(options):
    with pytest.raises(StrategyError, match="lorafair: needs lam >= 0, steps >= 0 and lr > 0"):
        LoRAFAIR(**options)


def test_fair_correction_leaves_its_inputs_untouched():
    g = torch.Generator().manual_seed(6)
    init = initial(g)
    ups = aligned_round(g, init)
    m = MODULES[0]
    A, B = fedit_pair(ups, m)
    W = ideal(ups, m)
    kept = W.clone(), A.clone(), B.clone()
    dB = fair_correction(W, A, B, 0.0, 5, 1e-3)
    assert torch.count_nonzero(dB) > 0  # the solve ran
    assert torch.equal(W, kept[0]) and torch.equal(A, kept[1]) and torch.equal(B, kept[2])
