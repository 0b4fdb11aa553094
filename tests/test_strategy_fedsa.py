"""FedSA-LoRA: A averaged with sample weights; B and the head stay on each client
(docs/algorithms.md#fedsa). The contract every strategy keeps is in
test_strategy_contract.py."""

from __future__ import annotations

import pytest
import torch

from server.strategies.base import Factors, StrategyError, Upload
from server.strategies.fedsa import FedSALoRA

from strategy_helpers import (ALPHA, D_IN, D_OUT, HEAD, MODULES, R, assert_same, make_clients, make_initial,
                              make_uploads, snapshot)


def test_aggregate_matches_hand_computed_a_and_ignores_b_and_head():
    s = FedSALoRA()
    state = s.init_state(make_initial(), make_clients())
    assert "B" not in state  # B is each client's own
    ups = make_uploads()
    new = s.aggregate(state, ups, 0).state
    for m in MODULES:
        want_a = 0.1 * ups[0].factors[m].A + 0.2 * ups[1].factors[m].A + 0.3 * ups[2].factors[m].A \
            + 0.4 * ups[3].factors[m].A
        torch.testing.assert_close(new["A"][m], want_a)
    assert "B" not in new and new["head"] == {}
    # Different B and head in the uploads change nothing.
    other = make_uploads(seed=7)
    for u, o in zip(ups, other):
        for m in MODULES:
            u.factors[m] = Factors(u.factors[m].A, o.factors[m].B, ALPHA)
        u.head[HEAD] = o.head[HEAD]
    assert_same(snapshot(s.aggregate(state, ups, 0).state), snapshot(new))


def test_aggregate_constant_a_gives_literal_value():
    # Counts 5, 15, 30 -> p = 0.1, 0.3, 0.6; A filled with 10, 20, 30 -> 1 + 6 + 18 = 25.
    s = FedSALoRA()
    state = s.init_state(make_initial(), make_clients())
    ups = [Upload(f"c{k}", {m: Factors(torch.full((R, D_IN), v), torch.zeros(D_OUT, R), ALPHA)
                            for m in MODULES}, n, R)
           for k, (v, n) in enumerate([(10.0, 5), (20.0, 15), (30.0, 30)])]
    new = s.aggregate(state, ups, 0).state
    for m in MODULES:
        torch.testing.assert_close(new["A"][m], torch.full((R, D_IN), 25.0, dtype=torch.float64))


def test_download_carries_a_only_and_no_head():
    s = FedSALoRA()
    state = s.init_state(make_initial(), make_clients())
    state = s.aggregate(state, make_uploads(), 0).state
    dl = s.download(state, make_clients()[1], 1)
    assert dl.B == {} and dl.head == {}
    assert set(dl.A) == set(MODULES)
    assert dl.trainable == "both" and dl.rank == R and dl.alpha == ALPHA and dl.fresh is False
    for m in MODULES:
        assert dl.A[m].shape == (R, D_IN) and torch.equal(dl.A[m], state["A"][m])
    # docs/algorithms.md#fedsa: FedSA-LoRA downloads r * d_in per module.
    assert sum(t.numel() for t in dl.A.values()) == len(MODULES) * R * D_IN


def test_round_zero_download_is_initial_a():
    s = FedSALoRA()
    initial = make_initial()
    state = s.init_state(initial, make_clients())
    dl = s.download(state, make_clients()[0], 0)
    for m in MODULES:
        assert torch.equal(dl.A[m], initial[m].A)


def test_upload_b_may_be_anything():
    s = FedSALoRA()
    state = s.init_state(make_initial(), make_clients())
    ups = make_uploads()
    for u in ups:
        for m in MODULES:
            u.factors[m] = Factors(u.factors[m].A, torch.empty(0), ALPHA)
    # Neither refused nor read: the round is the one with the uploads' real B.
    assert_same(s.aggregate(state, ups, 0).state, s.aggregate(state, make_uploads(), 0).state)


def test_aggregate_refuses_an_upload_lacking_a_module():
    s = FedSALoRA()
    state = s.init_state(make_initial(), make_clients())
    ups = make_uploads()
    ups[2].factors.pop(MODULES[1])
    with pytest.raises(StrategyError, match=rf"lacks module\(s\) \['{MODULES[1]}'\]; fedsa trains every module"):
        s.aggregate(state, ups, 0)
