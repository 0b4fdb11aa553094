"""The wire: message schema, multipart framing and validation.

A message is one ZeroMQ multipart message::

    [header, tensor_0, tensor_1, ...]

The header is msgpack: protocol version, op, client id, step id, a small
``meta`` map of plain values, and per tensor its name, dtype, shape, codec and
byte count. Tensor frames are the raw buffers, sent without copying. Nothing is
ever unpickled: a header is plain data checked against the schema before any
tensor is built, and a message that fails any check raises ``WireError`` with
what was wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgpack
import torch

from .codecs import CODECS, DTYPE_NAMES, DTYPES, get_codec

PROTOCOL = 1
REQUESTS = ("hello", "forward", "backward", "adapter", "bye", "status", "join", "round", "upload", "ping")
REPLIES = ("ok", "error")
OPS = REQUESTS + REPLIES
META_TYPES = (str, int, float, bool, type(None))


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


@dataclass
class Message:
    """One request or reply."""

    op: str
    client: str = ""
    step: int = 0
    meta: dict = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def encode(msg: Message, codec: str = "raw") -> list:
    """Frames for ``msg``: a msgpack header, then one zero-copy buffer per tensor."""
    c = get_codec(codec)
    entries, frames = [], []
    for name, tensor in msg.tensors.items():
        if tensor.dtype not in DTYPE_NAMES:
            raise WireError(f"tensor {name}: dtype {tensor.dtype} cannot be sent")
        buf = c.encode(tensor)
        entries.append({"name": name, "dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "codec": c.name, "nbytes": len(buf)})
        frames.append(buf)
    header = {"v": PROTOCOL, "op": msg.op, "client": msg.client, "step": msg.step,
              "meta": msg.meta, "tensors": entries}
    return [msgpack.packb(header, use_bin_type=True)] + frames


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise WireError(what)


def _check_meta(meta, path="meta", depth=0) -> None:
    _check(depth < 4, f"{path} is nested too deeply")
    if isinstance(meta, dict):
        for k, v in meta.items():
            _check(isinstance(k, str), f"{path} keys must be strings")
            _check_meta(v, f"{path}.{k}", depth + 1)
    elif isinstance(meta, list):
        for i, v in enumerate(meta):
            _check_meta(v, f"{path}[{i}]", depth + 1)
    else:
        _check(isinstance(meta, META_TYPES), f"{path} holds a {type(meta).__name__}, not a plain value")


def frame_len(frame) -> int:
    """Bytes in a frame (zmq.Frame, bytes or memoryview)."""
    buf = getattr(frame, "buffer", frame)
    return memoryview(buf).nbytes


def decode(frames: list, limits: Limits = Limits()) -> Message:
    """Validate and decode received frames; raise ``WireError`` naming the problem."""
    _check(len(frames) >= 1, "empty message")
    raw = frames[0]
    raw = raw.bytes if hasattr(raw, "bytes") else bytes(raw)
    _check(len(raw) <= limits.max_header_bytes,
           f"header of {len(raw)} bytes exceeds the limit of {limits.max_header_bytes}")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:
        raise WireError(f"header is not valid msgpack ({type(exc).__name__})") from None
    _check(isinstance(header, dict), "header must be a map")
    _check(header.get("v") == PROTOCOL, f"protocol version {header.get('v')!r} is not {PROTOCOL}")
    op = header.get("op")
    _check(op in OPS, f"unknown op {op!r}; known: {', '.join(OPS)}")
    client = header.get("client", "")
    _check(isinstance(client, str) and len(client) <= limits.max_client_id,
           f"client id must be a string of at most {limits.max_client_id} characters")
    step = header.get("step", 0)
    _check(isinstance(step, int) and not isinstance(step, bool) and step >= 0, "step must be an integer >= 0")
    meta = header.get("meta", {})
    _check(isinstance(meta, dict), "meta must be a map")
    _check_meta(meta)
    entries = header.get("tensors", [])
    _check(isinstance(entries, list), "tensors must be a list")
    _check(len(entries) <= limits.max_tensors, f"{len(entries)} tensors exceed the limit of {limits.max_tensors}")
    _check(len(frames) == len(entries) + 1,
           f"header lists {len(entries)} tensors but {len(frames) - 1} tensor frames arrived")
    tensors: dict[str, torch.Tensor] = {}
    total = 0
    for entry, frame in zip(entries, frames[1:]):
        _check(isinstance(entry, dict), "each tensor entry must be a map")
        name = entry.get("name")
        _check(isinstance(name, str) and name and name not in tensors, f"bad or repeated tensor name {name!r}")
        dtype = entry.get("dtype")
        _check(dtype in DTYPES, f"tensor {name}: dtype {dtype!r} not allowed; allowed: {', '.join(DTYPES)}")
        shape = entry.get("shape")
        _check(isinstance(shape, list) and len(shape) <= limits.max_ndim
               and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape),
               f"tensor {name}: shape must be a list of at most {limits.max_ndim} non-negative integers")
        codec = entry.get("codec")
        _check(codec in CODECS, f"tensor {name}: unknown codec {codec!r}; known: {', '.join(CODECS)}")
        nbytes = entry.get("nbytes")
        _check(isinstance(nbytes, int) and nbytes >= 0, f"tensor {name}: nbytes must be an integer >= 0")
        _check(nbytes <= limits.max_tensor_bytes,
               f"tensor {name}: {nbytes} bytes exceed the limit of {limits.max_tensor_bytes}")
        expected = CODECS[codec].nbytes(tuple(shape), DTYPES[dtype])
        _check(nbytes == expected,
               f"tensor {name}: header says {nbytes} bytes, but shape {shape} in {dtype} ({codec}) is {expected}")
        got = frame_len(frame)
        _check(got == nbytes, f"tensor {name}: header says {nbytes} bytes, the frame holds {got}")
        total += nbytes
        _check(total <= limits.max_message_bytes,
               f"message exceeds the limit of {limits.max_message_bytes} bytes")
        tensors[name] = CODECS[codec].decode(getattr(frame, "buffer", frame), tuple(shape), DTYPES[dtype])
    return Message(op=op, client=client, step=step, meta=meta, tensors=tensors)


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
