"""FedIT: FedAvg of A and of B separately, weighted by sample counts."""

from __future__ import annotations

import io
import json

import pytest
import torch

from server.strategies import get_strategy
from server.strategies.base import ClientInfo, Factors, StrategyError, Upload
from server.strategies.fedit import FedIT

D_IN, D_OUT, R, ALPHA = 12, 10, 4, 8.0
MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj")
COUNTS = (10, 20, 30, 40)  # p = 0.1, 0.2, 0.3, 0.4
P = (0.1, 0.2, 0.3, 0.4)
HEAD = "score.weight"


def rand(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def make_initial(seed=0, rank=R):
    gen = torch.Generator().manual_seed(seed)
    return {m: Factors(rand(gen, rank, D_IN), rand(gen, D_OUT, rank), ALPHA) for m in MODULES}


def make_clients(ranks=(R,) * len(COUNTS)):
    return [ClientInfo(f"c{k}", r, ALPHA, None, n) for k, (r, n) in enumerate(zip(ranks, COUNTS))]


def make_uploads(seed=1, rank=R):
    gen = torch.Generator().manual_seed(seed)
    return [Upload(f"c{k}", {m: Factors(rand(gen, rank, D_IN), rand(gen, D_OUT, rank), ALPHA) for m in MODULES},
                   n, rank, None, {HEAD: rand(gen, 3, D_OUT)})
            for k, n in enumerate(COUNTS)]


def tree(x):
    """A plain nested copy of an input (tensors cloned) to compare against later."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, Factors):
        return {"A": tree(x.A), "B": tree(x.B), "alpha": x.alpha}
    if isinstance(x, Upload):
        return {"client": x.client, "factors": tree(x.factors), "n": x.num_samples, "rank": x.rank,
                "layers": x.layers, "extra": tree(x.extra)}
    if isinstance(x, dict):
        return {k: tree(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [tree(v) for v in x]
    return x


def assert_tree_equal(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b)
        for k in a:
            assert_tree_equal(a[k], b[k])
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_tree_equal(x, y)
    else:
        assert a == b


def assert_checkpointable(state):
    """Only tensors, dicts (string keys) of them, and JSON-plain values; survives torch.save/load."""
    def walk(v):
        if isinstance(v, torch.Tensor):
            return
        if isinstance(v, dict):
            for k, x in v.items():
                assert isinstance(k, str)
                walk(x)
            return
        json.dumps(v)  # TypeError for anything not JSON-plain

    assert isinstance(state, dict)
    walk(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    assert_tree_equal(tree(torch.load(buf, weights_only=True)), tree(state))


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
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    resumed = torch.load(buf, weights_only=True)
    a = s.aggregate(state, make_uploads(2), 1).state
    b = s.aggregate(resumed, make_uploads(2), 1).state
    assert_tree_equal(tree(a), tree(b))


def test_inputs_are_not_mutated_or_aliased():
    s = FedIT()
    initial, clients = make_initial(), make_clients()
    before_initial = tree(initial)
    state = s.init_state(initial, clients)
    ups = make_uploads()
    before = tree((state, ups))
    new = s.aggregate(state, ups, 0).state
    s.download(new, clients[0], 1)
    assert_tree_equal(tree((state, ups)), before)
    # In-place changes to returned state must not reach the caller's tensors.
    state["A"][MODULES[0]].add_(1.0)
    new["B"][MODULES[1]].add_(1.0)
    new["extra"][HEAD].add_(1.0)
    assert_tree_equal(tree(initial), before_initial)
    assert_tree_equal(tree(ups), before[1])


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
