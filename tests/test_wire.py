"""The wire format: round trips and every validation rule."""

from __future__ import annotations

import msgpack
import pytest
import torch

from split.wire import Limits, Message, WireError, decode, encode


def roundtrip(msg: Message, limits: Limits = Limits()) -> Message:
    return decode([bytes(f) for f in encode(msg)], limits)


def test_roundtrip_preserves_header_and_tensors_exactly():
    tensors = {
        "hidden": torch.randn(2, 5, 8),
        "mask": torch.tensor([[1, 1, 0]], dtype=torch.uint8),
        "pos": torch.arange(5).unsqueeze(0),
        "half": torch.randn(3).to(torch.bfloat16),
        "empty": torch.empty(0, 4),
    }
    msg = Message("forward", client="c1", step=7, meta={"train": True, "nested": {"a": [1, 2.5, None]}},
                  tensors=tensors)
    out = roundtrip(msg)
    assert (out.op, out.client, out.step, out.meta) == ("forward", "c1", 7, msg.meta)
    for name, value in tensors.items():
        assert out.tensors[name].dtype == value.dtype
        assert torch.equal(out.tensors[name], value)


def test_decoded_tensors_are_writable_copies():
    out = roundtrip(Message("ok", tensors={"x": torch.ones(4)}))
    out.tensors["x"].add_(1)  # would fail or corrupt the frame if it aliased a read-only buffer
    assert torch.equal(out.tensors["x"], torch.full((4,), 2.0))


def test_non_contiguous_tensor_is_sent_in_logical_order():
    x = torch.arange(12.0).reshape(3, 4).t()
    assert torch.equal(roundtrip(Message("ok", tensors={"x": x})).tensors["x"], x)


def _frames(header: dict, *buffers: bytes) -> list[bytes]:
    base = {"v": 1, "op": "forward", "client": "c", "step": 0, "meta": {}, "tensors": []}
    base.update(header)
    return [msgpack.packb(base)] + list(buffers)


def _entry(**kw):
    e = {"name": "x", "dtype": "float32", "shape": [2], "codec": "raw", "nbytes": 8}
    e.update(kw)
    return e


@pytest.mark.parametrize("frames, expected", [
    ([], "empty message"),
    ([b"\xc1\x00garbage"], "not valid msgpack"),
    ([msgpack.packb([1, 2])], "must be a map"),
    (_frames({"v": 99}), "protocol version"),
    (_frames({"op": "launch_missiles"}), "unknown op"),
    (_frames({"client": 5}), "client id"),
    (_frames({"step": -1}), "step must be"),
    (_frames({"meta": {"x": b"\x00"}}), "not a plain value"),
    (_frames({"tensors": [_entry()]}), "1 tensors but 0 tensor frames"),
    (_frames({"tensors": [_entry(dtype="complex64")]}, bytes(8)), "not allowed"),
    (_frames({"tensors": [_entry(dtype="object")]}, bytes(8)), "not allowed"),
    (_frames({"tensors": [_entry(shape=[2, -1])]}, bytes(8)), "non-negative"),
    (_frames({"tensors": [_entry(shape="2")]}, bytes(8)), "shape must be"),
    (_frames({"tensors": [_entry(nbytes=12)]}, bytes(12)), "shape [2] in float32 (raw) is 8"),
    (_frames({"tensors": [_entry()]}, bytes(7)), "the frame holds 7"),
    (_frames({"tensors": [_entry(codec="zip")]}, bytes(8)), "unknown codec"),
    (_frames({"tensors": [_entry(), _entry()]}, bytes(8), bytes(8)), "repeated tensor name"),
])
def test_malformed_messages_are_rejected_with_a_reason(frames, expected):
    with pytest.raises(WireError, match=None) as info:
        decode(frames)
    assert expected in str(info.value)


def test_size_limits():
    small = Limits(max_tensor_bytes=16, max_message_bytes=24)
    with pytest.raises(WireError, match="exceed the limit of 16"):
        decode(_frames({"tensors": [_entry(shape=[5], nbytes=20)]}, bytes(20)), small)
    two = _frames({"tensors": [_entry(shape=[4], nbytes=16), _entry(name="y", shape=[4], nbytes=16)]},
                  bytes(16), bytes(16))
    with pytest.raises(WireError, match="message exceeds the limit of 24"):
        decode(two, small)
    with pytest.raises(WireError, match="header of"):
        decode([msgpack.packb({"pad": "x" * 100})], Limits(max_header_bytes=50))


def test_nothing_on_the_wire_is_pickled():
    frames = encode(Message("forward", client="c", meta={"train": True}, tensors={"h": torch.ones(2)}))
    header = bytes(frames[0])
    assert not header.startswith(b"\x80")  # pickle protocol marker
    assert msgpack.unpackb(header)["tensors"][0]["dtype"] == "float32"
