"""FedSA-LoRA: A averaged with sample weights; B and the head stay on each client."""

from __future__ import annotations

import pytest
import torch

from server.strategies import get_strategy
from server.strategies.base import ClientInfo, Factors, StrategyError, Upload
from server.strategies.fedsa import FedSALoRA

from strategy_helpers import (ALPHA, D_IN, D_OUT, HEAD, MODULES, R, assert_checkpointable, assert_same,
                              make_clients, make_initial, make_uploads, snapshot)


def test_registry_builds_fedsa():
    assert isinstance(get_strategy("fedsa"), FedSALoRA)


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
    assert "B" not in new and new["extra"] == {}
    # Different B and head in the uploads change nothing.
    other = make_uploads(seed=7)
    for u, o in zip(ups, other):
        for m in MODULES:
            u.factors[m] = Factors(u.factors[m].A, o.factors[m].B, ALPHA)
        u.extra[HEAD] = o.extra[HEAD]
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
    assert dl.B == {} and dl.extra == {}
    assert set(dl.A) == set(MODULES)
    assert dl.trainable == "both" and dl.rank == R and dl.alpha == ALPHA and dl.fresh is False
    for m in MODULES:
        assert dl.A[m].shape == (R, D_IN) and torch.equal(dl.A[m], state["A"][m])
    # Section 14.9: FedSA-LoRA downloads r * d_in per module.
    assert sum(t.numel() for t in dl.A.values()) == len(MODULES) * R * D_IN
    dl.A[MODULES[0]].add_(1.0)
    assert not torch.equal(dl.A[MODULES[0]], state["A"][MODULES[0]])


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
    s.aggregate(state, ups, 0)  # does not raise: B is never read


def test_download_refuses_other_rank_and_layer_subsets():
    s = FedSALoRA()
    state = s.init_state(make_initial(), make_clients())
    with pytest.raises(StrategyError, match="rank 3"):
        s.download(state, ClientInfo("x", 3, ALPHA), 0)
    with pytest.raises(StrategyError, match="layermean"):
        s.download(state, ClientInfo("x", R, ALPHA, frozenset({0, 1})), 0)


def test_init_refuses_mixed_ranks_naming_methods_that_can():
    with pytest.raises(StrategyError) as err:
        FedSALoRA().init_state(make_initial(), make_clients(ranks=(8, 4, 4, 4)))
    assert "flora" in str(err.value) and "hetlora" in str(err.value)


def test_state_is_checkpointable():
    s = FedSALoRA()
    state = s.init_state(make_initial(), make_clients())
    assert_checkpointable(state)
    state = s.aggregate(state, make_uploads(), 0).state
    assert_checkpointable(state)


def test_inputs_are_not_mutated_or_aliased():
    s = FedSALoRA()
    initial, clients = make_initial(), make_clients()
    before_initial = snapshot(initial)
    state = s.init_state(initial, clients)
    ups = make_uploads()
    before = snapshot((state, ups))
    new = s.aggregate(state, ups, 0).state
    s.download(new, clients[0], 1)
    assert_same(snapshot((state, ups)), before)
    state["A"][MODULES[0]].add_(1.0)
    new["A"][MODULES[1]].add_(1.0)
    assert_same(snapshot(initial), before_initial)
    assert_same(snapshot(ups), before[1])


@pytest.mark.parametrize("bad, message", [
    (lambda ups: ups[1].__setattr__("rank", 3), "rank 3"),
    (lambda ups: ups[0].factors.__setitem__("model.layers.3.self_attn.q_proj", ups[0].factors[MODULES[0]]),
     "unknown module"),
    (lambda ups: ups[2].factors.pop(MODULES[1]), "lacks"),
    (lambda ups: ups[3].factors.__setitem__(MODULES[0], Factors(torch.zeros(R - 1, D_IN), torch.zeros(D_OUT, R),
                                                                ALPHA)), r"A of .* shape"),
    (lambda ups: ups.clear(), "no uploads"),
])
def test_aggregate_refuses_uploads_that_do_not_fit(bad, message):
    s = FedSALoRA()
    state = s.init_state(make_initial(), make_clients())
    ups = make_uploads()
    bad(ups)
    with pytest.raises(StrategyError, match=message):
        s.aggregate(state, ups, 0)
