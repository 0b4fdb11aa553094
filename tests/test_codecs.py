"""Tensor codecs: round trips within each codec's stated error bound, frame
sizes, error feedback, and hostile headers, parameters and payloads."""

from __future__ import annotations

import math

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from split.codec_frames import NF4_LEVELS, NF4_MAX_ERROR, rows_of, topk_count
from split.codecs import (RAW, CodecSpec, ErrorFeedback, encode_tensor, encoded_nbytes, parse_codec, roundtrip,
                          uses_error_feedback)
from split.wire import Message, WireError, decode, encode

LOSSY = ["fp16", "bf16", "int8", "int8:outliers=3", "nf4", "nf4:block=16", "topk:density=0.1", "topk:density=1"]
SHAPES = [(), (1,), (7,), (3, 5), (2, 0), (0, 4), (2, 3, 33), (4, 16, 40)]
FLOATS = [torch.float32, torch.float16, torch.bfloat16]


def _sample(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3).to(dtype)


# ------------------------------------------------------------ specs


def test_specs_are_canonical_and_their_text_parses_back():
    assert RAW == parse_codec("fp32") == CodecSpec("fp32") and RAW.lossless
    assert parse_codec("int8:outliers=0") == parse_codec("int8")  # the default is left out
    assert parse_codec("int8:outliers=4").text == "int8:outliers=4"
    assert parse_codec("topk:density=0.1").text == "topk:density=0.1"
    assert parse_codec("topk:density=1").param("density") == 1.0
    assert parse_codec("nf4").param("block") == 64
    for text in ["fp32", "fp16", "bf16", "int8", "int8:outliers=4", "nf4:block=128", "topk:density=0.25"]:
        assert parse_codec(parse_codec(text).text) == parse_codec(text)
    assert uses_error_feedback(parse_codec("topk:density=0.5,ef=1")) and not uses_error_feedback(parse_codec("int8"))
    assert not uses_error_feedback(parse_codec("topk:density=0.5"))
    assert parse_codec("topk:density=0.5,ef=0").text == "topk:density=0.5"  # the default is left out
    assert parse_codec("topk:density=0.5,ef=1").text == "topk:density=0.5,ef=1"


@pytest.mark.parametrize("text, expected", [
    ("int4", "unknown codec 'int4'; known: fp32; fp16; bf16; int8"),
    ("topk", "codec topk needs density=D: a number with 0 < D <= 1"),
    ("topk:density=0", "density=0.0 is out of range"),
    ("topk:density=1.5", "out of range"),
    ("topk:density=nan", "out of range"),
    ("topk:density=x", "density='x' is not a number"),
    ("int8:outliers=-1", "outliers=-1 is out of range: outliers=N: an integer in 0..256"),
    ("int8:outliers=2.5", "is not an integer"),
    ("int8:outliers=1,outliers=2", "given twice"),
    ("nf4:block=1", "block=1 is out of range"),
    ("nf4:size=8", "'size=8' is not a parameter; its parameters: block=..."),
    ("fp16:", "its parameters: none"),
    ("fp16:x=1", "its parameters: none"),
])
def test_a_bad_spec_is_refused_naming_the_codecs_and_ranges(text, expected):
    with pytest.raises(ValueError) as info:
        parse_codec(text)
    assert expected in str(info.value)


def test_a_spec_built_directly_is_checked_too():
    with pytest.raises(ValueError, match="has no parameter 'x'"):
        CodecSpec("int8", (("x", 1),))
    with pytest.raises(ValueError, match="outliers must be an integer"):
        CodecSpec("int8", (("outliers", True),))


# ------------------------------------------------------------ round trips within their bounds


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool])
def test_fp32_is_bit_exact_for_every_dtype(dtype):
    x = (torch.randn(3, 5) * 100).to(dtype)
    out = roundtrip(x, RAW)
    assert out.dtype == dtype and torch.equal(out, x)
    assert encoded_nbytes(x.shape, dtype, RAW) == x.numel() * x.element_size()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_each_lossy_codec_decodes_into_the_header_dtype_and_shape_with_its_frame_size(shape, dtype):
    x = _sample(shape, dtype)
    for text in LOSSY:
        spec = parse_codec(text)
        frame = encode_tensor(x, spec)
        assert memoryview(frame).nbytes == encoded_nbytes(shape, dtype, spec), text
        out = roundtrip(x, spec)
        assert out.dtype == dtype and tuple(out.shape) == shape, text


