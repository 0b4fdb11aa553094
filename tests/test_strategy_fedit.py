"""FedIT: FedAvg of A and of B separately, weighted by sample counts."""

from __future__ import annotations

import pytest
import torch

from server.strategies import get_strategy
from server.strategies.base import ClientInfo, Factors, StrategyError, Upload
from server.strategies.fedit import FedIT

from strategy_helpers import (ALPHA, COUNTS, D_IN, D_OUT, HEAD, MODULES, P, R, assert_checkpointable,
                              assert_same, make_clients, make_initial, make_uploads, reloaded, snapshot)


def test_registry_builds_fedit():
    assert isinstance(get_strategy("fedit"), FedIT)


def test_aggregate_matches_hand_computed_weighted_mean():
    s = FedIT()
    state = s.init_state(make_initial(), make_clients())
    ups = make_uploads()
    new = s.aggregate(state, ups, 0).state
    for m in MODULES:
        want_a = 0.1 * ups[0].factors[m].A + 0.2 * ups[1].factors[m].A + 0.3 * ups[2].factors[m].A \
            + 0.4 * ups[3].factors[m].A
        want_b = 0.1 * ups[0].factors[m].B + 0.2 * ups[1].factors[m].B + 0.3 * ups[2].factors[m].B \
            + 0.4 * ups[3].factors[m].B
        torch.testing.assert_close(new["A"][m], want_a)
        torch.testing.assert_close(new["B"][m], want_b)
    want_head = sum(p * u.extra[HEAD] for p, u in zip(P, ups))
    torch.testing.assert_close(new["extra"][HEAD], want_head)
    assert new["rank"] == R and new["alpha"] == ALPHA


def test_aggregate_constant_factors_give_literal_value():
    # Client k sends factors filled with k+1: 0.1*1 + 0.2*2 + 0.3*3 + 0.4*4 = 3.0
    s = FedIT()
    state = s.init_state(make_initial(), make_clients())
    ups = [Upload(f"c{k}", {m: Factors(torch.full((R, D_IN), k + 1.0), torch.full((D_OUT, R), k + 1.0), ALPHA)
                            for m in MODULES}, n, R)
           for k, n in enumerate(COUNTS)]
    new = s.aggregate(state, ups, 0).state
    for m in MODULES:
        torch.testing.assert_close(new["A"][m], torch.full((R, D_IN), 3.0, dtype=torch.float64))
        torch.testing.assert_close(new["B"][m], torch.full((D_OUT, R), 3.0, dtype=torch.float64))
        assert new["A"][m].dtype == torch.float64  # the state's dtype, not the uploads'


def test_product_of_means_is_not_mean_of_products():
    # The inexactness that FedEx-LoRA / FLoRA address: FedIT must average factors, not products.
    s = FedIT()
    state = s.init_state(make_initial(), make_clients())
    ups = make_uploads()
    new = s.aggregate(state, ups, 0).state
    m = MODULES[0]
    ideal = sum(p * u.factors[m].B @ u.factors[m].A for p, u in zip(P, ups))
    assert not torch.allclose(new["B"][m] @ new["A"][m], ideal, atol=1e-3)


def test_download_gives_global_pair_at_rank_and_head():
    s = FedIT()
    state = s.init_state(make_initial(), make_clients())
    dl0 = s.download(state, make_clients()[0], 0)
    assert dl0.extra == {}
    state = s.aggregate(state, make_uploads(), 0).state
    dl = s.download(state, make_clients()[2], 1)
    assert set(dl.A) == set(dl.B) == set(MODULES)
    assert dl.rank == R and dl.alpha == ALPHA and dl.trainable == "both" and dl.fresh is False
    for m in MODULES:
        assert dl.A[m].shape == (R, D_IN) and dl.B[m].shape == (D_OUT, R)
        assert torch.equal(dl.A[m], state["A"][m]) and torch.equal(dl.B[m], state["B"][m])
    assert torch.equal(dl.extra[HEAD], state["extra"][HEAD])
    # The download is a copy: a client loading it in place must not change the state.
    dl.A[MODULES[0]].add_(1.0)
    dl.extra[HEAD].add_(1.0)
    assert not torch.equal(dl.A[MODULES[0]], state["A"][MODULES[0]])
    assert not torch.equal(dl.extra[HEAD], state["extra"][HEAD])


