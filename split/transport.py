"""Request/reply over a ZeroMQ DEALER socket: what a client (or a probe) uses
to talk to a fedsplit server, with timeouts, byte counts and retries.

A request that gets no answer (the connection dropped, or nothing came back
within the timeout) is sent again, unchanged, after an exponential backoff
with jitter, for as long as the connection's ``reconnect_for`` allows. The
resent request keeps its op, step and request id (``rid``), so a server that
did answer the first copy recognises the retry and answers it from its reply
cache instead of applying it twice (docs/architecture.md, "Retries").
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time

import zmq

from .security import ClientKeys, HandshakeWatch, check_plain, secure_client
from .wire import ERROR_CODES, REPLIES, Limits, Message, WireError, decode, encode, frame_len

log = logging.getLogger(__name__)

BACKOFF_FIRST = 0.2  # seconds before the first resend
BACKOFF_CAP = 5.0  # the longest pause between two resends
# ZMTP heartbeats on the socket: a server that answers none for this long is
# taken for dead (a crashed host sends no FIN), and the request is resent.
ZMTP_HEARTBEAT_MS, ZMTP_TIMEOUT_MS = 5_000, 15_000
POLL_SLICE_MS = 100  # how often a waiting request looks for a dropped connection


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


class SessionLost(ServerError):
    """The server holds no session for this client and token (it restarted, or
    the session expired): the client must register again with hello."""

    def __init__(self, text: str):
        super().__init__(text, "session")


def backoff(attempt: int, rng: random.Random) -> float:
    """The pause before resend number ``attempt`` (0-based): doubling from
    ``BACKOFF_FIRST`` up to ``BACKOFF_CAP``, times a random factor in [0.5, 1]
    so that clients cut off together do not all come back in the same instant."""
    return min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** attempt) * rng.uniform(0.5, 1.0)


class Connection:
    """Request/reply over a DEALER socket, with timeouts, byte counts and retries.

    ``bytes_sent`` / ``bytes_received`` count the frames that crossed the
    socket (header and tensor frames, resends included), so meters report what
    the wire carried. ``token`` is the session token the server issued at
    hello: every request carries it, and the server serves a session only to
    its token. The socket's routing id is ZeroMQ's own random one, never
    chosen here. ``reconnect_for`` is how many seconds after a first failure a
    request keeps being resent (0: never).

    With ``keys`` the socket is a CurveZMQ client of the server whose public
    key they hold; without, ``address`` must be a loopback endpoint
    (``split/security.py``). A handshake the server refuses ends a request
    at once with ``HandshakeFailed``: no resend can change a refused key.

    ``shaper``, when set (``edge.emulate.EmulatedDevice``), is told the size
    of every message before it is sent (``on_send``) and after one arrived
    (``on_receive``), and may hold it there: an emulated device's link.
    """

    def __init__(self, address: str, client_id: str, timeout: float = 120.0, limits: Limits = Limits(),
                 reconnect_for: float = 0.0, keys: ClientKeys | None = None):
        if reconnect_for < 0:
            raise ValueError(f"reconnect_for must be >= 0 seconds, got {reconnect_for}")
        if keys is None:
            check_plain(address, "--server", "--key and --server-key")
        self.keys = keys
        self.address = address
        self.client_id = client_id
        self.timeout = timeout
        self.limits = limits
        self.reconnect_for = reconnect_for
        self.bytes_sent = 0
        self.bytes_received = 0
        self.messages = 0
        self.retries = 0  # resends, over the connection's life
        self.last_reply = time.monotonic()  # when the server last answered (the heartbeat reads it)
        self.token = ""
        self.shaper = None  # an emulated link that delays each message (see above)
        self._rid = itertools.count(1)
        self._rng = random.Random()  # jitter only: never seeded, never shared with training
        self._lock = threading.Lock()  # one request at a time per socket
        self._open()

    def _open(self) -> None:
        """A fresh DEALER socket, encrypted when there are keys, with the
        monitor that reports a refused handshake or a dropped connection."""
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.HEARTBEAT_IVL, ZMTP_HEARTBEAT_MS)
        self.socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, ZMTP_TIMEOUT_MS)
        if self.keys is not None:
            secure_client(self.socket, self.keys)
        self.watch = HandshakeWatch(self.socket, self.address, self.keys)
        self._pollers = {}
        for event in (zmq.POLLIN, zmq.POLLOUT):
            self._pollers[event] = poller = zmq.Poller()
            poller.register(self.socket, event)
            poller.register(self.watch.socket, zmq.POLLIN)
        self.socket.connect(self.address)

    def _close_socket(self) -> None:
        self.watch.close()
        self.socket.close(linger=0)

    def _wait(self, seconds: float, event: int = zmq.POLLIN) -> bool:
        """Wait up to ``seconds`` until a reply is there (POLLIN) or a message
        can be queued (POLLOUT: after a refused handshake ZeroMQ drops the
        connection and a send would block for ever); True when it is. A
        handshake the server refuses ends the wait with its reason."""
        deadline = time.monotonic() + seconds
        while True:
            if self.watch.problem():
                raise HandshakeFailed(self.watch.refused)
            ready = dict(self._pollers[event].poll(max(0, int((deadline - time.monotonic()) * 1000))))
            if self.watch.socket in ready and self.watch.problem():
                raise HandshakeFailed(self.watch.refused)
            if self.socket in ready:
                return True
            if time.monotonic() >= deadline:
                return False

    def request(self, msg: Message, timeout: float | None = None, retry: bool = True) -> Message:
        """Send ``msg`` and wait for its reply; raise on timeout or error.

        With ``retry`` (and ``reconnect_for`` > 0), a request that gets no
        answer, or an answer with code "busy", is resent unchanged after a
        backoff, until ``reconnect_for`` seconds have passed since the first
        failure. A reply with code "session" raises ``SessionLost``."""
        with self._lock:
            return self._request(msg, self.timeout if timeout is None else timeout,
                                 self.reconnect_for if retry else 0.0)

    def _request(self, msg: Message, wait: float, budget: float) -> Message:
        rid = next(self._rid)
        msg.client = self.client_id
        msg.meta = {**msg.meta, "rid": rid}
        if self.token:
            msg.meta["token"] = self.token
        frames = encode(msg)
        failed_at = None
        for attempt in itertools.count():
            self.watch.take_drop()  # a drop before this send says nothing about it
            if self._wait(wait, zmq.POLLOUT):
                size = sum(frame_len(f) for f in frames)
                if self.shaper is not None:
                    self.shaper.on_send(size)
                self.bytes_sent += size
                self.socket.send_multipart(frames, copy=False)
                reply, why = self._await(rid, wait)
            else:
                reply, why = None, f"ZeroMQ held no connection that takes messages for {wait:.0f}s"
            if reply is not None and not (reply.op == "error" and reply.meta.get("code") == "busy" and budget > 0):
                return self._answer(reply)
            if reply is not None:
                why = f"the server is busy ({reply.meta.get('error', '')})"
            now = time.monotonic()
            failed_at = failed_at or now
            if now - failed_at >= budget:
                raise ServerUnavailable(
                    f"no answer from the server at {self.address} (op {msg.op}): {why}"
                    + (f"; resent for {now - failed_at:.0f}s" if budget > 0 else "")
                    + ". Is `fedsplit server` running there, and is the address reachable from this machine?"
                    # Only a connection set never to resend is told how to wait (a first hello is never resent).
                    + ("" if self.reconnect_for > 0 else
                       " (--reconnect-for lets a client wait for a restarting server)"))
            pause = min(backoff(attempt, self._rng), max(0.0, failed_at + budget - now))
            log.warning("%s: %s; resending %s (step %d, retry %d) in %.1fs", self.client_id, why, msg.op, msg.step,
                        attempt + 1, pause)
            time.sleep(pause)
            # A new socket, so a copy still queued in the old one cannot arrive as a second retry.
            self._close_socket()
            self._open()
            self.retries += 1
        raise AssertionError("unreachable")

    def _await(self, rid: int, wait: float) -> tuple[Message | None, str]:
        """The reply to request ``rid``, or None and why none came: the wait
        ran out, or the connection dropped (the request or its reply is lost)."""
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None, f"no reply within {wait:.0f}s"
            if not self._wait(min(POLL_SLICE_MS / 1000, left)):
                if self.watch.take_drop():
                    return None, "the connection dropped"
                continue
            # Junk and late replies are dropped; the deadline above still holds.
            reply = self._receive(rid)
            if reply is None:
                continue
            self.last_reply = time.monotonic()
            return reply, ""

    def _receive(self, rid: int) -> Message | None:
        """One message off the socket: the reply to request ``rid`` (or an
        error the server could not tie to a request), else None."""
        reply_frames = self.socket.recv_multipart(copy=False)
        size = sum(frame_len(f) for f in reply_frames)
        if self.shaper is not None:
            self.shaper.on_receive(size)
        self.bytes_received += size
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

    @staticmethod
    def _answer(reply: Message) -> Message:
        if reply.op != "error":
            return reply
        text, code = str(reply.meta.get("error", "unknown error")), reply.meta.get("code")
        if code == "session":
            raise SessionLost(text)
        # A code of any other type (a list, say) must not fail the lookup.
        raise ServerError(text, code if isinstance(code, str) and code in ERROR_CODES else "failed")

    def close(self) -> None:
        """Close the socket and its monitor."""
        self._close_socket()
