"""Request/reply over a ZeroMQ DEALER socket: what a client (or a probe) uses
to talk to a fedsplit server, with timeouts and byte counts."""

from __future__ import annotations

import itertools
import logging
import time

import zmq

from .security import ClientKeys, HandshakeWatch, check_plain, secure_client
from .wire import ERROR_CODES, Limits, Message, WireError, decode, encode, frame_len

log = logging.getLogger(__name__)


class ServerUnavailable(ConnectionError):
    """The server did not answer in time."""


class ServerError(RuntimeError):
    """The server answered with an error; ``code`` is one of ``split.wire.ERROR_CODES``."""

    def __init__(self, text: str, code: str = "failed"):
        super().__init__(text)
        self.code = code


class HandshakeFailed(ServerError):
    """The server would not complete the ZeroMQ handshake: a key it does not
    accept, or encryption on one side only. The text names the likely cause."""

    def __init__(self, text: str):
        super().__init__(text, "refused")


class Connection:
    """Request/reply over a DEALER socket, with timeouts and byte counts.

    ``bytes_sent`` / ``bytes_received`` count the frames that crossed the
    socket (header and tensor frames), so meters report what the wire carried.
    ``token`` is the session token the server issued at hello: every request
    carries it, and the server serves a session only to its token. The
    socket's routing id is ZeroMQ's own random one, never chosen here.

    With ``keys`` the socket is a CurveZMQ client of the server whose public
    key they hold; without, ``address`` must be a loopback endpoint
    (``split/security.py``). A handshake the server refuses ends a request
    at once with ``HandshakeFailed``.
    """

    def __init__(self, address: str, client_id: str, timeout: float = 120.0, limits: Limits = Limits(),
                 keys: ClientKeys | None = None):
        if keys is None:
            check_plain(address, "--server", "--key and --server-key")
        self.keys = keys
        self.address = address
        self.client_id = client_id
        self.timeout = timeout
        self.limits = limits
        self.bytes_sent = 0
        self.bytes_received = 0
        self.messages = 0
        self.token = ""
        self._rid = itertools.count(1)
        self._connect()

    def _connect(self) -> None:
        """A DEALER socket to the server, encrypted when there are keys, with
        the monitor that reports a refused handshake."""
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if self.keys is not None:
            secure_client(self.socket, self.keys)
        self.watch = HandshakeWatch(self.socket, self.address, self.keys)
        self._pollers = {}
        for event in (zmq.POLLIN, zmq.POLLOUT):
            self._pollers[event] = poller = zmq.Poller()
            poller.register(self.socket, event)
            poller.register(self.watch.socket, zmq.POLLIN)
        self.socket.connect(self.address)

    def _wait(self, seconds: float, event: int = zmq.POLLIN) -> bool:
        """Wait up to ``seconds`` until a reply is there (POLLIN) or a message
        can be queued (POLLOUT: after a refused handshake ZeroMQ drops the
        connection and a send would block for ever); True when it is. A
        handshake the server refuses ends the wait with its reason."""
        deadline = time.monotonic() + seconds
        while True:
            if self.watch.refused:
                raise HandshakeFailed(self.watch.refused)
            ready = dict(self._pollers[event].poll(max(0, int((deadline - time.monotonic()) * 1000))))
            if self.watch.socket in ready:
                problem = self.watch.problem()
                if problem:
                    raise HandshakeFailed(problem)
            if self.socket in ready:
                return True
            if time.monotonic() >= deadline:
                return False

    def request(self, msg: Message, timeout: float | None = None) -> Message:
        """Send ``msg`` and wait for its reply; raise on timeout or error."""
        rid = next(self._rid)
        msg.client = self.client_id
        msg.meta = {**msg.meta, "rid": rid}
        if self.token:
            msg.meta["token"] = self.token
        frames = encode(msg)
        self.bytes_sent += sum(frame_len(f) for f in frames)
        wait = self.timeout if timeout is None else timeout
        if not self._wait(wait, zmq.POLLOUT):
            raise ServerUnavailable(f"could not send to the server at {self.address} within {wait:.0f}s (op "
                                    f"{msg.op}): ZeroMQ holds no connection to it that takes messages")
        self.socket.send_multipart(frames, copy=False)
        while True:
            if not self._wait(wait):
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
        """Close the socket and its monitor."""
        self.watch.close()
        self.socket.close(linger=0)
