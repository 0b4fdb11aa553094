"""Codecs on a real split link: the client sends in its up codec, the server
answers in the client's down codec, a lossy run still trains and moves fewer
bytes, error feedback is applied once per message built, and a hello with a
bad codec is refused by name."""

from __future__ import annotations

import msgpack
import pytest
import torch

import split.transport as transport
from conftest import VOCAB, random_batch, save_tiny, threaded_server
from edge.client import ClientConfig, SplitClient
from edge.device_demo import check_options
from server.service import BackboneServer, ServerConfig
from split.cli import build_parser
from split.codecs import parse_codec, roundtrip
from split.linkcodecs import LinkCodecs, Sender
from split.lora import LoraSpec
from split.partition import Cut, load_config
from split.protocol import Hello, ModelInfo, OptimizerSettings, ProtocolError
from split.transport import ServerError
from split.wire import Message, decode, encode

WIDE = 128  # wide enough that int8's per-token scale is a small share of a row


@pytest.fixture(scope="module")
def wide_bert(tmp_path_factory):
    return save_tiny("bert", tmp_path_factory.mktemp("wide-bert"), hidden_size=WIDE)


class Headers:
    """The header of every message the client's transport encodes and decodes: (op, {tensor: codec text})."""

    def __init__(self, monkeypatch):
        self.sent, self.received = [], []
        encode_, decode_ = transport.encode, transport.decode

        def entries(frames) -> dict:
            header = msgpack.unpackb(bytes(frames[0]))
            return {e["name"]: (e["codec"], e.get("params", {})) for e in header["tensors"]}

        def spied_encode(msg):
            frames = encode_(msg)
            self.sent.append((msg.op, entries(frames)))
            return frames

        def spied_decode(frames, *args):
            self.received.append(entries([bytes(frames[0].buffer if hasattr(frames[0], "buffer") else frames[0])]))
            return decode_(frames, *args)

        monkeypatch.setattr(transport, "encode", spied_encode)
        monkeypatch.setattr(transport, "decode", spied_decode)


def _train(endpoint, model, steps: int, up: str, down: str, name: str) -> tuple[list[float], int, int]:
    """Losses of ``steps`` steps on one batch, and the bytes the client sent and received during them."""
    client = SplitClient(ClientConfig(server=endpoint, model=str(model), num_labels=3, dropout=False, lr=1e-2,
                                      lora=LoraSpec(4, 8.0), client_id=name, codec_up=up, codec_down=down))
    try:
        batch = random_batch(0, VOCAB, batch=8, max_len=32)
        sent, received = client.conn.bytes_sent, client.conn.bytes_received
        losses = [client.train_step(batch) for _ in range(steps)]
        return losses, client.conn.bytes_sent - sent, client.conn.bytes_received - received
    finally:
        client.close()


def test_an_int8_link_trains_moves_about_a_quarter_of_the_bytes_and_each_side_sends_in_its_codec(
        wide_bert, monkeypatch):
    with threaded_server(wide_bert, "1,1", dropout=False) as (endpoint, _):
        lossless, fp32_up, fp32_down = _train(endpoint, wide_bert, 12, "fp32", "fp32", "lossless")
        spy = Headers(monkeypatch)
        coded, int8_up, int8_down = _train(endpoint, wide_bert, 12, "int8", "int8:outliers=2", "coded")
    assert coded[-1] < 0.7 * coded[0]  # it trains
    assert abs(coded[-1] - lossless[-1]) < 0.1 * lossless[0]  # about as well as the lossless link
    # 8 x 32 tokens of width 128: 1 byte a value and a 4-byte scale per token, against 4 bytes a value.
    assert 0.25 < int8_up / fp32_up < 0.27 and 0.25 < int8_down / fp32_down < 0.28
    forwards = [entries for op, entries in spy.sent if op == "forward"]
    backwards = [entries for op, entries in spy.sent if op == "backward"]
    assert forwards and all(e["hidden"] == ("int8", {}) and e["attention_mask"][0] == "raw" for e in forwards)
    assert backwards and all(e["grad"] == ("int8", {}) for e in backwards)
    # The server answers this client in its down codec: hidden states forward, gradients backward.
    replies = [e for e in spy.received if "hidden" in e or "grad" in e]
    assert len(replies) == 24 and all(list(e.values()) == [("int8", {"outliers": 2})] for e in replies)


