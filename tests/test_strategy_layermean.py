"""LayerMean (FedRA, Fed-piLot stand-in): per-module mean over the clients that
trained it (docs/algorithms.md#layermean). The contract every strategy keeps
(block subsets accepted, modules outside an upload's blocks refused, ...) is in
test_strategy_contract.py."""

from __future__ import annotations

import pytest
import torch

from server.strategies import get_strategy
from server.strategies.base import ClientInfo, StrategyError, Upload
from server.strategies.layermean import LayerMean

from strategy_helpers import ALPHA, COUNTS, D_IN, D_OUT, HEAD, MODULES, P, R, gen, make_initial, rand, random_factors


M0, M1 = MODULES
BLOCKS = (frozenset({0}), frozenset({1}), frozenset({0, 1}), frozenset({0}))


def subset_clients(ranks=(R,) * 4):
    return [ClientInfo(f"c{k}", r, ALPHA, BLOCKS[k], n) for k, (r, n) in enumerate(zip(ranks, COUNTS))]


def subset_uploads(seed=1):
    """c0 trains block 0, c1 block 1, c2 both, c3 block 0."""
    g = gen(seed)
    out = []
    for k, n in enumerate(COUNTS):
        mods = [m for m in MODULES if int(m.split(".")[2]) in BLOCKS[k]]
        out.append(Upload(f"c{k}", random_factors(g, R, mods), n, R, BLOCKS[k], {HEAD: rand(g, 3, D_OUT)}))
    return out


def test_weighting_option_reaches_the_strategy():
    assert get_strategy("layermean", weighting="samples").weighting == "samples"
    assert LayerMean().weighting == "uniform"


def test_uniform_mean_over_clients_that_trained_each_module():
    s = LayerMean()
    state = s.init_state(make_initial(), subset_clients())
    u = subset_uploads()
    new = s.aggregate(state, u, 0).state
    for which in ("A", "B"):
        f = lambda k, m: getattr(u[k].factors[m], which)  # noqa: E731
        torch.testing.assert_close(new[which][M0], (f(0, M0) + f(2, M0) + f(3, M0)) / 3)
        torch.testing.assert_close(new[which][M1], (f(1, M1) + f(2, M1)) / 2)
    # FedRA averages the head uniformly over every participant.
    torch.testing.assert_close(new["head"][HEAD], sum(x.head[HEAD] for x in u) / 4)


def test_sample_weighting_within_each_module():
    s = LayerMean(weighting="samples")
    state = s.init_state(make_initial(), subset_clients())
    u = subset_uploads()
    new = s.aggregate(state, u, 0).state
    # Block 0: counts 10, 30, 40 -> 0.125, 0.375, 0.5. Block 1: counts 20, 30 -> 0.4, 0.6.
    for which in ("A", "B"):
        f = lambda k, m: getattr(u[k].factors[m], which)  # noqa: E731
        torch.testing.assert_close(new[which][M0], 0.125 * f(0, M0) + 0.375 * f(2, M0) + 0.5 * f(3, M0))
        torch.testing.assert_close(new[which][M1], 0.4 * f(1, M1) + 0.6 * f(2, M1))
    torch.testing.assert_close(new["head"][HEAD], sum(p * x.head[HEAD] for p, x in zip(P, u)))


def test_uncovered_module_keeps_previous_value():
    # docs/algorithms.md#layermean: a layer nobody trained keeps its previous value.
    s = LayerMean()
    initial = make_initial()
    state = s.init_state(initial, subset_clients())
    u = [x for x in subset_uploads() if x.client in ("c0", "c3")]  # block 0 only
    new = s.aggregate(state, u, 0).state
    assert torch.equal(new["A"][M1], initial[M1].A) and torch.equal(new["B"][M1], initial[M1].B)
    torch.testing.assert_close(new["A"][M0], (u[0].factors[M0].A + u[1].factors[M0].A) / 2)
    # And again one round later, from the aggregated state.
    newer = s.aggregate(new, [x for x in subset_uploads(2) if x.client == "c1"], 1).state
    assert torch.equal(newer["A"][M0], new["A"][M0]) and torch.equal(newer["B"][M0], new["B"][M0])


def test_download_respects_blocks_rank_and_head():
    s = LayerMean()
    state = s.init_state(make_initial(), subset_clients())
    state = s.aggregate(state, subset_uploads(), 0).state
    only1 = s.download(state, ClientInfo("c1", R, ALPHA, frozenset({1})), 1)
    assert set(only1.A) == set(only1.B) == {M1}
    everything = s.download(state, ClientInfo("z", R, ALPHA, None), 1)
    assert set(everything.A) == set(everything.B) == set(MODULES)
    none = s.download(state, ClientInfo("y", R, ALPHA, frozenset({5})), 1)
    assert none.A == {} and none.B == {}
    for dl in (only1, everything):
        assert dl.rank == R and dl.alpha == ALPHA and dl.trainable == "both" and dl.fresh is False
        for m in dl.A:
            assert dl.A[m].shape == (R, D_IN) and dl.B[m].shape == (D_OUT, R)
            assert torch.equal(dl.A[m], state["A"][m]) and torch.equal(dl.B[m], state["B"][m])
        assert torch.equal(dl.head[HEAD], state["head"][HEAD])


def test_refuses_unknown_weighting():
    with pytest.raises(StrategyError, match="weighting"):
        LayerMean(weighting="fisher")
