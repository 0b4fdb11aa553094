"""The wire: message schema, multipart framing and validation.

A message is one ZeroMQ multipart message::

    [header, tensor_0, tensor_1, ...]

The header is msgpack: protocol version, op, client id, step id, a small
``meta`` map of plain values, and per tensor its name, dtype, shape, codec
(with its ``params`` map when it has any) and byte count. Tensor frames are
the codec's buffers; the lossless codec's are sent without copying. Nothing is
ever unpickled: a header is plain data checked against the schema before any
tensor is built, and a message that fails any check raises ``WireError`` with
what was wrong.

``decode`` is total: whatever bytes a peer sends, it returns a ``Message`` or
raises ``WireError``, and never builds more than a bounded number of objects.
Every header field is type-checked before it is used, so a list where a string
belongs is refused by name rather than failing deep inside a lookup.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import msgpack
import torch

from .codecs import CODECS, DTYPE_NAMES, DTYPES, RAW, CodecSpec, check_dtype, decode_tensor, encode_tensor, \
    encoded_nbytes, spec_for_wire

PROTOCOL = 1
REQUESTS = ("hello", "forward", "backward", "adapter", "bye", "status", "join", "round", "upload", "ping", "probe",
            "plan")
REPLIES = ("ok", "error")
OPS = REQUESTS + REPLIES
META_TYPES = (str, int, float, bool, type(None))
# Steps are int64 wherever they end up (seeds, logs); msgpack allows up to 2**64 - 1.
MAX_STEP = (1 << 63) - 1


class WireError(ValueError):
    """A message that does not follow the protocol."""


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts."""

    max_tensor_bytes: int = 1 << 30
    max_message_bytes: int = 2 << 30
    max_tensors: int = 4096
    # Sized from the largest legitimate headers, which list tensors: an upload
    # of max_tensors (4096) factors is 0.34 MB (84 bytes an entry); for every
    # linear module of a 70B Llama (560), an upload is 93 KB, a round offer
    # with deltas 138 KB, a join naming them and 1,000 labels 32 KB.
    max_header_bytes: int = 1 << 20
    max_ndim: int = 8
    max_client_id: int = 128
    max_tensor_name: int = 1024
    # Values in one header, all maps and lists together: a 1-byte msgpack value
    # becomes a Python object of 50+ bytes, so the header's byte limit alone
    # would let a 16 MiB header grow to about a gigabyte.
    max_header_items: int = 1 << 18


@dataclass
class Message:
    """One request or reply."""

    op: str
    client: str = ""
    step: int = 0
    meta: dict = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    # The codec each named tensor travels in (the rest raw), set when the
    # message is built: a resend or a cached reply encodes the same way.
    codecs: dict[str, CodecSpec] = field(default_factory=dict)


def encode(msg: Message, codecs: Mapping[str, CodecSpec] | None = None) -> list:
    """Frames for ``msg``: a msgpack header, then one buffer per tensor (zero-copy
    for the lossless codec). The tensors named in ``codecs`` (by default the
    message's own ``codecs``) go in that codec, every other one raw; a name
    ``msg`` lacks is ignored. Encoding is a pure
    function of the message: error feedback is applied when a message is
    built, never here, so a message resent or replayed from a cache is the same
    bytes and updates no residual twice."""
    entries, frames = [], []
    for name, tensor in msg.tensors.items():
        if tensor.dtype not in DTYPE_NAMES:
            raise WireError(f"tensor {name}: dtype {tensor.dtype} cannot be sent")
        spec = (msg.codecs if codecs is None else codecs).get(name, RAW)
        try:
            buf = encode_tensor(tensor, spec)
        except ValueError as exc:
            raise WireError(f"tensor {name}: {exc}") from None
        entry = {"name": name, "dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                 "codec": spec.wire_name, "nbytes": memoryview(buf).nbytes}
        if spec.params:
            entry["params"] = dict(spec.params)
        entries.append(entry)
        frames.append(buf)
    header = {"v": PROTOCOL, "op": msg.op, "client": msg.client, "step": msg.step,
              "meta": msg.meta, "tensors": entries}
    return [msgpack.packb(header, use_bin_type=True)] + frames


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise WireError(what)


def _is_int(value) -> bool:
    # bool is an int subclass, and msgpack keeps true/false apart from 1/0.
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value) -> str:
    """A short description of any decoded value, for error messages: a peer's
    value is never repr'd whole (a 16 MiB string or a deep list would make the
    error reply as large as the attack)."""
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else repr(value[:40]) + f"... ({len(value)} characters)"
    if isinstance(value, (bytes, bytearray)):
        return f"{len(value)} bytes"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return f"a map of {len(value)}"
    return f"a {type(value).__name__}"


