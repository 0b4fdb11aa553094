"""FFA-LoRA: A frozen and shared, B averaged with sample weights."""

from __future__ import annotations

import pytest
import torch

from server.strategies import get_strategy
from server.strategies.base import ClientInfo, Factors, StrategyError, Upload
from server.strategies.ffa import FFALoRA

from strategy_helpers import (ALPHA, COUNTS, D_IN, D_OUT, HEAD, MODULES, P, R, assert_checkpointable,
                              assert_same, gen, make_clients, make_initial, make_uploads, rand, reloaded,
                              snapshot)


def frozen_uploads(state, seed=1, counts=COUNTS):
    """Uploads as FFA-LoRA clients send them: the shared A untouched, a trained B."""
    g = gen(seed)
    return [Upload(f"c{k}", {m: Factors(state["A"][m].clone(), rand(g, D_OUT, R), ALPHA) for m in MODULES},
                   n, R, None, {HEAD: rand(g, 3, D_OUT)})
            for k, n in enumerate(counts)]


def test_registry_builds_ffa():
    assert isinstance(get_strategy("ffa"), FFALoRA)


def test_frozen_a_makes_averaging_exact():
    # Section 14.3: mean(B_k) A == mean(B_k A), so s * B_new A equals the ideal sum p_k s B_k A.
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
    torch.testing.assert_close(new["extra"][HEAD], sum(p * u.extra[HEAD] for p, u in zip(P, ups)))


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
    assert torch.equal(dl.extra[HEAD], state["extra"][HEAD])
    dl.A[MODULES[0]].add_(1.0)  # a copy: the client's in-place load cannot change the shared A
    assert torch.equal(state["A"][MODULES[0]], initial[MODULES[0]].A)


def test_without_resend_a_goes_only_to_clients_that_lack_it():
    # Section 14.9: FFA-LoRA downloads r * d_out per module once clients hold A.
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


def test_download_refuses_other_rank_and_layer_subsets():
    s = FFALoRA()
    state = s.init_state(make_initial(), make_clients())
    with pytest.raises(StrategyError, match="rank 3"):
        s.download(state, ClientInfo("x", 3, ALPHA), 0)
    with pytest.raises(StrategyError, match="layermean"):
        s.download(state, ClientInfo("x", R, ALPHA, frozenset({1})), 0)


def test_init_refuses_mixed_ranks_naming_methods_that_can():
    with pytest.raises(StrategyError) as err:
        FFALoRA().init_state(make_initial(), make_clients(ranks=(4, 3, 4, 4)))
    assert "hetlora" in str(err.value) and "flexlora" in str(err.value)


def test_state_is_checkpointable():
    s = FFALoRA(resend_frozen=False)
    state = s.init_state(make_initial(), make_clients())
    assert_checkpointable(state)
    state = s.aggregate(state, frozen_uploads(state), 0).state
    assert_checkpointable(state)
    resumed = reloaded(state)
    # Download decisions survive a checkpoint too.
    assert s.download(resumed, make_clients()[0], 1).A == {}


def test_inputs_are_not_mutated_or_aliased():
    s = FFALoRA()
    initial, clients = make_initial(), make_clients()
    before_initial = snapshot(initial)
    state = s.init_state(initial, clients)
    ups = frozen_uploads(state)
    before = snapshot((state, ups))
    new = s.aggregate(state, ups, 0).state
    s.download(new, clients[0], 1)
    assert_same(snapshot((state, ups)), before)
    new["A"][MODULES[0]].add_(1.0)
    new["B"][MODULES[0]].add_(1.0)
    assert_same(snapshot(initial), before_initial)
    assert_same(snapshot((state, ups)), before)


def test_frozen_a_in_upload_may_be_any_shape():
    s = FFALoRA()
    state = s.init_state(make_initial(), make_clients())
    ups = frozen_uploads(state)
    ups[0].factors[MODULES[0]] = Factors(torch.empty(R, 0), ups[0].factors[MODULES[0]].B, ALPHA)
    s.aggregate(state, ups, 0)  # does not raise: A is not read


@pytest.mark.parametrize("bad, message", [
    (lambda ups: ups[1].__setattr__("rank", 3), "rank 3"),
    (lambda ups: ups[0].factors.__setitem__("model.layers.5.self_attn.q_proj", ups[0].factors[MODULES[0]]),
     "unknown module"),
    (lambda ups: ups[2].factors.pop(MODULES[0]), "lacks"),
    (lambda ups: ups[3].factors.__setitem__(MODULES[1], Factors(torch.zeros(R, D_IN), torch.zeros(D_OUT, R + 1),
                                                                ALPHA)), r"B of .* shape"),
    (lambda ups: ups.clear(), "no uploads"),
])
def test_aggregate_refuses_uploads_that_do_not_fit(bad, message):
    s = FFALoRA()
    state = s.init_state(make_initial(), make_clients())
    ups = frozen_uploads(state)
    bad(ups)
    with pytest.raises(StrategyError, match=message):
        s.aggregate(state, ups, 0)
