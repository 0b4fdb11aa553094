"""Typed payloads (split/protocol.py): every payload survives the wire as it
was sent, and a hostile payload raises ``ProtocolError`` and nothing else."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from split.lora import LoraSpec
from split.partition import Cut
from split.protocol import (FederationSettings, Hello, Join, ModelInfo, OptimizerSettings, ProtocolError,
                            RoundOffer, UploadPayload, Welcome, pack, unpack)
from split.wire import Message, decode, encode

M = "model.layers.0.self_attn.q_proj"
FP = "0123456789abcdef" * 4
BERT = ModelInfo("bert", 6, 384, FP, "demo/model")


def over_the_wire(msg: Message) -> Message:
    return decode(encode(msg))


def test_hello_and_welcome_round_trip():
    hello = Hello(ModelInfo("llama", 4, 32, FP), LoraSpec(4, 8.0, 0.1, ("q_proj",)), "causal-lm", seed=-3,
                  cut=Cut(2, 1), optimizer=OptimizerSettings(5e-3, 0.01))
    assert Hello.from_message(over_the_wire(hello.to_message())) == hello
    no_cut = Hello(BERT, LoraSpec(), "classification", num_labels=3)
    assert Hello.from_message(over_the_wire(no_cut.to_message())) == no_cut
    for fed in (None, FederationSettings("hetlora", 3, 10, 0.5)):
        welcome = Welcome(6, Cut(1, 1), 120.0, fed, "0f" * 16)
        assert Welcome.from_message(over_the_wire(welcome.to_message("c"))) == welcome


def test_join_round_and_upload_round_trip():
    join = Join(4, 8.0, 30, {M: (32, 32), "score": (3, 32)}, frozenset({0, 3}), "jetson", ("cat", "dog", "eel"))
    assert Join.from_message(over_the_wire(join.to_message())) == join
    a, b = torch.randn(4, 32), torch.randn(32, 4)
    offer = RoundOffer("train", 2, A={M: a}, B={M: b}, head={"score.weight": torch.ones(3, 32)},
                       deltas={M: torch.zeros(32, 32)}, rank=4, alpha=8.0, trainable="B", fresh_seed=123,
                       options={"hetlora_lambda": 0.001, "hetlora_gamma": 0.99})
    back = RoundOffer.from_message(over_the_wire(offer.to_message("c")))
    assert (back.status, back.round, back.rank, back.alpha, back.trainable, back.fresh_seed, back.options) == \
        ("train", 2, 4, 8.0, "B", 123, offer.options)
    assert torch.equal(back.A[M], a) and torch.equal(back.B[M], b) and set(back.deltas) == {M}
    assert RoundOffer.from_message(over_the_wire(RoundOffer("wait", 5).to_message("c"))).status == "wait"
    upload = UploadPayload(2, 30, 3, A={M: a[:3]}, B={M: b[:, :3]}, head={"score.weight": torch.ones(3, 32)})
    back = UploadPayload.from_message(over_the_wire(upload.to_message()))
    assert (back.round, back.num_samples, back.rank) == (2, 30, 3) and torch.equal(back.A[M], a[:3])


@pytest.mark.parametrize("payload, fix, message", [
    (Join(4, 8.0, 30, {M: (32, 32)}), lambda m: m.meta.update(rank=0), "'rank' must be an integer >= 1"),
    (Join(4, 8.0, 30, {M: (32, 32)}), lambda m: m.meta.update(rank=True), "'rank' must be an integer"),
    (Join(4, 8.0, 30, {M: (32, 32)}), lambda m: m.meta.update(alpha=float("nan")), "finite number"),
    (Join(4, 8.0, 30, {M: (32, 32)}), lambda m: m.meta.update(blocks=[1, -2]), "block indices"),
    (Join(4, 8.0, 30, {M: (32, 32)}), lambda m: m.meta["modules"].update({M: [32]}), "two integers"),
    (Join(4, 8.0, 30, {M: (32, 32)}), lambda m: m.meta.pop("num_samples"), "'num_samples' is missing"),
    (Join(4, 8.0, 30, {M: (32, 32)}), lambda m: m.meta.update(labels=["a", "a"]), "distinct non-empty names"),
    (Join(4, 8.0, 30, {M: (32, 32)}), lambda m: m.meta.update(labels=["a", 3]), "distinct non-empty names"),
    (UploadPayload(0, 1, 4), lambda m: m.tensors.update({"A:" + M: torch.zeros(4, 2)}), "one LoRA factor"),
    (UploadPayload(0, 1, 4), lambda m: m.tensors.update({"Q:" + M: torch.zeros(1)}), "no group prefix"),
    (UploadPayload(0, 1, 4), lambda m: m.tensors.update({"D:" + M: torch.zeros(1)}), "frozen-weight"),
    (Hello(BERT, LoraSpec(), "classification"),
     lambda m: m.meta.update(lora={"rank": 0, "alpha": 16}), "bad LoRA spec"),
    (Hello(BERT, LoraSpec(), "classification"),
     lambda m: m.meta.update(cut=[1, "1"]), "'cut'"),
    (Hello(BERT, LoraSpec(), "classification"),
     lambda m: m.meta["optim"].update(lr=-1.0), "lr must be > 0"),
    (Hello(BERT, LoraSpec(), "classification"),
     lambda m: m.meta["model"].update(fingerprint="x" * 64), "64 hex digits"),
    (Hello(BERT, LoraSpec(), "classification"),
     lambda m: m.meta["model"].pop("fingerprint"), "'fingerprint' is missing"),
    (Hello(BERT, LoraSpec(), "classification", num_labels=3),
     lambda m: m.meta.update(num_labels=0), "'num_labels' must be an integer >= 1"),
])
def test_bad_fields_are_refused_by_name(payload, fix, message):
    msg = payload.to_message()
    fix(msg)
    with pytest.raises(ProtocolError, match=message):
        type(payload).from_message(over_the_wire(msg))


def test_a_round_offer_to_train_needs_a_rank():
    msg = RoundOffer("train", 0).to_message("c")
    with pytest.raises(ProtocolError, match="needs field 'rank'"):
        RoundOffer.from_message(msg)


def test_pack_and_unpack_are_inverse():
    t = {"x": torch.zeros(1)}
    groups = unpack(pack(A=t, B=t, head=t, delta=t), "test")
    assert all(set(g) == {"x"} for g in groups.values())


# Any msgpack value in any field: the payload parsers answer with ProtocolError only.
plain = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=3),
                     max_leaves=8)
FIELDS = ["model", "lora", "task", "seed", "cut", "optim", "rank", "alpha", "num_samples", "modules", "blocks",
          "profile", "status", "round", "trainable", "fresh_seed", "options", "num_layers", "server_cut",
          "session_timeout", "federation", "strategy", "rounds", "local_steps", "local_epochs", "restored"]
PARSERS = [Hello, Welcome, Join, RoundOffer, UploadPayload]


@settings(max_examples=300, deadline=None)
@given(meta=st.dictionaries(st.sampled_from(FIELDS), plain, max_size=8), parser=st.sampled_from(PARSERS))
def test_hostile_payloads_raise_only_protocol_errors(meta, parser):
    try:
        parser.from_message(Message("hello", meta=meta))
    except ProtocolError:
        pass  # refused by name; any other exception fails the test


@pytest.mark.parametrize("lora, message", [
    ({"rank": "8", "alpha": 16}, "rank must be an integer"),
    ({"rank": 8.5, "alpha": 16}, "rank must be an integer"),
    ({"rank": 8, "alpha": "16"}, "alpha must be a finite number"),
    ({"rank": 8, "alpha": 16, "targets": "query"}, "targets must be a list"),
    ({"rank": 8, "alpha": 16, "targets": ["query", 3]}, "targets must be a list"),
    ({"alpha": 16}, "rank"),
])
def test_a_lora_spec_from_the_wire_is_checked(lora, message):
    msg = Hello(BERT, LoraSpec(), "classification").to_message()
    msg.meta["lora"] = lora
    with pytest.raises(ProtocolError, match=message):
        Hello.from_message(msg)