def _check_meta(meta, path="meta", depth=0) -> None:
    _check(depth < 4, f"{path} is nested too deeply")
    if isinstance(meta, dict):
        for k, v in meta.items():
            _check(isinstance(k, str), f"{path} keys must be strings, not {_show(k)}")
            _check_meta(v, f"{path}.{k[:40]}", depth + 1)
    elif isinstance(meta, list):
        for i, v in enumerate(meta):
            _check_meta(v, f"{path}[{i}]", depth + 1)
    else:
        _check(isinstance(meta, META_TYPES), f"{path} holds {_show(meta)}, not a plain value")


def frame_len(frame) -> int:
    """Bytes in a frame (zmq.Frame, bytes or memoryview)."""
    buf = getattr(frame, "buffer", frame)
    return memoryview(buf).nbytes


def _unpack_header(raw: bytes, limits: Limits):
    """The header's msgpack value, within ``limits``: no ext types (timestamps
    included), no container longer than ``max_header_items``, and at most
    ``max_header_items`` values in all. msgpack's own stack bounds nesting."""
    count = 0

    def counted(container):
        # Called on each map and list once it is built, inner ones first: the sum
        # of their lengths is the number of values, so parsing stops within one
        # container of the budget.
        nonlocal count
        count += 2 * len(container) if isinstance(container, dict) else len(container)
        if count > limits.max_header_items:
            raise WireError(f"header holds more than {limits.max_header_items} values")
        return container

    n = limits.max_header_items
    try:
        return msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True, object_hook=counted,
                               list_hook=counted, max_array_len=n, max_map_len=n, max_ext_len=0,
                               max_str_len=len(raw), max_bin_len=len(raw))
    except WireError:
        raise
    except Exception as exc:
        # StackError (nesting deeper than msgpack's stack) carries no text of its own.
        detail = str(exc)[:200] or "nested too deeply"
        raise WireError(f"header is not valid msgpack ({type(exc).__name__}: {detail})") from None


def _check_header(header, limits: Limits) -> None:
    """The message-level fields: version, op, client id, step, meta, tensor list."""
    _check(isinstance(header, dict), f"header must be a map, not {_show(header)}")
    version = header.get("v")
    _check(_is_int(version) and version == PROTOCOL, f"protocol version {_show(version)} is not {PROTOCOL}")
    op = header.get("op")
    _check(isinstance(op, str) and op in OPS, f"unknown op {_show(op)}; known: {', '.join(OPS)}")
    client = header.get("client", "")
    _check(isinstance(client, str) and len(client) <= limits.max_client_id,
           f"client id must be a string of at most {limits.max_client_id} characters, not {_show(client)}")
    step = header.get("step", 0)
    _check(_is_int(step) and 0 <= step <= MAX_STEP, f"step must be an integer in 0..2**63-1, not {_show(step)}")
    meta = header.get("meta", {})
    _check(isinstance(meta, dict), f"meta must be a map, not {_show(meta)}")
    _check_meta(meta)
    entries = header.get("tensors", [])
    _check(isinstance(entries, list), f"tensors must be a list, not {_show(entries)}")
    _check(len(entries) <= limits.max_tensors, f"{len(entries)} tensors exceed the limit of {limits.max_tensors}")


def _check_shape(shape, name: str, limits: Limits) -> tuple[int, ...]:
    """A shape torch can build: at most ``max_ndim`` dims of non-negative ints
    whose product, zeros counted as ones, fits the tensor byte limit. An empty
    tensor has no bytes to check its dims against, and ``(0, 2**62, 2**62)``
    would overflow torch's strides."""
    _check(isinstance(shape, list) and len(shape) <= limits.max_ndim
           and all(_is_int(d) and d >= 0 for d in shape),
           f"tensor {name}: shape must be a list of at most {limits.max_ndim} non-negative integers, "
           f"not {_show(shape)}")
    extent = 1
    for d in shape:
        extent *= max(d, 1)  # stays small: it stops growing once past the limit
        _check(extent <= limits.max_tensor_bytes,
               f"tensor {name}: shape {shape} spans more than {limits.max_tensor_bytes} elements")
    return tuple(shape)


def _check_params(params, name: str) -> dict:
    """A header entry's codec parameters: a map of names to numbers (their
    ranges are the codec's to check)."""
    _check(isinstance(params, dict), f"tensor {name}: codec params must be a map, not {_show(params)}")
    for key, value in params.items():
        _check(isinstance(key, str), f"tensor {name}: codec param names must be strings, not {_show(key)}")
        _check(isinstance(value, (int, float)) and not isinstance(value, bool),
               f"tensor {name}: codec param {key[:40]!r} must be a number, not {_show(value)}")
    return params


