"""FedIT: FedAvg of A and of B separately, weighted by sample counts
(docs/algorithms.md#fedit). The contract every strategy keeps (registry,
capabilities, checkpoints, no aliasing, common refusals) is in
test_strategy_contract.py."""

from __future__ import annotations

import pytest
import torch

from server.strategies.base import Factors, StrategyError, Upload
from server.strategies.fedit import FedIT

from strategy_helpers import (ALPHA, COUNTS, D_IN, D_OUT, HEAD, MODULES, P, R, make_clients, make_initial,
                              make_uploads)


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
    want_head = sum(p * u.head[HEAD] for p, u in zip(P, ups))
    torch.testing.assert_close(new["head"][HEAD], want_head)
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
    assert dl0.head == {}
    state = s.aggregate(state, make_uploads(), 0).state
    dl = s.download(state, make_clients()[2], 1)
    assert set(dl.A) == set(dl.B) == set(MODULES)
    assert dl.rank == R and dl.alpha == ALPHA and dl.trainable == "both" and dl.fresh is False
    for m in MODULES:
        assert dl.A[m].shape == (R, D_IN) and dl.B[m].shape == (D_OUT, R)
        assert torch.equal(dl.A[m], state["A"][m]) and torch.equal(dl.B[m], state["B"][m])
    assert torch.equal(dl.head[HEAD], state["head"][HEAD])


def test_init_refuses_initial_rank_other_than_clients():
    with pytest.raises(StrategyError, match="rank 8"):
        FedIT().init_state(make_initial(rank=8), make_clients())


@pytest.mark.parametrize("bad, message", [
    (lambda ups: ups[2].factors.pop(MODULES[1]), "lacks"),
    (lambda ups: ups[3].factors.__setitem__(MODULES[0], Factors(torch.zeros(R, D_IN), torch.zeros(D_OUT, R),
                                                                2 * ALPHA)), "alpha"),
])
def test_aggregate_refuses_uploads_that_do_not_fit(bad, message):
    s = FedIT()
    state = s.init_state(make_initial(), make_clients())
    ups = make_uploads()
    bad(ups)
    with pytest.raises(StrategyError, match=message):
        s.aggregate(state, ups, 0)
