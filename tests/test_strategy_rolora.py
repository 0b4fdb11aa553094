"""RoLoRA: B trains in even rounds, A in odd rounds; only the trained factor is
averaged (docs/algorithms.md#rolora). The contract every strategy keeps is in
test_strategy_contract.py."""

from __future__ import annotations

import pytest
import torch

from server.strategies.base import Factors, StrategyError, Upload
from server.strategies.rolora import RoLoRA

from strategy_helpers import (ALPHA, COUNTS, D_IN, D_OUT, HEAD, MODULES, P, R, assert_same, make_clients,
                              make_initial, make_uploads)


def test_trainable_alternates_b_then_a():
    s = RoLoRA()
    state = s.init_state(make_initial(), make_clients())
    assert [s.download(state, make_clients()[0], t).trainable for t in range(4)] == ["B", "A", "B", "A"]


def test_even_round_averages_b_only_and_is_exact():
    s = RoLoRA()
    initial = make_initial()
    state = s.init_state(initial, make_clients())
    ups = make_uploads()  # their A differs from the frozen one and must be ignored
    new = s.aggregate(state, ups, 0).state
    for m in MODULES:
        A = initial[m].A
        assert torch.equal(new["A"][m], A)
        want_b = 0.1 * ups[0].factors[m].B + 0.2 * ups[1].factors[m].B + 0.3 * ups[2].factors[m].B \
            + 0.4 * ups[3].factors[m].B
        torch.testing.assert_close(new["B"][m], want_b)
        # docs/algorithms.md#rolora: with A frozen, the product of means is the mean of products.
        ideal = sum(p * (u.factors[m].B @ A) for p, u in zip(P, ups))
        torch.testing.assert_close(new["B"][m] @ new["A"][m], ideal)


def test_odd_round_averages_a_only_and_is_exact():
    s = RoLoRA()
    initial = make_initial()
    state = s.init_state(initial, make_clients())
    ups = make_uploads(seed=5)  # their B must be ignored in an A round
    new = s.aggregate(state, ups, 1).state
    for m in MODULES:
        B = initial[m].B
        assert torch.equal(new["B"][m], B)
        want_a = 0.1 * ups[0].factors[m].A + 0.2 * ups[1].factors[m].A + 0.3 * ups[2].factors[m].A \
            + 0.4 * ups[3].factors[m].A
        torch.testing.assert_close(new["A"][m], want_a)
        ideal = sum(p * (B @ u.factors[m].A) for p, u in zip(P, ups))
        torch.testing.assert_close(new["B"][m] @ new["A"][m], ideal)


def test_two_rounds_give_hand_computed_pair():
    # Round 0 (B trains): client k sends B filled with k+1, so B = 0.1*1 + 0.2*2 + 0.3*3 + 0.4*4 = 3.0.
    # Round 1 (A trains) with counts 30, 10 (p = 0.75, 0.25): A filled with 2 and 10 -> 0.75*2 + 0.25*10 = 4.0.
    s = RoLoRA()
    state = s.init_state(make_initial(), make_clients())
    ones_a = torch.ones(R, D_IN)
    r0 = [Upload(f"c{k}", {m: Factors(ones_a, torch.full((D_OUT, R), k + 1.0), ALPHA) for m in MODULES}, n, R)
          for k, n in enumerate(COUNTS)]
    state = s.aggregate(state, r0, 0).state
    r1 = [Upload(f"c{k}", {m: Factors(torch.full((R, D_IN), v), torch.zeros(D_OUT, R), ALPHA) for m in MODULES},
                 n, R)
          for k, (v, n) in enumerate([(2.0, 30), (10.0, 10)])]
    state = s.aggregate(state, r1, 1).state
    for m in MODULES:
        torch.testing.assert_close(state["B"][m], torch.full((D_OUT, R), 3.0, dtype=torch.float64))
        torch.testing.assert_close(state["A"][m], torch.full((R, D_IN), 4.0, dtype=torch.float64))


def test_download_gives_both_shared_factors_at_rank():
    s = RoLoRA()
    state = s.init_state(make_initial(), make_clients())
    state = s.aggregate(state, make_uploads(), 0).state
    dl = s.download(state, make_clients()[3], 1)
    assert dl.trainable == "A" and dl.rank == R and dl.alpha == ALPHA and dl.fresh is False
    assert set(dl.A) == set(dl.B) == set(MODULES)
    for m in MODULES:
        assert torch.equal(dl.A[m], state["A"][m]) and torch.equal(dl.B[m], state["B"][m])
        assert dl.A[m].shape == (R, D_IN) and dl.B[m].shape == (D_OUT, R)
    assert torch.equal(dl.head[HEAD], state["head"][HEAD])


def test_without_resend_downloads_alternate_one_factor():
    # docs/algorithms.md#rolora: once clients hold the frozen factor, each download carries only the
    # factor aggregated in the previous round (r*d_out after a B round, r*d_in after an A round).
    s = RoLoRA(resend_frozen=False)
    state = s.init_state(make_initial(), make_clients())
    c0 = make_clients()[0]
    dl = s.download(state, c0, 0)
    assert set(dl.A) == set(dl.B) == set(MODULES)
    state = s.aggregate(state, make_uploads(1), 0).state
    dl = s.download(state, c0, 1)
    assert dl.A == {} and sum(t.numel() for t in dl.B.values()) == len(MODULES) * D_OUT * R
    state = s.aggregate(state, make_uploads(2), 1).state
    dl = s.download(state, c0, 2)
    assert dl.B == {} and sum(t.numel() for t in dl.A.values()) == len(MODULES) * R * D_IN
    # A client that missed rounds gets both factors.
    state2 = s.aggregate(state, make_uploads(3)[1:], 2).state
    dl = s.download(state2, c0, 3)
    assert set(dl.A) == set(dl.B) == set(MODULES)


@pytest.mark.parametrize("round_index, trained", [(0, "B"), (1, "A")])
def test_a_broken_frozen_factor_is_ignored(round_index, trained):
    # The contract checks that a broken trained factor is refused; the frozen one is never read.
    s = RoLoRA()
    state = s.init_state(make_initial(), make_clients())
    ups = make_uploads()
    f = ups[2].factors[MODULES[0]]
    ups[2].factors[MODULES[0]] = (Factors(f.A, torch.zeros(D_OUT + 2, R), ALPHA) if trained == "A"
                                  else Factors(torch.zeros(R, D_IN + 2), f.B, ALPHA))
    assert_same(s.aggregate(state, ups, round_index).state, s.aggregate(state, make_uploads(), round_index).state)


def test_aggregate_refuses_an_upload_lacking_a_module():
    s = RoLoRA()
    state = s.init_state(make_initial(), make_clients())
    ups = make_uploads()
    ups[2].factors.pop(MODULES[0])
    with pytest.raises(StrategyError, match=rf"lacks module\(s\) \['{MODULES[0]}'\]; rolora trains every module"):
        s.aggregate(state, ups, 1)
