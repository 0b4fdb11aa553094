"""What the federation admits (server/admission.py through the coordinator).

Each path below once let one client's join or upload reach a strategy that
then failed inside ``tick`` (ending the server and losing the round) or
poisoned the global model. Now the join or the upload is refused with the
reason, and the round completes for the honest clients."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_config
from round_helpers import CLIENT_MODULE, HEAD, SERVER_MODULE, coordinator, payload, upload
from server.admission import MAX_VALUE, model_layout
from server.checkpoint import write_round
from server.rounds import FederationError
from server.strategies.base import ClientInfo, GlobalModel
from split.families import family_for


def start(coord):
    """Start round 0 and hand every selected client its download."""
    coord.tick(0.0)
    for c in coord.selected:
        coord.poll(c)


def assert_round_completes_for(coord, honest, value=1.0):
    """The honest clients upload; the round closes aggregated at once, over them alone."""
    for c in honest:
        upload(coord, c, value)
    closed = coord.tick(1.0)  # long before the deadline: a refused client is not waited for
    assert closed is not None and closed.aggregated and closed.uploaded == sorted(honest)
    glob = coord.global_model()
    for tensors in (glob.A, glob.B, glob.head):
        assert all(bool(torch.isfinite(t).all()) for t in tensors.values())
    return closed


def refuse_upload(coord, client, match, **changes):
    with pytest.raises(FederationError, match=match):
        coord.upload(client, payload(coord, client, **changes))


# ---------------------------------------------------------------- finding 4: eight ways to end the server


def test_a_wrong_b_shape_is_refused_at_upload():
    coord, _ = coordinator(3)
    start(coord)
    refuse_upload(coord, "c2", r"B \(6, 3\).*must be \(4, 5\) and \(6, 4\)", B={CLIENT_MODULE: torch.ones(6, 3)})
    closed = assert_round_completes_for(coord, ["c0", "c1"])
    assert "c2 refused" in closed.note


@pytest.mark.parametrize("shape", [(4, 6), (3, 7), (3, 6, 1)])
def test_a_wrong_head_shape_is_refused_at_upload(shape):
    coord, _ = coordinator(3)  # the clients named 3 classes at join
    start(coord)
    refuse_upload(coord, "c2", r"head tensor classifier.weight has shape .*, the model's is \(3, 6\) \(3 classes",
                  head={HEAD: torch.ones(shape)})
    assert_round_completes_for(coord, ["c0", "c1"])


def test_without_named_labels_the_first_head_taken_fixes_the_classes():
    coord, _ = coordinator(3, labels=None)
    start(coord)
    upload(coord, "c0")  # (3, 6): 3 classes from now on
    assert coord.classes == 3
    refuse_upload(coord, "c2", r"shape \(4, 6\), the model's is \(3, 6\)", head={HEAD: torch.ones(4, 6)})
    upload(coord, "c1")
    closed = coord.tick(1.0)
    assert closed.aggregated and closed.uploaded == ["c0", "c1"]
    with pytest.raises(FederationError, match="has 4 classes, the federation's head has 3"):
        coord.join("x", ClientInfo("x", 4, 8.0, None, 10), {CLIENT_MODULE: (6, 5)}, labels=("a", "b", "c", "d"))


def test_an_unknown_module_is_refused_at_upload():
    coord, _ = coordinator(3)
    start(coord)
    stray = "model.layers.0.self_attn.k_proj"
    refuse_upload(coord, "c2", "not among the client-side modules declared at join",
                  A={CLIENT_MODULE: torch.ones(4, 5), stray: torch.ones(4, 5)},
                  B={CLIENT_MODULE: torch.ones(6, 4), stray: torch.ones(6, 4)})
    assert_round_completes_for(coord, ["c0", "c1"])


@pytest.mark.parametrize("rank, tensors_rank", [(2, 4), (2, 2)])
def test_an_upload_rank_other_than_the_joined_one_is_refused(rank, tensors_rank):
    # (2, 4): the meta says rank 2 over rank-4 factors; (2, 2): consistent, but FedIT runs one rank.
    coord, _ = coordinator(3)
    start(coord)
    refuse_upload(coord, "c2", "rank 2", rank=rank, A={CLIENT_MODULE: torch.ones(tensors_rank, 5)},
                  B={CLIENT_MODULE: torch.ones(6, tensors_rank)})
    assert_round_completes_for(coord, ["c0", "c1"])
    assert coord.members["c2"].info.rank == 4  # the refused upload changed nothing


@pytest.mark.parametrize("count", [-5, 0])
def test_a_sample_count_below_one_is_refused_at_upload(count):
    coord, _ = coordinator(3)
    start(coord)
    refuse_upload(coord, "c2", f"claims {count} samples", num_samples=count)
    assert_round_completes_for(coord, ["c0", "c1"])


def test_nan_under_flexlora_is_refused_before_the_svd():
    coord, _ = coordinator(3, strategy="flexlora")
    start(coord)
    bad = torch.ones(4, 5)
    bad[1, 2] = math.nan
    refuse_upload(coord, "c2", "LoRA factor A of .* holds 1 NaN value", A={CLIENT_MODULE: bad})
    assert_round_completes_for(coord, ["c0", "c1"])


@pytest.mark.parametrize("shape, match", [
    ((-6, 5), r"shape \(d_out, d_in\) = \(-6, 5\) in the join, the model's is \(6, 5\)"),
    ((7, 5), r"shape \(d_out, d_in\) = \(7, 5\)"),
])
def test_a_wrong_module_dimension_is_refused_at_join(shape, match):
    coord, _ = coordinator(2)
    with pytest.raises(FederationError, match=match):
        coord.join("bad", ClientInfo("bad", 4, 8.0, None, 10), {CLIENT_MODULE: shape})
    assert "bad" not in coord.members
    start(coord)
    assert_round_completes_for(coord, ["c0", "c1"])


def test_a_second_rank_is_refused_at_join_before_round_0_under_fedit():
    coord, _ = coordinator(2, rank=8, min_clients=3)
    # Mixed ranks used to be checked only once rounds ran: round 0 then failed to start.
    with pytest.raises(FederationError, match=r"fedit needs one LoRA rank.*ranks \[4, 8\].*flexlora"):
        coord.join("benign", ClientInfo("benign", 4, 8.0, None, 10), {CLIENT_MODULE: (6, 5)})
    coord.join("c2", ClientInfo("c2", 8, 8.0, None, 30), {CLIENT_MODULE: (6, 5)})
    start(coord)
    assert coord.selected == ["c0", "c1", "c2"]
    assert_round_completes_for(coord, ["c0", "c1", "c2"])


# ---------------------------------------------------------------- more joins a round could not take


@pytest.mark.parametrize("info, modules, match", [
    (ClientInfo("x", 4, 16.0, None, 10), {CLIENT_MODULE: (6, 5)}, "one LoRA alpha.*--alpha 8"),
    (ClientInfo("x", 4, 8.0, frozenset({0}), 10), {CLIENT_MODULE: (6, 5)}, "every client must train every block"),
    (ClientInfo("x", 4, 8.0, None, 10), {"model.layers.0.mlp.up_proj": (6, 5)}, "not linear modules"),
    (ClientInfo("x", 4, 8.0, None, 10), {SERVER_MODULE: (6, 5)}, "on the server's side of this client's cut"),
    (ClientInfo("x", 4, 8.0, None, 10), {}, "covers other modules than the federation's"),
])
def test_joins_the_strategy_could_not_combine_are_refused(info, modules, match):
    coord, _ = coordinator(2)
    with pytest.raises(FederationError, match=match):
        coord.join("x", info, modules)
    start(coord)
    assert_round_completes_for(coord, ["c0", "c1"])


def test_a_late_joiner_above_the_largest_rank_is_refused():
    coord, _ = coordinator(2, strategy="hetlora")
    start(coord)
    with pytest.raises(FederationError, match="above this run's largest rank 4"):
        coord.join("late", ClientInfo("late", 8, 8.0, None, 10), {CLIENT_MODULE: (6, 5)})
    coord.join("late", ClientInfo("late", 2, 8.0, None, 10), {CLIENT_MODULE: (6, 5)})  # a lower rank is fine
    assert_round_completes_for(coord, ["c0", "c1"])


# ---------------------------------------------------------------- the last line of defence


@pytest.mark.parametrize("policy", ["skip", "retry"])
def test_a_failing_aggregation_neither_raises_nor_loses_the_round_silently(policy, monkeypatch):
    coord, _ = coordinator(2, short_round=policy)
    start(coord)

    def broken(*args):
        raise RuntimeError("linalg.svd: the algorithm failed to converge")

    monkeypatch.setattr(coord.strategy, "aggregate", broken)
    upload(coord, "c0")
    upload(coord, "c1")
    closed = coord.tick(1.0)
    entry = coord.history[-1]
    assert not entry.aggregated and "aggregation failed (RuntimeError: linalg.svd" in entry.note
    if policy == "retry":
        assert closed is None and entry.note.endswith("retried") and coord.round == 0
        assert coord.phase == "running"  # the round runs again
    else:
        assert closed is entry and "skipped" in entry.note and coord.round == 1


# ---------------------------------------------------------------- finding 5: poisoning


@pytest.mark.parametrize("value, match", [
    (math.nan, "NaN"), (math.inf, "infinite"), (-math.inf, "infinite"), (1e30, "magnitude 1e\\+30"),
])
@pytest.mark.parametrize("where", ["A", "B", "head"])
def test_non_finite_or_huge_values_are_refused(where, value, match):
    coord, _ = coordinator(3)
    start(coord)
    honest = payload(coord, "c2")
    tensors = {k: v.clone() for k, v in getattr(honest, where).items()}
    next(iter(tensors.values()))[0, 0] = value
    refuse_upload(coord, "c2", match, **{where: tensors})
    closed = assert_round_completes_for(coord, ["c0", "c1"])
    glob = coord.global_model()
    assert glob.A[CLIENT_MODULE].abs().max() <= 1.0 and glob.head[HEAD].abs().max() <= 1.0
    assert closed.uploaded == ["c0", "c1"]


def test_the_value_bound_is_a_setting_and_never_a_clamp():
    coord, _ = coordinator(2)
    start(coord)
    assert MAX_VALUE == 1e3
    refuse_upload(coord, "c1", "above this server's bound of 1000", value=2e3)
    relaxed, _ = coordinator(2, max_upload_value=1e4)
    start(relaxed)
    upload(relaxed, "c0", 2e3)
    upload(relaxed, "c1", 2e3)
    relaxed.tick(1.0)
    assert torch.equal(relaxed.global_model().A[CLIENT_MODULE], torch.full((4, 5), 2e3))  # taken as sent


def test_a_non_finite_server_side_half_is_refused():
    coord, server = coordinator(3)
    start(coord)
    good = server.collect
    server.collect = lambda c: {m: (a * math.nan, b) for m, (a, b) in good(c).items()} if c == "c2" else good(c)
    with pytest.raises(FederationError, match="server-side LoRA factor A of .*NaN"):
        upload(coord, "c2")
    server.collect = good
    assert_round_completes_for(coord, ["c0", "c1"])
    assert torch.isfinite(coord.global_model().A[SERVER_MODULE]).all()


def test_sample_counts_are_capped_at_join_and_by_the_join_at_upload():
    coord, _ = coordinator(2, min_clients=3, max_samples=1000)
    with pytest.raises(FederationError, match=r"declares 1000000000000000000 training samples.*1 to 1000"):
        coord.join("greedy", ClientInfo("greedy", 4, 8.0, None, 10**18), {CLIENT_MODULE: (6, 5)})
    coord.join("c2", ClientInfo("c2", 4, 8.0, None, 30), {CLIENT_MODULE: (6, 5)})
    start(coord)
    # One client claiming 1e18 samples would make its B the global B.
    refuse_upload(coord, "c2", "claims 1000000000000000000 samples; this client declared 30", num_samples=10**18)
    refuse_upload(coord, "c1", "claims 21 samples; this client declared 20", num_samples=21)
    assert_round_completes_for(coord, ["c0"])


def test_the_default_sample_cap():
    coord, _ = coordinator(2)
    assert coord.config.max_samples == 1_000_000
    with pytest.raises(FederationError, match="1 to 1000000 per client"):
        coord.join("x", ClientInfo("x", 4, 8.0, None, 1_000_001), {CLIENT_MODULE: (6, 5)})


def test_a_head_tensor_named_like_a_base_weight_is_refused():
    # As a module to save it would overwrite the base layer once the adapter is loaded.
    coord, _ = coordinator(3)
    start(coord)
    refuse_upload(coord, "c2", r"not the model's trained head; its tensors: classifier.weight",
                  head={HEAD: torch.ones(3, 6), f"{CLIENT_MODULE}.weight": torch.zeros(6, 5)})
    assert_round_completes_for(coord, ["c0", "c1"])
    assert set(coord.global_model().head) == {HEAD}


def test_a_checkpoint_refuses_a_head_outside_the_trained_one(tiny_models, tmp_path):
    path = tiny_models("bert")
    family = family_for(tiny_config("bert"))
    base = "bert.encoder.layer.0.attention.self.query"
    glob = GlobalModel({base: torch.zeros(2, 32)}, {base: torch.zeros(32, 2)}, 2, 4.0,
                       {"classifier.weight": torch.zeros(3, 32), f"{base}.weight": torch.zeros(32, 32)})
    with pytest.raises(ValueError, match=r"not part of the model's trained head \(classifier\)"):
        write_round(tmp_path, 0, glob, family, "classification", str(path), {}, {"round": 1})
    assert not (tmp_path / "round_0").exists()


# ---------------------------------------------------------------- the layout is the model's


# None: the dimension that is the number of classes, which the clients' data sets, not the server's --num-labels.
@pytest.mark.parametrize("family_name, module, shape, heads", [
    ("bert", "bert.encoder.layer.2.attention.self.value", (32, 32),
     {"classifier.weight": (None, 32), "classifier.bias": (None,)}),
    ("gpt2", "transformer.h.1.attn.c_attn", (96, 32), {"score.weight": (None, 32)}),  # Conv1D: weight is in x out
    ("llama", "model.layers.3.self_attn.v_proj", (16, 32), {"score.weight": (None, 32)}),
    ("distilbert", "distilbert.transformer.layer.0.attention.q_lin", (32, 32),
     {"pre_classifier.weight": (32, 32), "pre_classifier.bias": (32,), "classifier.weight": (None, 32),
      "classifier.bias": (None,)}),
])
def test_the_layout_holds_every_lora_module_and_the_head(family_name, module, shape, heads):
    config = tiny_config(family_name)
    layout = model_layout(config, family_for(config), "classification")
    assert layout.modules[module] == shape
    assert dict(layout.heads) == heads
    assert layout.num_layers == 4
    assert not any(m.startswith(("classifier", "score")) for m in layout.modules)  # a head is no LoRA module

