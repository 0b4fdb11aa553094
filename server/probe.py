"""The server's side of the probe op (split/probe.py): a loop-thread answer
that carries the bytes a client asked for, within a bound."""

from __future__ import annotations

import threading

import torch

from split.probe import OP, PAYLOAD, ProbeRequest, probe_limit
from split.wire import Limits, Message

from .sessions import RequestError


class ProbeResponder:
    """Answers probes. Every reply sends a slice of one zero buffer of the
    limit's size, made at the first probe that asks for bytes: the wire sends
    it without copying, so a reply costs no allocation however many wait to be
    sent, and a server never probed holds no buffer."""

    def __init__(self, limits: Limits):
        self.limit = probe_limit(limits)
        self._zeros: torch.Tensor | None = None
        self._lock = threading.Lock()  # the loop answers probes; ``handle`` may too, from another thread

    def answer(self, msg: Message) -> Message:
        """The reply to probe ``msg``; a bad request raises (ProtocolError:
        malformed; RequestError: beyond the limit)."""
        request = ProbeRequest.from_message(msg)
        for what, size in (("carries", request.payload), ("asks for", request.reply_bytes)):
            if size > self.limit:
                raise RequestError(f"{OP}: the request {what} {size} bytes; a probe carries at most "
                                   f"{self.limit} bytes each way")
        tensors = {PAYLOAD: self._buffer()[:request.reply_bytes]} if request.reply_bytes else {}
        return Message("ok", msg.client, msg.step, meta={"received": request.payload, "max_bytes": self.limit},
                       tensors=tensors)

    def _buffer(self) -> torch.Tensor:
        with self._lock:
            if self._zeros is None:
                self._zeros = torch.zeros(self.limit, dtype=torch.uint8)
            return self._zeros
