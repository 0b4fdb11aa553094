"""The round coordinator with a stand-in server: sampling, deadlines, short
rounds, client initialisation and frozen-weight updates."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from round_helpers import CLIENT_MODULE, LAYOUT, SERVER_MODULE, FakeServer, coordinator, upload
from server.rounds import Coordinator, FederationConfig, FederationError, initial_factors, svd_factors
from server.strategies.base import ClientInfo
from split.lora import get_factors, init_lora
from split.protocol import UploadPayload


def test_round_runs_once_enough_clients_joined_and_aggregates_both_sides():
    coord, server = coordinator(2)
    assert coord.phase == "waiting"
    coord.tick(0.0)
    assert coord.phase == "running" and coord.selected == ["c0", "c1"]
    offer = coord.poll("c0")
    assert (offer.status, offer.round) == ("train", 0)
    assert set(offer.A) == {CLIENT_MODULE}  # the server-side part went to the server
    assert SERVER_MODULE in {m for m in coord.shapes}
    coord.poll("c1")
    upload(coord, "c0", 1.0)
    upload(coord, "c1", 4.0)
    coord.tick(1.0)
    assert coord.round == 1 and coord.history[0].aggregated
    # FedIT with p = (1/3, 2/3): A_client = 1/3 * 1 + 2/3 * 4 = 3
    offer = coord.poll("c0")
    assert torch.allclose(offer.A[CLIENT_MODULE], torch.full((4, 5), 3.0))
    assert torch.allclose(offer.head["classifier.weight"], torch.full((3, 6), 3.0))
    assert torch.allclose(server.adapters["c0"][0], coord.global_model().A[SERVER_MODULE])


def test_fraction_samples_deterministically():
    a, _ = coordinator(4, fraction=0.5, seed=7)
    b, _ = coordinator(4, fraction=0.5, seed=7)
    a.tick(0.0)
    b.tick(0.0)
    assert len(a.selected) == 2 and a.selected == b.selected
    waiting = next(c for c in a.members if c not in a.selected)
    assert a.poll(waiting).status == "wait"


def test_a_client_missing_the_deadline_is_left_out():
    coord, _ = coordinator(3, deadline=10.0)
    coord.tick(0.0)
    for c in ("c0", "c1", "c2"):
        coord.poll(c)
    upload(coord, "c0")
    upload(coord, "c1")
    coord.tick(5.0)
    assert coord.round == 0  # still waiting for c2
    coord.tick(11.0)
    assert coord.round == 1 and coord.history[0].uploaded == ["c0", "c1"]
    with pytest.raises(FederationError, match="round 0 is closed"):
        coord.upload("c2", UploadPayload(0, 30, 4))


@pytest.mark.parametrize("policy, retried", [("skip", False), ("retry", True)])
def test_short_rounds_are_skipped_or_retried(policy, retried):
    coord, _ = coordinator(2, min_uploads=2, deadline=1.0, short_round=policy)
    coord.tick(0.0)
    coord.poll("c0")
    upload(coord, "c0")
    closed = coord.tick(2.0)
    assert not coord.history[0].aggregated
    assert ("retried" in coord.history[0].note) == retried
    assert coord.round == (0 if retried else 1)
    # A skipped round closed (and is checkpointed); a retried one has not.
    assert (closed is None) == retried


@pytest.mark.parametrize("init, fresh, keeps_own", [("avg", False, False), ("re", True, True), ("local", False, True)])
def test_client_initialisation_modes(init, fresh, keeps_own):
    coord, server = coordinator(2, client_init=init)
    coord.tick(0.0)
    first = coord.poll("c0")
    assert set(first.A) == {CLIENT_MODULE} and first.fresh_seed is None  # round 0 starts from the global LoRA
    coord.poll("c1")
    upload(coord, "c0")
    upload(coord, "c1")
    coord.tick(1.0)
    second = coord.poll("c0")
    assert (second.fresh_seed is not None) == fresh
    assert (second.A == {}) == keeps_own
    # The server-side adapter is re-drawn too, from the very seed the client gets.
    assert server.loads[-2][2] == second.fresh_seed


def test_frozen_weight_updates_reach_each_client_once():
    coord, server = coordinator(2, strategy="fedex")
    coord.tick(0.0)
    coord.poll("c0")
    coord.poll("c1")
    upload(coord, "c0", 1.0)
    upload(coord, "c1", 3.0)
    coord.tick(1.0)
    assert SERVER_MODULE in server.folded
    assert set(coord.poll("c0").deltas) == {CLIENT_MODULE}
    assert set(coord.merged) == {CLIENT_MODULE, SERVER_MODULE}
    again = coord.poll("c0")
    assert again.status == "wait" and again.deltas == {}


def test_unknown_or_unselected_clients_are_refused():
    coord, _ = coordinator(2)
    with pytest.raises(FederationError, match="has not joined"):
        coord.poll("nobody")
    coord.tick(0.0)
    with pytest.raises(FederationError, match="was not selected"):
        coord.upload("c0", UploadPayload(0, 1, 4))


def test_initial_factors_match_the_client_side_draw():
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(5, 6)), LoraConfig(r=4, target_modules=["0"]))
    init_lora(model, "default", 3)
    a, b = get_factors(model)["0"]
    f = initial_factors({"0": (6, 5)}, 4, 8.0, 3)["0"]
    assert torch.equal(f.A, a) and torch.equal(f.B, b)


def test_config_errors():
    with pytest.raises(ValueError, match="fraction"):
        FederationConfig(fraction=0.0)
    with pytest.raises(ValueError, match="client_init"):
        FederationConfig(client_init="warm")


def test_svd_initialisation_keeps_the_pretrained_function():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, generator=gen)
    f = svd_factors({"m": w}, 2, 8.0)["m"]
    U, S, Vh = torch.linalg.svd(w)
    best = U[:, :2] @ torch.diag(S[:2]) @ Vh[:2]
    assert torch.allclose(f.delta(), best, atol=1e-5)  # the principal part moves into the adapter

    class WeightServer(FakeServer):
        def base_weight(self, module):
            return torch.full((6, 5), 0.5) + torch.arange(30.0).reshape(6, 5) / 30

    server = WeightServer()
    coord = Coordinator(FederationConfig(min_clients=1, init="svd"), server, LAYOUT)
    coord.join("c0", ClientInfo("c0", 4, 8.0, None, 10), {CLIENT_MODULE: (6, 5)})
    coord.tick(0.0)
    glob = coord.global_model()
    for m in (CLIENT_MODULE, SERVER_MODULE):
        # frozen weight + what was folded into it + the adapter's update == pretrained weight
        update = glob.alpha / glob.rank * glob.B[m] @ glob.A[m]
        assert torch.allclose(coord.merged[m] + update, torch.zeros(6, 5), atol=1e-5)
    assert torch.allclose(server.folded[SERVER_MODULE], coord.merged[SERVER_MODULE])
    assert set(coord.poll("c0").deltas) == {CLIENT_MODULE}


def test_gaussian_initialisation_draws_normal_a():
    f = initial_factors({"m": (6, 500)}, 4, 8.0, 0, "gaussian")["m"]
    assert abs(f.A.std().item() - 0.25) < 0.02 and torch.count_nonzero(f.B) == 0


def test_fedloru_merges_and_restarts_every_tau_rounds():
    coord, server = coordinator(2, reinit_every=1, rounds=3)
    coord.tick(0.0)
    coord.poll("c0")
    coord.poll("c1")
    upload(coord, "c0", 1.0)
    upload(coord, "c1", 4.0)
    coord.tick(1.0)
    assert "FedLoRU" in coord.history[0].note
    glob = coord.global_model()
    assert all(torch.count_nonzero(b) == 0 for b in glob.B.values())  # a fresh LoRA
    # B = 3 everywhere before the merge, A = 3 (client side): s B A = 2 * 3 * 3 * 4 = 72 per entry
    assert torch.allclose(coord.merged[CLIENT_MODULE], torch.full((6, 5), 72.0))
    assert SERVER_MODULE in server.folded


@pytest.mark.parametrize("strategy", ["flora", "flexlora", "fedinc"])
def test_the_run_seed_reaches_the_strategy(strategy):
    for seed in (0, 7):
        coord, _ = coordinator(2, strategy=strategy, seed=seed)
        assert coord.strategy.seed == seed


def test_the_run_seed_changes_what_a_seeded_method_draws():
    # FLoRA hands every client a fresh A drawn from the strategy's seed: with
    # the run's seed ignored, --seed 1 and --seed 2 would draw the same A.
    def fresh_a(seed):
        coord, _ = coordinator(2, strategy="flora", seed=seed)
        coord.tick(0.0)
        return coord.poll("c0").A[CLIENT_MODULE]

    assert torch.equal(fresh_a(1), fresh_a(1))
    assert not torch.equal(fresh_a(1), fresh_a(2))


def test_a_seed_among_the_strategy_options_is_refused():
    with pytest.raises(ValueError, match="--seed"):
        FederationConfig(strategy="flora", strategy_options={"seed": 3})


def test_a_fresh_lora_is_one_draw_per_round_for_every_client():
    coord, server = coordinator(2, client_init="re", rounds=3)
    coord.tick(0.0)
    for c in ("c0", "c1"):
        coord.poll(c)
        upload(coord, c)
    coord.tick(1.0)
    seeds = {c: coord.poll(c).fresh_seed for c in ("c0", "c1")}
    assert seeds["c0"] == seeds["c1"] is not None
    assert {load[2] for load in server.loads[-2:]} == {seeds["c0"]}  # the server-side halves draw the same
    for c in ("c0", "c1"):
        upload(coord, c)
    coord.tick(2.0)
    assert coord.poll("c0").fresh_seed not in (None, seeds["c0"])  # a new draw in the next round


def test_clients_with_other_classes_are_refused_and_the_classes_survive_a_restart():
    coord, _ = coordinator(n=3, labels=None)
    names = ("cat", "dog", "eel")
    coord.join("a", ClientInfo("a", 4, 8.0, None, 10), {CLIENT_MODULE: (6, 5)}, labels=names)
    coord.join("b", ClientInfo("b", 4, 8.0, None, 10), {CLIENT_MODULE: (6, 5)}, labels=names)
    # Same classes in another order: row 0 of the head would mean "dog" here.
    with pytest.raises(FederationError, match=r"client 'x' has classes \[dog, cat, eel\].*\[cat, dog, eel\]"):
        coord.join("x", ClientInfo("x", 4, 8.0, None, 10), {CLIENT_MODULE: (6, 5)}, labels=("dog", "cat", "eel"))
    with pytest.raises(FederationError, match="same set of labels"):
        coord.join("y", ClientInfo("y", 4, 8.0, None, 10), {CLIENT_MODULE: (6, 5)}, labels=("cat", "dog"))
    restarted, _ = coordinator(n=3, labels=None)
    restarted.restore(coord.snapshot())
    assert restarted.labels == names
