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


# Finding: a dtype or codec that is a list or a map raised TypeError (unhashable)
# inside decode, which the server did not catch.
@pytest.mark.parametrize("field", ["dtype", "codec"])
@pytest.mark.parametrize("value", [["float32"], {"float32": 1}, ["raw"], {"raw": "raw"}])
def test_a_list_or_map_dtype_or_codec_is_refused_by_name(field, value):
    with pytest.raises(WireError, match=f"{field} (a list|a map)"):
        decode(_frames({"tensors": [_entry(**{field: value})]}, bytes(8)))


# A value of every msgpack type, for fields that expect another.
HOSTILE = [None, True, False, 1, -1, 2**63 - 1, 2**64 - 1, -(2**63), float("nan"), float("inf"), 1.5, "",
           "x" * 5000, b"\x00\x01", [], [1, [2, {"a": None}]], {"a": 1}, {"a": {"b": [1, 2]}},
           msgpack.ExtType(3, b"\x00"), msgpack.Timestamp(1)]
# How each field's error names it.
NAMED = {"v": "protocol version", "op": "unknown op", "client": "client id", "step": "step", "meta": "meta",
         "tensors": "tensor", "name": "tensor name", "dtype": "dtype", "shape": "shape", "codec": "codec",
         "nbytes": "bytes"}
ENTRY_FIELDS = ("name", "dtype", "shape", "codec", "nbytes")


def _with(field: str, value) -> list[bytes]:
    if field in ENTRY_FIELDS:
        return _frames({"tensors": [_entry(**{field: value})]}, bytes(8))
    return _frames({"tensors": [_entry()], field: value}, bytes(8))


@pytest.mark.parametrize("field", list(NAMED))
@pytest.mark.parametrize("value", HOSTILE, ids=lambda v: type(v).__name__)
def test_any_value_in_any_header_field_is_refused_naming_the_field(field, value):
    try:
        decode(_with(field, value))
    except WireError as exc:
        text = str(exc)
        # Ext values never reach the field check: msgpack refuses them first.
        assert NAMED[field] in text or "max_ext_len" in text, text
        assert len(text) < 400, "an error quotes a peer's value whole"
        return
    # Only the values above that are valid for the field may pass.
    valid = [("v", int, 1), ("step", int, 1), ("step", int, 2**63 - 1), ("client", str, ""),
             ("meta", dict, {"a": 1}), ("meta", dict, {"a": {"b": [1, 2]}})]
    assert (field, type(value), value) in valid, f"{field} = {value!r} was accepted"


@pytest.mark.parametrize("shape", [[0, 2**62, 2**62], [0, 2**63 - 1, 2], [0, 2**64 - 1], [0] + [2**40] * 7])
def test_an_empty_shape_too_large_for_torch_is_refused(shape):
    # No bytes to check the dims against: torch's strides would overflow.
    with pytest.raises(WireError, match="shape .* spans more than"):
        decode(_frames({"tensors": [_entry(shape=shape, nbytes=0)]}, b""))


def test_true_is_not_protocol_version_one_nor_a_step():
    with pytest.raises(WireError, match="protocol version True"):
        decode(_frames({"v": True}))
    with pytest.raises(WireError, match="step must be"):
        decode(_frames({"step": 2**64 - 1}))


@pytest.mark.parametrize("raw, expected", [
    # 4 million empty lists in 4 MB: about 250 MB of Python objects if parsed.
    (b"\xdd" + (4_000_000).to_bytes(4, "big") + b"\x90" * 4_000_000, "exceeds max_array_len"),
    # Many short lists, each within the length limit: the total is what is bounded.
    (b"\xdc\x4e\x20" + (b"\xdc\x00\x40" + b"\x90" * 64) * 20_000, "more than 262144 values"),
    (b"\x91" * 100_000 + b"\xc0", "nested too deeply"),
    (msgpack.packb({"v": 1, "op": "ok", "meta": {"t": msgpack.Timestamp(5)}}), "max_ext_len"),
], ids=["one long list", "many short lists", "deep nesting", "ext value"])
def test_a_small_header_cannot_expand_into_a_huge_object(raw, expected):
    with pytest.raises(WireError, match=expected):
        decode([raw], Limits(max_header_bytes=16 << 20))  # within the size limit: the content is what is refused


def test_a_bool_tensor_with_bytes_other_than_0_or_1_is_refused():
    frames = encode(Message("forward", tensors={"mask": torch.tensor([True, False, True])}))
    assert decode(frames).tensors["mask"].tolist() == [True, False, True]
    with pytest.raises(WireError, match="tensor mask: a bool tensor's bytes must be 0 or 1"):
        decode([frames[0], bytes([1, 0, 7])])
