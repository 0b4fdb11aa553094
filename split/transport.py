"""Request/reply over a ZeroMQ DEALER socket: what a client (or a probe) uses
to talk to a fedsplit server, with timeouts and byte counts."""

from __future__ import annotations

import itertools
import logging
import time

import zmq

from .wire import ERROR_CODES, REPLIES, Limits, Message, WireError, decode, encode, frame_len

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
        """Send ``msg`` and wait for its reply; raise on timeout or error.

        A reply that does not decode, or that is not a reply at all, is
        dropped with a warning and the wait goes on: whatever arrives on the
        socket, only the real reply or the deadline ends the wait."""
        rid = next(self._rid)
        msg.client = self.client_id
        msg.meta = {**msg.meta, "rid": rid}
        if self.token:
            msg.meta["token"] = self.token
        frames = encode(msg)
        self.bytes_sent += sum(frame_len(f) for f in frames)
        self.socket.send_multipart(frames, copy=False)
        wait = self.timeout if timeout is None else timeout
        # One deadline for the whole wait, so a stream of junk cannot extend it.
        deadline = time.monotonic() + wait
        while True:
            left_ms = max(0, int((deadline - time.monotonic()) * 1000))
            if not left_ms or not self.socket.poll(left_ms):
                raise ServerUnavailable(
                    f"no answer from the server at {self.address} within {wait:.0f}s (op {msg.op}). "
                    "Is `fedsplit server` running there, and is the address reachable from this machine?")
            reply = self._receive(rid)
            if reply is None:
                continue
            if reply.op == "error":
                code = reply.meta.get("code")
                # A code of any other type (a list, say) must not fail the lookup.
                raise ServerError(str(reply.meta.get("error", "unknown error")),
                                  code if isinstance(code, str) and code in ERROR_CODES else "failed")
            return reply

    def _receive(self, rid: int) -> Message | None:
        """One message off the socket: the reply to request ``rid`` (or an
        error the server could not tie to a request), else None."""
        reply_frames = self.socket.recv_multipart(copy=False)
        self.bytes_received += sum(frame_len(f) for f in reply_frames)
        self.messages += 1
        try:
            reply = decode(reply_frames, self.limits)
        except WireError as exc:
            log.warning("dropping a malformed reply from %s: %s", self.address, exc)
            return None
        except Exception:  # decode is meant to be total: a bug here, not the server's
            log.exception("dropping a reply from %s that could not be decoded", self.address)
            return None
        if reply.op not in REPLIES:
            log.warning("dropping a %r message from %s: not a reply", reply.op, self.address)
            return None
        # Replies to earlier requests arrive late after a timeout; None is the
        # server's malformed-message error, which cannot name a request.
        if reply.meta.get("rid") not in (rid, None):
            log.debug("dropping a late reply to request %r", reply.meta.get("rid"))
            return None
        return reply

    def close(self) -> None:
        self.socket.close(linger=0)
