"""RoLoRA: B trains in even rounds, A in odd rounds; only the trained factor is averaged."""

from __future__ import annotations

import io
import json

import pytest
import torch

from server.strategies import get_strategy
from server.strategies.base import ClientInfo, Factors, StrategyError, Upload
from server.strategies.rolora import RoLoRA

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


def test_registry_builds_rolora():
    assert isinstance(get_strategy("rolora"), RoLoRA)


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
        # Section 14.3: with A frozen, the product of means is the mean of products.
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
    assert torch.equal(dl.extra[HEAD], state["extra"][HEAD])
    dl.B[MODULES[0]].add_(1.0)
    assert not torch.equal(dl.B[MODULES[0]], state["B"][MODULES[0]])


def test_without_resend_downloads_alternate_one_factor():
    # Section 14.9: once clients hold the frozen factor, each download carries only the
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


def test_download_refuses_other_rank_and_layer_subsets():
    s = RoLoRA()
    state = s.init_state(make_initial(), make_clients())
    with pytest.raises(StrategyError, match="rank 3"):
        s.download(state, ClientInfo("x", 3, ALPHA), 1)
    with pytest.raises(StrategyError, match="layermean"):
        s.download(state, ClientInfo("x", R, ALPHA, frozenset({0})), 1)


def test_init_refuses_mixed_ranks_naming_methods_that_can():
    with pytest.raises(StrategyError) as err:
        RoLoRA().init_state(make_initial(), make_clients(ranks=(4, 4, 4, 3)))
    assert "rbla" in str(err.value) and "hetlora" in str(err.value)


def test_state_is_checkpointable():
    s = RoLoRA(resend_frozen=False)
    state = s.init_state(make_initial(), make_clients())
    assert_checkpointable(state)
    for t in range(2):
        state = s.aggregate(state, make_uploads(t), t).state
        assert_checkpointable(state)


def test_inputs_are_not_mutated_or_aliased():
    s = RoLoRA()
    initial, clients = make_initial(), make_clients()
    before_initial = tree(initial)
    state = s.init_state(initial, clients)
    ups = make_uploads()
    before = tree((state, ups))
    mid = s.aggregate(state, ups, 0).state
    new = s.aggregate(mid, ups, 1).state
    s.download(new, clients[0], 2)
    assert_tree_equal(tree((state, ups)), before)
    new["A"][MODULES[0]].add_(1.0)
    mid["A"][MODULES[1]].add_(1.0)
    assert_tree_equal(tree(initial), before_initial)
    assert_tree_equal(tree((state, ups)), before)


@pytest.mark.parametrize("round_index, factor", [(0, "B"), (1, "A")])
def test_only_the_trained_factor_shape_is_checked(round_index, factor):
    s = RoLoRA()
    state = s.init_state(make_initial(), make_clients())
    ups = make_uploads()
    f = ups[2].factors[MODULES[0]]
    bad_a = Factors(torch.zeros(R, D_IN + 2), f.B, ALPHA)
    bad_b = Factors(f.A, torch.zeros(D_OUT + 2, R), ALPHA)
    # A broken frozen factor is ignored ...
    ups[2].factors[MODULES[0]] = bad_b if factor == "A" else bad_a
    s.aggregate(state, ups, round_index)
    # ... a broken trained factor is refused, naming the factor.
    ups[2].factors[MODULES[0]] = bad_a if factor == "A" else bad_b
    with pytest.raises(StrategyError, match=f"{factor} of {MODULES[0]} has shape"):
        s.aggregate(state, ups, round_index)


@pytest.mark.parametrize("bad, message", [
    (lambda ups: ups[1].__setattr__("rank", 3), "rank 3"),
    (lambda ups: ups[0].factors.__setitem__("model.layers.9.mlp.up_proj", ups[0].factors[MODULES[0]]),
     "unknown module"),
    (lambda ups: ups[2].factors.pop(MODULES[0]), "lacks"),
    (lambda ups: ups.clear(), "no uploads"),
])
def test_aggregate_refuses_uploads_that_do_not_fit(bad, message):
    s = RoLoRA()
    state = s.init_state(make_initial(), make_clients())
    ups = make_uploads()
    bad(ups)
    with pytest.raises(StrategyError, match=message):
        s.aggregate(state, ups, 1)
