"""The probe op: a round trip that carries a chosen number of bytes each way,
so a device can time its link to a server (``fedsplit profile --server``).

A request carries ``payload`` bytes up (one uint8 tensor, none for 0) and
asks for ``reply_bytes`` back; the reply carries them and says how many bytes
it received and the most a probe may carry either way (``max_bytes``). Like
``status``, a probe needs no session: a device measures its link before it
trains. Its cost to the server is bounded by ``probe_limit``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .protocol import ProtocolError
from .wire import Limits, Message

OP = "probe"
PAYLOAD = "payload"
# The most a probe carries either way: enough to time a link to a few percent
# (8 MiB take 0.07 s on Gigabit Ethernet), little enough for any server.
MAX_PROBE_BYTES = 8 << 20


def probe_limit(limits: Limits) -> int:
    """The most bytes a probe may carry either way under ``limits``."""
    return min(MAX_PROBE_BYTES, limits.max_tensor_bytes, limits.max_message_bytes)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _payload(msg: Message, what: str) -> int:
    """Bytes of the message's one payload tensor (0 without one); anything
    else in its tensors is refused."""
    extra = sorted(set(msg.tensors) - {PAYLOAD})
    if extra:
        raise ProtocolError(f"{what}: unexpected tensor {extra[0][:40]!r}; a probe carries at most one, "
                            f"{PAYLOAD!r}")
    tensor = msg.tensors.get(PAYLOAD)
    if tensor is None:
        return 0
    if tensor.dtype != torch.uint8 or tensor.dim() != 1:
        raise ProtocolError(f"{what}: tensor {PAYLOAD!r} must be a 1-D uint8 tensor, got {tensor.dim()}-D "
                            f"{str(tensor.dtype).removeprefix('torch.')}")
    return tensor.numel()


@dataclass(frozen=True)
class ProbeRequest:
    """``payload`` bytes up, ``reply_bytes`` asked back."""

    payload: int = 0
    reply_bytes: int = 0

    def to_message(self) -> Message:
        tensors = {PAYLOAD: torch.zeros(self.payload, dtype=torch.uint8)} if self.payload else {}
        return Message(OP, meta={"reply_bytes": self.reply_bytes}, tensors=tensors)

    @classmethod
    def from_message(cls, msg: Message) -> "ProbeRequest":
        """The request in ``msg``, checked: field types and signs, the one
        payload tensor. Sizes are checked against a limit by the server."""
        reply_bytes = msg.meta.get("reply_bytes")
        if not _count(reply_bytes):
            raise ProtocolError(f"{OP}: field 'reply_bytes' must be an integer >= 0, got {reply_bytes!r}"[:200])
        return cls(_payload(msg, OP), reply_bytes)


@dataclass(frozen=True)
class ProbeReply:
    """What the server received, the bytes it sent back, and its limit."""

    received: int
    payload: int
    max_bytes: int

    @classmethod
    def from_message(cls, msg: Message, request: ProbeRequest) -> "ProbeReply":
        """The reply in ``msg`` to ``request``, checked against it."""
        what = f"{OP} reply"
        fields = {key: msg.meta.get(key) for key in ("received", "max_bytes")}
        for key, value in fields.items():
            if not _count(value):
                raise ProtocolError(f"{what}: field {key!r} must be an integer >= 0, got {value!r}"[:200])
        reply = cls(fields["received"], _payload(msg, what), fields["max_bytes"])
        if reply.received != request.payload or reply.payload != request.reply_bytes:
            raise ProtocolError(f"{what}: the server received {reply.received} bytes and sent {reply.payload}; "
                                f"the request carried {request.payload} and asked for {request.reply_bytes}")
        return reply
