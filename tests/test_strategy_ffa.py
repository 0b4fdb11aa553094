"""FFA-LoRA: A frozen and shared, B averaged with sample weights
(docs/algorithms.md#ffa). The contract every strategy keeps is in
test_strategy_contract.py."""

from __future__ import annotations

import pytest
import torch

from server.strategies.base import ClientInfo, Factors, StrategyError, Upload
from server.strategies.ffa import FFALoRA

from strategy_helpers import (ALPHA, COUNTS, D_OUT, HEAD, MODULES, P, R, assert_same, gen, make_clients,
                              make_initial, make_uploads, rand, reloaded)


def frozen_uploads(state, seed=1, counts=COUNTS):
    """Uploads as FFA-LoRA clients send them: the shared A untouched, a trained B."""
    g = gen(seed)
    return [Upload(f"c{k}", {m: Factors(state["A"][m].clone(), rand(g, D_OUT, R), ALPHA) for m in MODULES},
                   n, R, None, {HEAD: rand(g, 3, D_OUT)})
            for k, n in enumerate(counts)]


def test_frozen_a_makes_averaging_exact():
    # docs/algorithms.md#ffa: mean(B_k) A == mean(B_k A), so s * B_new A equals the ideal sum p_k s B_k A.
    s = FFALoRA()
    state = s.init_state(make_initial(), make_clients())
    ups = frozen_uploads(state)
    new = s.aggregate(state, ups, 0).state
    for m in MODULES:
        A = make_initial()[m].A
        ideal = sum(p * (ALPHA / R) * (u.factors[m].B @ A) for p, u in zip(P, ups))
        torch.testing.assert_close((ALPHA / R) * new["B"][m] @ new["A"][m], ideal)


def test_aggregate_matches_hand_computed_and_keeps_initial_a():
    s = FFALoRA()
    initial = make_initial()
    state = s.init_state(initial, make_clients())
    ups = make_uploads()  # random A in the uploads: a frozen factor must be ignored
    new = s.aggregate(state, ups, 0).state
    for m in MODULES:
        want_b = 0.1 * ups[0].factors[m].B + 0.2 * ups[1].factors[m].B + 0.3 * ups[2].factors[m].B \
            + 0.4 * ups[3].factors[m].B
        torch.testing.assert_close(new["B"][m], want_b)
        assert torch.equal(new["A"][m], initial[m].A)
    torch.testing.assert_close(new["head"][HEAD], sum(p * u.head[HEAD] for p, u in zip(P, ups)))


def test_a_never_changes_over_rounds():
    s = FFALoRA()
    initial = make_initial()
    state = s.init_state(initial, make_clients())
    for t in range(3):
        state = s.aggregate(state, make_uploads(seed=10 + t), t).state
        dl = s.download(state, make_clients()[0], t + 1)
        for m in MODULES:
            assert torch.equal(state["A"][m], initial[m].A)
            assert torch.equal(dl.A[m], initial[m].A)


def test_download_trains_b_with_shared_a_at_rank():
    s = FFALoRA()
    initial = make_initial()
    state = s.init_state(initial, make_clients())
    for client in make_clients():
        dl = s.download(state, client, 0)
        assert dl.trainable == "B" and dl.rank == R and dl.alpha == ALPHA and dl.fresh is False
        assert set(dl.A) == set(dl.B) == set(MODULES)
        for m in MODULES:
            assert torch.equal(dl.A[m], initial[m].A)  # the same A on every client
            assert dl.B[m].shape == (D_OUT, R)
    state = s.aggregate(state, frozen_uploads(state), 0).state
    dl = s.download(state, make_clients()[1], 1)
    assert torch.equal(dl.head[HEAD], state["head"][HEAD])


def test_without_resend_a_goes_only_to_clients_that_lack_it():
    # docs/algorithms.md#ffa: FFA-LoRA downloads r * d_out per module once clients hold A.
    s = FFALoRA(resend_frozen=False)
    state = s.init_state(make_initial(), make_clients())
    first = s.download(state, make_clients()[0], 0)
    assert set(first.A) == set(first.B) == set(MODULES)
    ups = frozen_uploads(state)[:3]  # c3 sits this round out
    state = s.aggregate(state, ups, 0).state
    dl = s.download(state, make_clients()[0], 1)
    assert dl.A == {} and set(dl.B) == set(MODULES)
    assert sum(t.numel() for t in dl.B.values()) == len(MODULES) * R * D_OUT
    late = s.download(state, make_clients()[3], 1)
    assert set(late.A) == set(MODULES)
    newcomer = s.download(state, ClientInfo("new", R, ALPHA), 1)
    assert set(newcomer.A) == set(MODULES)


def test_resend_decisions_survive_a_checkpoint():
    # What each client holds is in the state, so a resumed run still leaves A out.
    s = FFALoRA(resend_frozen=False)
    state = s.init_state(make_initial(), make_clients())
    state = s.aggregate(state, frozen_uploads(state), 0).state
    resumed = reloaded(state)
    assert s.download(resumed, make_clients()[0], 1).A == {}
    assert set(s.download(resumed, ClientInfo("new", R, ALPHA), 1).A) == set(MODULES)


def test_frozen_a_in_upload_may_be_any_shape():
    s = FFALoRA()
    state = s.init_state(make_initial(), make_clients())
    ups = frozen_uploads(state)
    ups[0].factors[MODULES[0]] = Factors(torch.empty(R, 0), ups[0].factors[MODULES[0]].B, ALPHA)
    # Neither refused nor read: the round is the one with the well-formed A.
    assert_same(s.aggregate(state, ups, 0).state, s.aggregate(state, frozen_uploads(state), 0).state)


def test_aggregate_refuses_an_upload_lacking_a_module():
    s = FFALoRA()
    state = s.init_state(make_initial(), make_clients())
    ups = frozen_uploads(state)
    ups[2].factors.pop(MODULES[0])
    with pytest.raises(StrategyError, match=rf"lacks module\(s\) \['{MODULES[0]}'\]; ffa trains every module"):
        s.aggregate(state, ups, 0)
