"""Request/reply over a ZeroMQ DEALER socket: what a client (or a probe) uses
to talk to a fedsplit server, with timeouts and byte counts."""

from __future__ import annotations

import itertools
import logging

import zmq

from .wire import ERROR_CODES, Limits, Message, WireError, decode, encode, frame_len

log = logging.getLogger(__name__)


class ServerUnavailable(ConnectionError):
    """The server did not answer in time."""


class ServerError(RuntimeError):
    """The server answered with an error; ``code`` is one of ``split.wire.ERROR_CODES``."""

    def __init__(self, text: str, code: str = "failed"):
        super().__init__(text)
        self.code = code


class Connection:
    """Request/reply over a DEALER socket, with timeouts and byte counts.

    ``bytes_sent`` / ``bytes_received`` count the frames that crossed the
    socket (header and tensor frames), so meters report what the wire carried.
    ``token`` is the session token the server issued at hello: every request
    carries it, and the server serves a session only to its token. The
    socket's routing id is ZeroMQ's own random one, never chosen here.
    """

    def __init__(self, address: str, client_id: str, timeout: float = 120.0, limits: Limits = Limits()):
        self.address = address
        self.client_id = client_id
        self.timeout = timeout
        self.limits = limits
        self.bytes_sent = 0
        self.bytes_received = 0
        self.messages = 0
        self.token = ""
        self._rid = itertools.count(1)
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)

    def request(self, msg: Message, timeout: float | None = None) -> Message:
        """Send ``msg`` and wait for its reply; raise on timeout or error."""
        rid = next(self._rid)
        msg.client = self.client_id
        msg.meta = {**msg.meta, "rid": rid}
        if self.token:
            msg.meta["token"] = self.token
        frames = encode(msg)
        self.bytes_sent += sum(frame_len(f) for f in frames)
        self.socket.send_multipart(frames, copy=False)
        wait = self.timeout if timeout is None else timeout
        while True:
            if not self.socket.poll(int(wait * 1000)):
                raise ServerUnavailable(
                    f"no answer from the server at {self.address} within {wait:.0f}s (op {msg.op}). "
                    "Is `fedsplit server` running there, and is the address reachable from this machine?")
            reply_frames = self.socket.recv_multipart(copy=False)
            self.bytes_received += sum(frame_len(f) for f in reply_frames)
            self.messages += 1
            try:
                reply = decode(reply_frames, self.limits)
            except WireError as exc:
                raise ServerError(f"the server sent a malformed reply: {exc}") from None
            if reply.meta.get("rid") not in (rid, None):
                log.debug("dropping a late reply to request %s", reply.meta.get("rid"))
                continue
            if reply.op == "error":
                code = reply.meta.get("code")
                raise ServerError(str(reply.meta.get("error", "unknown error")),
                                  code if code in ERROR_CODES else "failed")
            return reply

    def close(self) -> None:
        self.socket.close(linger=0)
