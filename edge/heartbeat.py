"""A client's heartbeat: keeps its session alive on the server while the
client is idle or busy with local work, and says when the server is gone.

The server frees a session it has not heard from for its session timeout.
A client that computes locally for longer than that (a slow device, a long
evaluation, a pause between rounds) would lose its server-side state, so a
thread pings the server every quarter of the timeout whenever the client's own
requests have not reached it in that time.

Why a thread with its own socket: the client's socket belongs to the thread
that trains (ZeroMQ sockets are not thread-safe), and that thread is the one
that is busy. ZMTP heartbeats (set on every ``Connection``) cannot do this
job: they keep a TCP connection alive and detect a dead peer, but the server's
application never sees them, so they do not refresh a session. Both are used:
ZMTP heartbeats make a waiting request notice a silent dead server
(``split.transport``); this ping keeps the session.
"""

from __future__ import annotations

import logging
import threading
import time

from split.transport import Connection, ServerError, ServerUnavailable, SessionLost
from split.wire import Message

log = logging.getLogger(__name__)


class Heartbeat:
    """Pings the server for ``conn``'s session every ``interval`` seconds of
    silence on ``conn``, from a daemon thread with a socket of its own."""

    def __init__(self, conn: Connection, interval: float):
        if not interval > 0:
            raise ValueError(f"a heartbeat interval must be > 0 seconds, got {interval}")
        self.main = conn
        self.interval = interval
        self.pings = 0
        self.lost = threading.Event()  # the server answered that it holds no session for this client
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{conn.client_id}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # The socket is made, used and closed in this thread.
        conn = Connection(self.main.address, self.main.client_id, timeout=self.interval, limits=self.main.limits,
                          keys=self.main.keys)
        silent_since = None
        try:
            while not self._stop.wait(self.interval):
                if time.monotonic() - self.main.last_reply < self.interval:
                    silent_since = None
                    continue  # the client's own requests keep the session alive
                conn.token = self.main.token
                try:
                    conn.request(Message("ping"), retry=False)
                    self.pings += 1
                    if silent_since is not None:
                        log.warning("%s: the server answers again", conn.client_id)
                    silent_since = None
                    self.lost.clear()
                except SessionLost:
                    if not self.lost.is_set():
                        log.warning("%s: the server holds no session for this client any more (it restarted, or "
                                    "the session expired); the client registers again at its next request",
                                    conn.client_id)
                    self.lost.set()
                except ServerUnavailable:
                    if silent_since is None:
                        silent_since = time.monotonic() - self.interval
                        log.warning("%s: the server has not answered a heartbeat for %.0fs; a request that gets "
                                    "no answer is resent while --reconnect-for allows", conn.client_id, self.interval)
                except ServerError as exc:
                    log.warning("%s: the server refused a heartbeat: %s", conn.client_id, exc)
        finally:
            conn.close()

    def stop(self) -> None:
        """Stop pinging and close the heartbeat's socket."""
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)
