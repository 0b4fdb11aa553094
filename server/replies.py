"""Each session's last replies, so that a request resent after a lost reply
is answered again instead of being applied twice.

A client resends a request unchanged (same op, step and request id ``rid``)
when its reply did not arrive (``split.transport.Connection``). Replaying the
cached reply is what makes the resend harmless: a second backward must not
step the optimizer twice, a second forward must not keep a second graph, a
second round poll must hand out the same offer (the first one marked the
round as delivered), a second upload must not fail because the round moved on.

Forward and backward are keyed by (op, step): step ids are unique within a
session, so the key names the step whatever the transport did. The
federation ops carry no step, so they are keyed by (op, rid). A cached
(op, step) asked again under another rid is a new request reusing an old step
id, and is refused rather than answered with another request's reply.

What is kept: a client's ``Connection`` has one request in flight at a time
and numbers its requests upwards, so a new request means it holds the replies
to all earlier ones: those are dropped (``settle``). What stays is the last
reply, whose loss the client may still be about to discover, plus, within the
count bound, replies keyed by ids that do not compare (not integers). A
backward's reply holds a gradient as large as the batch's hidden state, so
keeping every past one would grow with training.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from split.wire import Message

STEP_OPS = ("forward", "backward")
ROUND_OPS = ("join", "round", "upload")


class StepReused(Exception):
    """A step id that was already served, under another request id."""


def replay_key(msg: Message) -> tuple | None:
    """The cache key of a request whose effect must not repeat (None: not
    cached, because answering it twice changes nothing: hello, ping, status,
    adapter, an evaluation forward)."""
    if msg.op in STEP_OPS:
        if msg.op == "forward" and not msg.meta.get("train", True):
            return None
        return (msg.op, msg.step)
    rid = msg.meta.get("rid")
    if msg.op in ROUND_OPS and isinstance(rid, (int, str)) and not isinstance(rid, bool):
        return (msg.op, rid)
    return None


@dataclass
class _Entry:
    rid: object
    reply: Message


class ReplyCache:
    """The last ``size`` successful replies of one session, oldest evicted first.
    Error replies are never kept: the resend of a refused request is served anew."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"a reply cache holds at least 1 reply, got {size}")
        self.size = size
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple, rid) -> Message | None:
        """The reply cached under ``key`` for request ``rid``; None if there is
        none; ``StepReused`` if ``key`` was answered for another request."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.rid != rid:
            raise StepReused(f"{key[0]} of step {key[1]} was already served for another request; "
                             "a new step needs a new step id (a retry resends the same request)")
        return entry.reply

    def put(self, key: tuple, rid, reply: Message) -> None:
        """Keep ``reply`` (if it is not an error), evicting the oldest beyond ``size``."""
        if reply.op == "error":
            return
        self._entries[key] = _Entry(rid, reply)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def settle(self, rid) -> None:
        """A new request ``rid`` arrived: its sender holds every reply to a
        lower request id, so those need not be kept."""
        if not isinstance(rid, int) or isinstance(rid, bool):
            return
        for key in [k for k, e in self._entries.items()
                    if isinstance(e.rid, int) and not isinstance(e.rid, bool) and e.rid < rid]:
            del self._entries[key]

    def discard(self, key: tuple) -> None:
        """Forget ``key`` (a forward, once its backward is done: the client has its reply)."""
        self._entries.pop(key, None)