def _fp16_bound(x: torch.Tensor) -> torch.Tensor:
    # fp16 keeps 11 significant bits: relative 2**-11 with round-to-nearest. The
    # power-of-two scale puts the largest magnitude A in [2**14, 2**15), so fp16
    # subnormals (spacing 2**-24) start at A * 2**-28: absolute A * 2**-39 below.
    largest = x.abs().max()
    return x.abs() * 2.0 ** -11 + largest * 2.0 ** -39


def test_fp16_is_within_relative_two_to_the_minus_11_even_far_outside_fp16_range():
    for scale in [1.0, 1e-9, 1e9]:  # gradients below fp16's subnormals; magnitudes past 65504
        x = _sample((4, 16, 40)) * scale
        err = (roundtrip(x, parse_codec("fp16")) - x).abs()
        assert bool((err <= _fp16_bound(x)).all()), scale
        assert int((err > 0).sum()) > 0  # lossy indeed


def test_bf16_is_within_relative_two_to_the_minus_8():
    x = _sample((4, 16, 40))
    err = (roundtrip(x, parse_codec("bf16")) - x).abs()
    assert bool((err <= x.abs() * 2.0 ** -8).all())


def test_int8_error_is_at_most_half_a_step_of_each_rows_absmax():
    x = _sample((4, 16, 40)) * torch.logspace(-6, 2, 16)[None, :, None]  # rows of very different scales
    out = roundtrip(x, parse_codec("int8"))
    step = x.abs().amax(dim=-1, keepdim=True) / 127
    assert bool(((out - x).abs() <= step / 2 * (1 + 1e-5)).all())


def test_int8_outlier_channels_go_apart_in_fp16_and_the_rest_get_finer_steps():
    x = _sample((4, 16, 40))
    x[..., [5, 31]] *= 100  # two outlier channels, as in transformer hidden states
    plain, apart = roundtrip(x, parse_codec("int8")), roundtrip(x, parse_codec("int8:outliers=2"))
    rest = [c for c in range(40) if c not in (5, 31)]
    inner = x[..., rest]
    step = inner.abs().amax(dim=-1, keepdim=True) / 127
    assert bool(((apart[..., rest] - inner).abs() <= step / 2 * (1 + 1e-5)).all())
    outl = x[..., [5, 31]]
    assert bool(((apart[..., [5, 31]] - outl).abs() <= _fp16_bound(x)[..., [5, 31]]).all())
    assert (apart - x).abs().mean() < (plain - x).abs().mean() / 10
    # One byte per value, a float32 scale per row, and per outlier channel an int32 index and fp16 values.
    rows, width = rows_of((4, 16, 40))
    assert encoded_nbytes((4, 16, 40), torch.float32, parse_codec("int8:outliers=2")) == (
        4 * rows + 4 * 2 + 2 * rows * 2 + 2 + rows * 38)


@pytest.mark.parametrize("block", [16, 64, 100])
def test_nf4_error_is_at_most_half_the_widest_level_gap_of_each_blocks_absmax(block):
    x = _sample((3, 7, 50))
    out = roundtrip(x, parse_codec(f"nf4:block={block}"))
    flat, err = x.reshape(-1), (out - x).reshape(-1)
    for start in range(0, flat.numel(), block):
        absmax = flat[start:start + block].abs().max()
        assert bool((err[start:start + block].abs() <= NF4_MAX_ERROR * absmax * (1 + 1e-6)).all())
    # The values decoded are levels times each block's absmax, nothing in between.
    ratios = out.reshape(-1)[:block] / flat[:block].abs().max()
    assert bool(torch.isclose(ratios[:, None], NF4_LEVELS[None, :], atol=1e-6).any(dim=1).all())