def test_the_two_part_split_codes_hidden_states_and_gradients_but_sends_loss_logits_and_its_grad_exactly(
        tiny_models, monkeypatch):
    model = tiny_models("bert")
    with threaded_server(model, "1,0", dropout=False, num_labels=3) as (endpoint, _):
        spy = Headers(monkeypatch)
        client = SplitClient(ClientConfig(server=endpoint, model=str(model), num_labels=3, dropout=False,
                                          cut=Cut(1, 0), client_id="two-part", codec_up="bf16", codec_down="fp16"))
        try:
            loss = client.train_step(random_batch(0, VOCAB))
        finally:
            client.close()
    assert loss > 0
    sent = dict(spy.sent[1:3])  # after the hello: the forward and the backward
    assert sent["forward"]["hidden"][0] == "bf16" and sent["forward"]["labels"][0] == "raw"
    assert sent["backward"]["grad"][0] == "raw"  # the loss's gradient: one number
    forward_reply, backward_reply = spy.received[1:3]
    assert forward_reply["loss"][0] == forward_reply["logits"][0] == "raw"
    assert backward_reply["grad"][0] == "fp16"


# ------------------------------------------------------------ error feedback, once per message


def _hello(path, client: str, codecs: LinkCodecs) -> list:
    cfg = load_config(path, "classification", 3, True)
    msg = Hello(ModelInfo.of(path, cfg), LoraSpec(4, 8.0), "classification", 0, None, OptimizerSettings(),
                num_labels=3, codecs=codecs).to_message()
    msg.client = client
    return encode(msg)


def test_a_resent_forward_is_answered_with_the_same_bytes_and_moves_the_residual_once(tiny_models):
    path = tiny_models("bert")
    server = BackboneServer(ServerConfig(model=str(path), cut=Cut(1, 1), num_labels=3, dropout=False))
    try:
        welcome = server.handle(b"conn", _hello(path, "c", LinkCodecs.parse("fp32", "topk:density=0.25,ef=1")))
        assert welcome.op == "ok", welcome.meta
        token = welcome.meta["token"]
        request = encode(Message("forward", "c", 0, meta={"token": token, "train": True, "rid": 1},
                                 tensors={"hidden": torch.randn(2, 6, 32),
                                          "attention_mask": torch.ones(2, 6, dtype=torch.uint8)}))
        first = server.handle(b"conn", request)
        session = server.sessions.by_client["c"]
        residual = session.down.feedback.residual("hidden").clone()
        again = server.handle(b"conn", request)  # the reply was lost: the same request, the cached reply
        assert [bytes(f) for f in encode(again)] == [bytes(f) for f in encode(first)]
        assert torch.equal(session.down.feedback.residual("hidden"), residual)
        # What went out is the top quarter of output + residual, and the residual is the rest.
        sent = first.tensors["hidden"]
        assert torch.equal(decode(encode(first)).tensors["hidden"], roundtrip(sent, parse_codec("topk:density=0.25,ef=1")))
        assert int((decode(encode(first)).tensors["hidden"] != 0).sum()) == 2 * 6 * 32 // 4
        # An evaluation forward is coded, but neither takes nor leaves a residual.
        evaluation = encode(Message("forward", "c", 1, meta={"token": token, "train": False, "rid": 2},
                                    tensors={"hidden": torch.randn(2, 6, 32),
                                             "attention_mask": torch.ones(2, 6, dtype=torch.uint8)}))
        assert server.handle(b"conn", evaluation).codecs == {"hidden": parse_codec("topk:density=0.25,ef=1")}
        assert torch.equal(session.down.feedback.residual("hidden"), residual)
    finally:
        server.close()