def test_download_refuses_other_rank_and_layer_subsets():
    s = FedIT()
    state = s.init_state(make_initial(), make_clients())
    with pytest.raises(StrategyError, match="rank 3"):
        s.download(state, ClientInfo("x", 3, ALPHA), 0)
    with pytest.raises(StrategyError, match="layermean"):
        s.download(state, ClientInfo("x", R, ALPHA, frozenset({0})), 0)


def test_init_refuses_mixed_ranks_naming_methods_that_can():
    with pytest.raises(StrategyError) as err:
        FedIT().init_state(make_initial(), make_clients(ranks=(4, 4, 8, 4)))
    for method in ("hetlora", "flexlora", "flora", "rbla"):
        assert method in str(err.value)


def test_init_refuses_initial_rank_other_than_clients():
    with pytest.raises(StrategyError, match="rank 8"):
        FedIT().init_state(make_initial(rank=8), make_clients())


def test_state_is_checkpointable_and_resumes_identically():
    s = FedIT()
    state = s.init_state(make_initial(), make_clients())
    assert_checkpointable(state)
    state = s.aggregate(state, make_uploads(1), 0).state
    assert_checkpointable(state)
    resumed = reloaded(state)
    a = s.aggregate(state, make_uploads(2), 1).state
    b = s.aggregate(resumed, make_uploads(2), 1).state
    assert_same(snapshot(a), snapshot(b))


def test_inputs_are_not_mutated_or_aliased():
    s = FedIT()
    initial, clients = make_initial(), make_clients()
    before_initial = snapshot(initial)
    state = s.init_state(initial, clients)
    ups = make_uploads()
    before = snapshot((state, ups))
    new = s.aggregate(state, ups, 0).state
    s.download(new, clients[0], 1)
    assert_same(snapshot((state, ups)), before)
    # In-place changes to returned state must not reach the caller's tensors.
    state["A"][MODULES[0]].add_(1.0)
    new["B"][MODULES[1]].add_(1.0)
    new["extra"][HEAD].add_(1.0)
    assert_same(snapshot(initial), before_initial)
    assert_same(snapshot(ups), before[1])


@pytest.mark.parametrize("bad, message", [
    (lambda ups: ups[1].__setattr__("rank", 3), "rank 3"),
    (lambda ups: ups[0].factors.__setitem__("model.layers.7.self_attn.q_proj", ups[0].factors[MODULES[0]]),
     "unknown module"),
    (lambda ups: ups[2].factors.pop(MODULES[1]), "lacks"),
    (lambda ups: ups[3].factors.__setitem__(MODULES[0], Factors(torch.zeros(R, D_IN + 1),
                                                                torch.zeros(D_OUT, R), ALPHA)),
     r"A of .* shape"),
    (lambda ups: ups[3].factors.__setitem__(MODULES[0], Factors(torch.zeros(R, D_IN), torch.zeros(D_OUT, R),
                                                                2 * ALPHA)), "alpha"),
    (lambda ups: ups.append(ups[0]), "more than one upload"),
    (lambda ups: ups[1].extra.__setitem__(HEAD, torch.zeros(1, D_OUT)), "extra"),
    (lambda ups: ups.clear(), "no uploads"),
])
def test_aggregate_refuses_uploads_that_do_not_fit(bad, message):
    s = FedIT()
    state = s.init_state(make_initial(), make_clients())
    ups = make_uploads()
    bad(ups)
    with pytest.raises(StrategyError, match=message):
        s.aggregate(state, ups, 0)