def test_nf4_levels_are_the_normal_quantiles_of_qlora_and_match_bitsandbytes_frames():
    # The construction of QLoRA, appendix E: quantiles at 8 and 7 evenly spaced
    # probabilities from 1 - 0.5 * (1/30 + 1/32) to 0.5, and zero, scaled to [-1, 1].
    top = 1 - 0.5 * (1 / 30 + 1 / 32)
    positive = torch.special.ndtri(torch.linspace(top, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(top, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    assert torch.allclose(levels / levels.max(), NF4_LEVELS.double(), atol=1e-6)
    functional = pytest.importorskip("bitsandbytes.functional")
    x = _sample((64, 96))
    codes, state = functional.quantize_4bit(x, blocksize=64, quant_type="nf4")
    frame = bytes(encode_tensor(x, parse_codec("nf4")))
    assert frame == state.absmax.numpy().tobytes() + codes.numpy().tobytes()


def test_topk_keeps_the_largest_entries_to_fp16_precision_and_zeroes_the_rest():
    x = _sample((4, 16, 40))
    spec = parse_codec("topk:density=0.1")
    out = roundtrip(x, spec)
    kept = out != 0
    assert int(kept.sum()) == topk_count(x.numel(), 0.1) == 256
    assert x[kept].abs().min() >= x[~kept].abs().max()  # what was dropped is the smallest
    assert bool(((out[kept] - x[kept]).abs() <= _fp16_bound(x)[kept]).all())
    assert encoded_nbytes(x.shape, torch.float32, spec) == 256 * 4 + 256 * 2 + 2


def test_topk_ties_go_to_the_lower_index_so_a_tensor_always_encodes_the_same():
    x = torch.ones(10)
    out = roundtrip(x, parse_codec("topk:density=0.3"))
    assert out.tolist() == [1.0] * 3 + [0.0] * 7
    assert bytes(encode_tensor(x, parse_codec("topk:density=0.3"))) == bytes(
        encode_tensor(x.clone(), parse_codec("topk:density=0.3")))


@pytest.mark.parametrize("count, density, k", [(0, 0.5, 0), (1, 0.01, 1), (30, 0.1, 3), (100, 0.1, 10),
                                               (7, 1.0, 7), (393216, 0.1, 39322)])
def test_topk_count_is_the_nearest_integer_at_least_one(count, density, k):
    assert topk_count(count, density) == k


@pytest.mark.parametrize("text", ["int8", "nf4", "topk:density=0.5"])
def test_quantizers_refuse_non_finite_values_naming_the_codecs_that_carry_them(text):
    x = torch.tensor([1.0, float("nan"), 2.0])
    with pytest.raises(ValueError, match="cannot encode NaN or infinite values; send this tensor with fp32"):
        encode_tensor(x, parse_codec(text))
    # The casts carry them as they are.
    assert torch.isnan(roundtrip(x, parse_codec("fp16"))[1]) and torch.isnan(roundtrip(x, parse_codec("bf16"))[1])


def test_lossy_codecs_take_floating_tensors_only():
    with pytest.raises(ValueError, match="takes float32, float16 or bfloat16 tensors, not torch.int64"):
        encode_tensor(torch.arange(4), parse_codec("int8"))
    with pytest.raises(ValueError, match="not torch.int64"):
        encoded_nbytes((4,), torch.int64, parse_codec("fp16"))


# ------------------------------------------------------------ error feedback


@pytest.mark.parametrize("text", ["topk:density=0.1", "int8", "nf4"])
def test_error_feedback_carries_the_residual_sum_received_is_sum_sent_minus_the_last_residual(text):
    spec, feedback = parse_codec(text), ErrorFeedback()
    inputs = [_sample((8, 24), seed=s) for s in range(30)]
    received = [roundtrip(feedback.correct("up", x, spec), spec) for x in inputs]
    total_in, total_received = torch.stack(inputs).sum(0), torch.stack(received).sum(0)
    assert torch.allclose(total_received, total_in - feedback.residual("up"), atol=1e-4)
    # The residual stays bounded: it is what one roundtrip leaves out, not a growing sum.
    assert feedback.residual("up").abs().max() < 30 * 3 * 4


def test_topk_with_error_feedback_sends_a_tensor_whole_within_one_over_density_steps():
    spec, feedback = parse_codec("topk:density=0.1"), ErrorFeedback()
    c = torch.full((6, 10), 1.25)  # exact in fp16: what arrives must add up exactly
    steps = round(1 / 0.1)
    received = torch.zeros_like(c)
    for step in range(steps):
        sent = feedback.correct(("c", "up"), c if step == 0 else torch.zeros_like(c), spec)
        arrived = roundtrip(sent, spec)
        assert int((arrived != 0).sum()) == 6  # 10% of 60 each step
        received += arrived
    assert torch.equal(received, c)
    assert torch.equal(feedback.residual(("c", "up")), torch.zeros_like(c))


def test_without_error_feedback_topk_never_sends_the_small_entries():
    spec = parse_codec("topk:density=0.1")
    c = torch.linspace(1, 2, 60)
    received = sum(roundtrip(c, spec) for _ in range(10))
    assert int((received == 0).sum()) == 54  # the same 6 every step: why top-k keeps a residual


def test_error_feedback_keeps_one_residual_per_key_drops_a_mismatched_one_and_is_a_no_op_when_lossless():
    spec, feedback = parse_codec("topk:density=0.5"), ErrorFeedback()
    x = torch.tensor([4.0, 3.0, 2.0, 1.0])
    feedback.correct("a", x, spec)
    assert feedback.residual("a").tolist() == [0.0, 0.0, 2.0, 1.0] and feedback.residual("b") is None
    # A new shape (another sequence length): the old residual cannot be added, so it goes.
    y = torch.ones(6)
    assert torch.equal(feedback.correct("a", y, spec), y)
    assert feedback.residual("a").shape == (6,)
    # Lossless: the tensor goes as it is, and the key holds nothing.
    assert feedback.correct("a", x, RAW) is x and feedback.residual("a") is None


# ------------------------------------------------------------ on the wire


def _message() -> Message:
    return Message("forward", client="c", step=3,
                   tensors={"hidden": _sample((2, 5, 33)), "attention_mask": torch.ones(2, 5, dtype=torch.uint8),
                            "grad": _sample((2, 5, 33), seed=1)})


def test_the_tensors_named_in_the_codec_map_go_in_their_codec_and_the_rest_raw():
    msg = _message()
    codecs = {"hidden": parse_codec("int8:outliers=2"), "grad": parse_codec("topk:density=0.2"),
              "labels": parse_codec("fp16")}  # a name the message lacks is ignored
    frames = encode(msg, codecs)
    header = msgpack.unpackb(bytes(frames[0]))
    entries = {e["name"]: e for e in header["tensors"]}
    assert entries["hidden"]["codec"] == "int8" and entries["hidden"]["params"] == {"outliers": 2}
    assert entries["grad"]["codec"] == "topk" and entries["grad"]["params"] == {"density": 0.2}
    assert entries["attention_mask"]["codec"] == "raw" and "params" not in entries["attention_mask"]
    out = decode([bytes(f) for f in frames])
    for name, spec in [("hidden", codecs["hidden"]), ("grad", codecs["grad"]), ("attention_mask", RAW)]:
        assert torch.equal(out.tensors[name], roundtrip(msg.tensors[name], spec))
    assert bytes(frames[0]) == bytes(encode(msg, codecs)[0])  # deterministic: a resend is the same bytes
    assert [bytes(f) for f in encode(msg)] == [bytes(f) for f in encode(msg, {})]


def test_encode_refuses_a_lossy_codec_for_a_tensor_that_is_not_floating():
    with pytest.raises(WireError, match="tensor attention_mask: the int8 codec takes float32"):
        encode(_message(), {"attention_mask": parse_codec("int8")})
    with pytest.raises(WireError, match="tensor hidden: the topk codec cannot encode NaN"):
        encode(Message("ok", tensors={"hidden": torch.tensor([float("nan")])}), {"hidden": parse_codec("topk:density=1")})


def _frames(entry: dict, payload: bytes) -> list[bytes]:
    header = {"v": 1, "op": "ok", "client": "c", "step": 0, "meta": {}, "tensors": [entry]}
    return [msgpack.packb(header), payload]


def _valid(text: str, x: torch.Tensor) -> tuple[dict, bytes]:
    """The entry and payload of ``x`` in codec ``text``, as encode writes them."""
    frames = encode(Message("ok", tensors={"x": x}), {"x": parse_codec(text)})
    return msgpack.unpackb(bytes(frames[0]))["tensors"][0], bytes(frames[1])


@pytest.mark.parametrize("change, expected", [
    ({"params": {"outliers": 2, "gamma": 1}}, "codec int8 has no parameter 'gamma'; its parameters: outliers"),
    ({"params": {"outliers": "2"}}, "codec param 'outliers' must be a number, not '2'"),
    ({"params": {"outliers": True}}, "must be a number, not True"),
    ({"params": {"outliers": 2.0}}, "outliers must be an integer, not 2.0"),
    ({"params": {"outliers": 100000}}, "outliers=100000 is out of range"),
    ({"params": [2]}, "codec params must be a map, not a list of 1"),
    ({"params": {b"outliers": 1}}, "codec param names must be strings, not 8 bytes"),
    ({"codec": "raw", "params": {}}, "shape [2, 40] in float32 (raw) is 320"),
    ({"codec": "raw", "params": {"outliers": 2}}, "codec fp32 has no parameter 'outliers'"),
    ({"dtype": "int32"}, "the int8:outliers=2 codec takes float32, float16 or bfloat16 tensors, not torch.int32"),
    ({"params": {"outliers": 3}}, "(int8:outliers=3) is"),
    ({"codec": "int4"}, "unknown codec 'int4'; known: raw, fp16, bf16, int8, nf4, topk"),
])
def test_a_bad_codec_entry_is_refused_naming_what_is_wrong(change, expected):
    entry, payload = _valid("int8:outliers=2", _sample((2, 40)))
    entry.update(change)
    with pytest.raises(WireError) as info:
        decode(_frames(entry, payload))
    assert expected in str(info.value)


def test_topk_needs_its_density_on_the_wire():
    entry, payload = _valid("topk:density=0.25", _sample((8,)))
    del entry["params"]
    with pytest.raises(WireError, match="tensor x: codec topk needs density"):
        decode(_frames(entry, payload))


def _patched(payload: bytes, at: int, data: bytes) -> bytes:
    return payload[:at] + data + payload[at + len(data):]


def _i32(*values) -> bytes:
    return torch.tensor(values, dtype=torch.int32).numpy().tobytes()


def _f32(*values) -> bytes:
    return torch.tensor(values, dtype=torch.float32).numpy().tobytes()


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("text, at, data, expected", [
    # topk of 8 at density 0.25: [indices: 2 x int32][values: 2 x fp16][exponent: int16]
    ("topk:density=0.25", 0, _i32(3, 3), "topk indices must be strictly increasing"),
    ("topk:density=0.25", 0, _i32(5, 2), "topk indices must be strictly increasing"),
    ("topk:density=0.25", 0, _i32(1, 8), "topk indices must lie in 0..7"),
    ("topk:density=0.25", 0, _i32(-1, 2), "topk indices must lie in 0..7"),
    ("topk:density=0.25", 12, torch.tensor([500], dtype=torch.int16).numpy().tobytes(),
     "the fp16 scale exponent 500 is outside -163..113"),
    # int8 of 2 x 4: [scales: 2 x float32][codes: 8 x int8]
    ("int8", 0, _f32(NAN), "int8 row scales must be finite and non-negative"),
    ("int8", 4, _f32(-1.0), "int8 row scales must be finite and non-negative"),
    ("int8", 0, _f32(INF), "int8 row scales must be finite and non-negative"),
    ("int8", 8, bytes([0x80]), "int8 codes must lie in -127..127"),
    # int8 with an outlier channel: [scales][channel: int32][fp16 frame of 2][codes]
    ("int8:outliers=1", 8, _i32(4), "int8 outlier channels must lie in 0..3"),
    # nf4 of 7 in blocks of 4: [absmax: 2 x float32][codes: 4 bytes, the last low nibble padding]
    ("nf4:block=4", 4, _f32(NAN), "nf4 block absmax values must be finite and non-negative"),
    ("nf4:block=4", 11, bytes([0x71]), "the padding nibble after an odd count of values must be 0"),
])
def test_a_payload_inconsistent_with_its_codec_is_refused(text, at, data, expected):
    shape = (8,) if text.startswith("topk") else (7,) if text.startswith("nf4") else (2, 4)
    entry, payload = _valid(text, _sample(shape))
    assert decode(_frames(entry, payload)).tensors["x"].shape == shape  # the untouched payload decodes
    with pytest.raises(WireError) as info:
        decode(_frames(entry, _patched(payload, at, data)))
    assert f"tensor x: the {parse_codec(text).wire_name} codec could not decode its frame" in str(info.value)
    assert expected in str(info.value)


# ------------------------------------------------------------ fuzz


HOSTILE = [None, True, 1, -1, 2**63 - 1, 2**64 - 1, float("nan"), float("inf"), -0.0, 1e-300, 1.5, "", "x" * 5000,
           b"\x00", [], [1, [2]], {}, {"a": None}, {"density": "0.1"}, {"density": [0.1]}, {"outliers": {"a": 1}},
           {"block": 0}, {"block": 2**63 - 1}, {"x" * 5000: 1}]
CODEC_TEXTS = ["fp16", "bf16", "int8", "int8:outliers=2", "nf4", "nf4:block=6", "topk:density=0.3", "topk:density=1"]
SMALL_SHAPES = st.sampled_from([(), (0,), (1,), (5,), (2, 3), (3, 0), (1, 2, 7)])


@pytest.mark.parametrize("value", HOSTILE, ids=lambda v: type(v).__name__)
@pytest.mark.parametrize("codec", ["raw", "fp16", "int8", "nf4", "topk"])
def test_any_params_value_is_refused_by_name_or_accepted_as_a_valid_spec(codec, value):
    entry = {"name": "x", "dtype": "float32", "shape": [2], "codec": codec, "nbytes": 8, "params": value}
    try:
        out = decode(_frames(entry, bytes(8)))
    except WireError as exc:
        text = str(exc)
        assert "param" in text or "codec" in text or "bytes" in text, text
        assert len(text) < 600, "an error quotes a peer's value whole"
        return
    assert value == {} and codec in ("raw", "fp16") and out.tensors["x"].shape == (2,)


@st.composite
def hostile_frames(draw):
    """A valid entry and payload of a lossy codec, then the payload's bytes
    overwritten in one place, or all of them random."""
    text, shape = draw(st.sampled_from(CODEC_TEXTS)), draw(SMALL_SHAPES)
    dtype = draw(st.sampled_from(FLOATS))
    values = draw(st.lists(st.floats(-1e4, 1e4, width=32), min_size=math.prod(shape), max_size=math.prod(shape)))
    entry, payload = _valid(text, torch.tensor(values, dtype=torch.float32).reshape(shape).to(dtype))
    if payload and draw(st.booleans()):
        at = draw(st.integers(0, len(payload) - 1))
        payload = _patched(payload, at, draw(st.binary(min_size=1, max_size=len(payload) - at)))
    elif payload:
        payload = draw(st.binary(min_size=len(payload), max_size=len(payload)))
    return entry, payload, shape, dtype


@settings(max_examples=400, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(hostile_frames())
def test_any_payload_of_the_right_length_decodes_to_the_header_shape_and_dtype_or_is_refused(case):
    entry, payload, shape, dtype = case
    try:
        out = decode(_frames(entry, payload)).tensors["x"]
    except WireError as exc:
        assert "could not decode its frame" in str(exc)
        return
    assert tuple(out.shape) == shape and out.dtype == dtype


@settings(max_examples=120, deadline=None, database=None, derandomize=True)
@given(st.sampled_from(CODEC_TEXTS), st.lists(st.integers(0, 40), max_size=3), st.sampled_from(FLOATS))
def test_the_frame_size_is_a_pure_function_of_shape_dtype_and_params(text, shape, dtype):
    spec, shape = parse_codec(text), tuple(shape)
    x = torch.zeros(shape, dtype=dtype)
    assert memoryview(encode_tensor(x, spec)).nbytes == encoded_nbytes(shape, dtype, spec)