def test_a_sender_codes_only_the_named_tensors_and_is_a_no_op_when_lossless():
    msg = Message("forward", tensors={"hidden": torch.ones(4), "attention_mask": torch.ones(4, dtype=torch.uint8)})
    assert Sender().code(msg, ("hidden",)).codecs == {}
    spec = parse_codec("topk:density=0.5,ef=1")
    sender = Sender(spec)
    sender.code(msg, ("hidden", "grad"))
    assert msg.codecs == {"hidden": spec}
    assert sender.feedback.residual("hidden").tolist() == [0.0, 0.0, 1.0, 1.0]
    plain = Sender(parse_codec("topk:density=0.5"))  # without error feedback (the default): each step sent on its own
    again = Message("forward", tensors={"hidden": torch.tensor([1.0, 2.0, 3.0, 4.0])})
    plain.code(again, ("hidden",))
    assert again.tensors["hidden"].tolist() == [1.0, 2.0, 3.0, 4.0] and plain.feedback.residual("hidden") is None


# ------------------------------------------------------------ bad codecs, by name


@pytest.mark.parametrize("codecs, expected", [
    ({"up": "int9", "down": "fp32"}, "hello: --codec-up: unknown codec 'int9'; known: fp32; fp16; bf16; int8"),
    ({"up": "fp32", "down": "topk:density=2"}, "hello: --codec-down: codec topk: density=2.0 is out of range"),
    ({"up": "fp32"}, "field 'codecs' must be a map of exactly 'up' and 'down'"),
    ({"up": 8, "down": "fp32"}, "'up' must be a codec text"),
    (["int8"], "field 'codecs' must be a map"),
])
def test_a_hello_with_a_bad_codec_is_refused_by_name(tiny_models, codecs, expected):
    path = tiny_models("bert")
    frames = _hello(path, "bad", LinkCodecs())
    header = msgpack.unpackb(bytes(frames[0]))
    header["meta"]["codecs"] = codecs
    msg = decode([msgpack.packb(header)])
    with pytest.raises(ProtocolError) as info:
        Hello.from_message(msg)
    assert expected in str(info.value)


def test_the_server_refuses_a_bad_codec_and_the_client_options_name_it(tiny_models):
    path = tiny_models("bert")
    with threaded_server(path, "1,1") as (endpoint, server):
        frames = _hello(path, "bad", LinkCodecs())
        header = msgpack.unpackb(bytes(frames[0]))
        header["meta"]["codecs"] = {"up": "int8", "down": "zip"}
        reply = server.handle(b"conn", [msgpack.packb(header)])
        assert reply.op == "error" and "hello: --codec-down: unknown codec 'zip'" in reply.meta["error"]
        with pytest.raises(ValueError, match="--codec-up: codec int8: outliers=-1 is out of range"):
            ClientConfig(server=endpoint, model=str(path), codec_up="int8:outliers=-1")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["client", "--codec-down", "nf3"])
    args = build_parser().parse_args(["client", "--codec-up", "int8:outliers=0", "--codec-down", "topk:density=.1"])
    assert (args.codec_up, args.codec_down) == ("int8", "topk:density=0.1")
    demo = build_parser().parse_args(["demo", "--codec-up", "int8", "--codec-down", "int8"])
    assert (demo.codec_up, demo.codec_down) == ("int8", "int8")
    # The device demo's plan decides each client's traffic: codec options are refused there by name.
    devices = build_parser().parse_args(["demo", "--devices", "laptop,pi5", "--codec-up", "int8"])
    with pytest.raises(ValueError, match="--codec-up do"):
        check_options(devices, devices.demo_parser)


def test_a_reply_the_down_codec_cannot_encode_is_an_error_reply_not_a_stopped_server():
    from server.service import _encode_reply

    reply = Message("ok", "c", 3, meta={"rid": 9}, tensors={"hidden": torch.tensor([1.0, float("nan")])},
                    codecs={"hidden": parse_codec("int8")})
    failed = decode(_encode_reply(reply))
    assert failed.op == "error" and failed.meta["rid"] == 9 and failed.meta["code"] == "failed"
    assert "int8 codec cannot encode NaN or infinite values" in failed.meta["error"]
    with pytest.raises(ServerError, match="could not encode its reply"):
        transport.Connection._answer(failed)
