"""Turns at the compute thread: one FIFO queue per connection, served round-robin.

The loop thread puts each request that needs the model into its connection's
queue; the one compute thread takes them one at a time, a turn per connection
in order. A connection with many queued requests therefore delays another's
by at most one request, and each queue is bounded, so a flood is refused
("busy") instead of piling up. A client's requests arrive on its one
connection, so they stay in order.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Hashable


class Scheduler:
    """Bounded per-connection queues, taken round-robin; safe between threads."""

    def __init__(self, max_queued: int):
        if max_queued < 1:
            raise ValueError(f"max_queued must be >= 1 request per connection, got {max_queued}")
        self.max_queued = max_queued
        self._queues: dict[Hashable, deque] = {}
        self._turns: deque = deque()  # connections with queued work, in the order of their next turn
        self._cond = threading.Condition()
        self._closed = False

    def put(self, key: Hashable, job: Any) -> bool:
        """Queue ``job`` for connection ``key``; False when its queue is full."""
        with self._cond:
            queue = self._queues.get(key)
            if queue is None:
                queue = self._queues[key] = deque()
                self._turns.append(key)
            elif len(queue) >= self.max_queued:
                return False
            queue.append(job)
            self._cond.notify()
            return True

    def take(self, timeout: float) -> Any | None:
        """The next connection's oldest job, waiting up to ``timeout`` seconds
        for one; None when none came or the scheduler is closed."""
        with self._cond:
            if not self._turns and not self._closed:
                self._cond.wait(timeout)
            if self._closed or not self._turns:
                return None
            key = self._turns.popleft()
            queue = self._queues[key]
            job = queue.popleft()
            if queue:
                self._turns.append(key)  # its next request waits for everyone else's turn
            else:
                del self._queues[key]
            return job

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed

    def busy(self, key: Hashable) -> bool:
        """Whether connection ``key`` has requests waiting."""
        with self._cond:
            return key in self._queues

    def queued(self) -> int:
        """Requests waiting, all connections together."""
        with self._cond:
            return sum(len(q) for q in self._queues.values())

    def close(self) -> None:
        """Wake the compute thread and hand out nothing more."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