def _check_entry(entry, seen: dict, limits: Limits) -> tuple[str, str, tuple[int, ...], CodecSpec, int]:
    """One tensor entry's fields: (name, dtype, shape, codec spec, nbytes),
    each type-checked before it is looked up or used."""
    _check(isinstance(entry, dict), f"each tensor entry must be a map, not {_show(entry)}")
    name = entry.get("name")
    _check(isinstance(name, str) and 0 < len(name) <= limits.max_tensor_name and name not in seen,
           f"bad or repeated tensor name {_show(name)} (a new string of 1..{limits.max_tensor_name} characters)")
    dtype = entry.get("dtype")
    _check(isinstance(dtype, str) and dtype in DTYPES,
           f"tensor {name}: dtype {_show(dtype)} not allowed; allowed: {', '.join(DTYPES)}")
    shape = _check_shape(entry.get("shape"), name, limits)
    codec = entry.get("codec")
    _check(isinstance(codec, str) and codec in CODECS,
           f"tensor {name}: unknown codec {_show(codec)}; known: {', '.join(CODECS)}")
    params = _check_params(entry.get("params", {}), name)
    try:
        spec = spec_for_wire(codec, params)
        check_dtype(spec, DTYPES[dtype])
    except ValueError as exc:
        raise WireError(f"tensor {name}: {exc}") from None
    nbytes = entry.get("nbytes")
    _check(_is_int(nbytes) and nbytes >= 0, f"tensor {name}: nbytes must be an integer >= 0, not {_show(nbytes)}")
    _check(nbytes <= limits.max_tensor_bytes,
           f"tensor {name}: {nbytes} bytes exceed the limit of {limits.max_tensor_bytes}")
    expected = encoded_nbytes(shape, DTYPES[dtype], spec)
    label = codec if spec.lossless else spec.text
    _check(nbytes == expected,
           f"tensor {name}: header says {nbytes} bytes, but shape {list(shape)} in {dtype} ({label}) is {expected}")
    return name, dtype, shape, spec, nbytes


def _build_tensor(frame, name: str, dtype: str, shape: tuple[int, ...], spec: CodecSpec) -> torch.Tensor:
    """The tensor a checked entry describes. A payload of the right size can
    still be inconsistent (a lossy codec's NaN scale or repeated index): that
    is the peer's fault, refused by name, not a reason to end the process."""
    buffer = getattr(frame, "buffer", frame)
    # A bool is one byte holding 0 or 1; other bytes make torch's bool ops undefined.
    if dtype == "bool" and spec.lossless and memoryview(buffer).nbytes:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a read-only buffer, only read
            _check(int(torch.frombuffer(buffer, dtype=torch.uint8).max()) <= 1,
                   f"tensor {name}: a bool tensor's bytes must be 0 or 1")
    try:
        return decode_tensor(buffer, shape, DTYPES[dtype], spec)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise WireError(f"tensor {name}: the {spec.wire_name} codec could not decode its frame ({exc})") from None


def decode(frames: list, limits: Limits = Limits()) -> Message:
    """Validate and decode received frames; raise ``WireError`` naming the
    problem. Total over any frames: nothing else is raised."""
    _check(len(frames) >= 1, "empty message")
    raw = frames[0]
    raw = raw.bytes if hasattr(raw, "bytes") else bytes(raw)
    _check(len(raw) <= limits.max_header_bytes,
           f"header of {len(raw)} bytes exceeds the limit of {limits.max_header_bytes}")
    header = _unpack_header(raw, limits)
    _check_header(header, limits)
    entries = header.get("tensors", [])
    _check(len(frames) == len(entries) + 1,
           f"header lists {len(entries)} tensors but {len(frames) - 1} tensor frames arrived")
    tensors: dict[str, torch.Tensor] = {}
    total = 0
    for entry, frame in zip(entries, frames[1:]):
        name, dtype, shape, spec, nbytes = _check_entry(entry, tensors, limits)
        got = frame_len(frame)
        _check(got == nbytes, f"tensor {name}: header says {nbytes} bytes, the frame holds {got}")
        total += nbytes
        _check(total <= limits.max_message_bytes,
               f"message exceeds the limit of {limits.max_message_bytes} bytes")
        tensors[name] = _build_tensor(frame, name, dtype, shape, spec)
    return Message(op=header["op"], client=header.get("client", ""), step=header.get("step", 0),
                   meta=header.get("meta", {}), tensors=tensors)


# What an error reply's ``code`` tells the client to do.
ERROR_CODES = {
    "malformed": "the request broke the protocol; sending it again will not help",
    "refused": "the server will not serve this request as it stands",
    "session": "the server holds no session for this client and token: register again with hello",
    "busy": "the server is at a limit now; the same request may succeed later",
    "failed": "the request failed on the server",
}


def error(client: str, step: int, text: str, code: str = "failed") -> Message:
    """An error reply whose ``code`` (one of ``ERROR_CODES``) says what the client can do about it."""
    if code not in ERROR_CODES:
        raise ValueError(f"unknown error code {code!r}; known: {', '.join(ERROR_CODES)}")
    return Message(op="error", client=client, step=step, meta={"error": text, "code": code})
