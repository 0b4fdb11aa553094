"""Time the link to a running fedsplit server with probe round trips
(split/probe.py): the round-trip time, and the uplink and downlink rates.

Round-trip time is the median of several empty probes. A rate is timed on
transfers grown until one lasts ``target_s`` (or reaches the server's probe
limit), then repeated: bytes that crossed the socket in that direction
(headers included), over the median transfer time less one round trip.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from split.probe import ProbeReply, ProbeRequest
from split.transport import Connection, ServerError

FIRST_BYTES = 64 << 10  # the first transfer tried each way
MAX_GROWTH = 16  # a transfer grows at most this much from one try to the next


@dataclass(frozen=True)
class LinkFigures:
    """A link as measured: round trip (ms), rates (Mbit/s, 10**6 bits per
    second), and the transfer each rate was timed on (bytes, repeats)."""

    rtt_ms: float
    uplink_mbps: float
    downlink_mbps: float
    round_trips: int
    up_bytes: int
    down_bytes: int
    repeats: int


def rate_mbps(nbytes: int, seconds: float, rtt_s: float) -> float:
    """The rate at which ``nbytes`` crossed in a transfer of ``seconds`` that
    includes one round trip of ``rtt_s``; an error when the transfer was not
    measurably longer than the round trip."""
    wire = seconds - rtt_s
    if not wire > 0:
        raise ValueError(f"a transfer of {nbytes} bytes took {seconds * 1e3:.3f} ms, no longer than an empty round "
                         f"trip ({rtt_s * 1e3:.3f} ms): the link is too fast to time with probes of this size")
    return nbytes * 8 / wire / 1e6


def next_size(size: int, seconds: float, target_s: float, limit: int) -> int:
    """The transfer to try after one of ``size`` bytes took ``seconds``: the
    size expected to last ``target_s``, at most ``MAX_GROWTH`` times larger
    and at most ``limit``."""
    wanted = size * target_s / seconds if seconds > 0 else size * MAX_GROWTH
    return int(min(limit, size * MAX_GROWTH, max(size * 2, wanted)))


def measure_link(conn: Connection, round_trips: int = 9, target_s: float = 0.25, repeats: int = 3) -> LinkFigures:
    """Round-trip time and rates each way to the server ``conn`` talks to."""
    limit = _probe(conn, ProbeRequest())[0].max_bytes  # also opens the connection, untimed
    rtts = [_probe(conn, ProbeRequest())[1] for _ in range(round_trips)]
    rtt = statistics.median(rtts)
    up, up_bytes = _rate(conn, "up", rtt, limit, target_s, repeats)
    down, down_bytes = _rate(conn, "down", rtt, limit, target_s, repeats)
    return LinkFigures(rtt * 1e3, up, down, round_trips, up_bytes, down_bytes, repeats)


def _rate(conn: Connection, way: str, rtt: float, limit: int, target_s: float, repeats: int) -> tuple[float, int]:
    """(Mbit/s, payload bytes per transfer) one way: grow the transfer to last
    ``target_s``, then time ``repeats`` of it."""
    if limit <= 0:
        raise ValueError(f"the server's probes carry no bytes (limit {limit}): it cannot time a rate")
    size = min(FIRST_BYTES, limit)
    while True:
        seconds = _transfer(conn, way, size)[0]
        if seconds >= target_s or size >= limit:
            break
        size = next_size(size, seconds, target_s, limit)
    timed = [_transfer(conn, way, size) for _ in range(repeats)]
    nbytes = max(t[1] for t in timed)  # the same every time: frame bytes of one transfer
    return rate_mbps(nbytes, statistics.median(t[0] for t in timed), rtt), size


def _transfer(conn: Connection, way: str, size: int) -> tuple[float, int]:
    """(seconds, bytes that crossed the socket that way) of one probe moving ``size`` bytes ``way``."""
    request = ProbeRequest(payload=size) if way == "up" else ProbeRequest(reply_bytes=size)
    sent, received = conn.bytes_sent, conn.bytes_received
    seconds = _probe(conn, request)[1]
    return seconds, (conn.bytes_sent - sent) if way == "up" else (conn.bytes_received - received)


def _probe(conn: Connection, request: ProbeRequest) -> tuple[ProbeReply, float]:
    """One probe round trip: the checked reply and how long it took (s)."""
    msg = request.to_message()
    start = time.perf_counter()
    try:
        reply = conn.request(msg, retry=False)
    except ServerError as exc:
        raise ConnectionError(f"the server at {conn.address} refused a probe ({exc}); a server older than this "
                              "fedsplit does not answer probes: give the link figures instead (--uplink-mbps, "
                              "--downlink-mbps, --rtt-ms)") from None
    seconds = time.perf_counter() - start
    return ProbeReply.from_message(reply, request), seconds
