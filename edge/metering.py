"""Step and round meters of a client: where each training step's time went,
what crossed the wire, and what memory each round took.

A step's wall time splits three ways: the client's own computation, waiting
on the network, and the server's computation, which the server reports in
each forward and backward reply (``split.records.SERVER_SECONDS``; checked in
``edge.client.reply_seconds``). Waiting is the time spent inside forward and
backward requests less what the server computed; computing is the rest.
Bytes are the connection's frame counters (headers included), so a step's
bytes are what the wire carried for it, resends included.

A round's record (``RoundMeter.finish``) is the flat map of ``split.records``
that the client writes to its run folder and sends with its upload.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import psutil

from split.records import check_record
from split.wire import encode, frame_len

from .meter import cuda_peak, peak_rss, reset_peak

USS_EVERY = 0.5  # seconds between two USS samples (one costs ~10 ms: it reads smaps)


@dataclass
class StepRecord:
    """One training step seen from the client."""

    round: int | None  # None: plain split training
    step: int  # the client's step count after this step
    seconds: float
    compute_s: float
    network_s: float
    server_s: float
    bytes_up: int
    bytes_down: int
    loss: float

    def to_dict(self) -> dict:
        return asdict(self)


class StepMeter:
    """Times and counts a client's training steps (``edge.client.SplitClient``)."""

    def __init__(self, client):
        self.client = client

    def measure(self, step: Callable[[], float], round_index: int | None = None) -> tuple[float, StepRecord]:
        """Run ``step()`` (a training step returning its loss); returns the
        loss and the step's record."""
        conn, link = self.client.conn, self.client.link
        sent, received, waited, served = conn.bytes_sent, conn.bytes_received, link.waited, link.served
        started = time.perf_counter()
        loss = step()
        seconds = time.perf_counter() - started
        waited, served = link.waited - waited, link.served - served
        record = StepRecord(round_index, self.client.steps, seconds, max(0.0, seconds - waited), waited - served,
                            served, conn.bytes_sent - sent, conn.bytes_received - received, loss)
        return loss, record


def upload_bytes(message) -> int:
    """Frames of ``message`` as encoded here. The upload is measured before
    its record is added to it (the record holds this count); the record, the
    request id and the session token add a few hundred bytes on the wire."""
    return sum(frame_len(f) for f in encode(message))


class RoundMeter:
    """Accumulates a federated client's round: its steps' time split and
    bytes, its traffic since the previous upload, and its peak memory.

    ``start`` resets the process's peak resident size (Linux; elsewhere the
    peak is the process's so far) and the CUDA peak; ``finish`` returns the
    round's record. Traffic counts from the end of the previous round's upload
    (or the meter's creation), so a round's bytes hold its polls, its download
    and its steps; the upload itself is ``upload_bytes``, and an evaluation of
    the global model (``evaluate``) is counted apart, in ``eval_bytes``."""

    def __init__(self, client, budget_bytes: int | None = None):
        self.client = client
        self.budget_bytes = budget_bytes
        self.steps = StepMeter(client)
        self._process = psutil.Process()
        self.run_peak_rss = 0  # the process's peak over every round and what came before
        self._mark = self._counters()
        self._reset(None)

    def _counters(self) -> tuple[int, int]:
        return self.client.conn.bytes_sent, self.client.conn.bytes_received

    def _reset(self, round_index: int | None) -> None:
        self.round = round_index
        self.started = time.perf_counter()
        self.compute_s = self.network_s = self.server_s = 0.0
        self.count = 0
        self.losses: list[float] = []
        self.peak_uss = 0
        self._uss_at = 0.0
        self.eval_s = 0.0
        self.eval_up = self.eval_down = 0
        self.evaluated = False

    def start(self, round_index: int) -> None:
        """Begin metering round ``round_index``."""
        self.run_peak_rss = max(self.run_peak_rss, peak_rss())
        reset_peak()
        device = getattr(self.client, "device", None)
        if device is not None and getattr(device, "type", None) == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(device)
        self._reset(round_index)

    def step(self, step: Callable[[], float]) -> tuple[float, StepRecord]:
        """Run and meter one training step of the round; returns its loss and record."""
        loss, record = self.steps.measure(step, self.round)
        self.compute_s += record.compute_s
        self.network_s += record.network_s
        self.server_s += record.server_s
        self.count += 1
        self.losses.append(loss)
        if time.perf_counter() - self._uss_at >= USS_EVERY:
            self._sample_uss()
        return loss, record

    def evaluate(self, evaluation: Callable[[], float]) -> float:
        """Run ``evaluation()`` (an accuracy), its time and traffic counted apart from training's."""
        sent, received = self._counters()
        started = time.perf_counter()
        try:
            return evaluation()
        finally:
            self.eval_s += time.perf_counter() - started
            now = self._counters()
            self.eval_up += now[0] - sent
            self.eval_down += now[1] - received
            self.evaluated = True

    def _sample_uss(self) -> None:
        self.peak_uss = max(self.peak_uss, self._process.memory_full_info().uss)
        self._uss_at = time.perf_counter()

    def finish(self, accuracy: float | None = None, upload: int = 0, extra: dict | None = None) -> dict:
        """The round's record (``split.records``): ``accuracy`` when the
        client evaluated, ``upload`` the bytes of the upload about to be sent,
        ``extra`` keys another meter measured."""
        self._sample_uss()
        sent, received = self._counters()
        record = {"steps": self.count, "seconds": time.perf_counter() - self.started,
                  "compute_s": self.compute_s, "network_s": self.network_s, "server_s": self.server_s,
                  "bytes_up": sent - self._mark[0] - self.eval_up,
                  "bytes_down": received - self._mark[1] - self.eval_down, "upload_bytes": upload,
                  "peak_rss": peak_rss(), "peak_uss": self.peak_uss}
        if self.evaluated:
            record.update(eval_s=self.eval_s, eval_bytes=self.eval_up + self.eval_down)
        if self.losses:
            record["loss"] = sum(self.losses) / len(self.losses)
        if accuracy is not None:
            record["accuracy"] = accuracy
        cuda = cuda_peak(self.client.device) if hasattr(self.client, "device") else None
        if cuda is not None:
            record["peak_cuda"] = cuda
        if self.budget_bytes is not None:
            record["budget_bytes"] = self.budget_bytes
        record.update(extra or {})
        self.run_peak_rss = max(self.run_peak_rss, record["peak_rss"])
        # A loss that diverged is not a measurement the schema takes: it is left out, not sent.
        record = {k: v for k, v in record.items() if not (isinstance(v, float) and not math.isfinite(v))}
        return check_record(record)  # a key no one registered fails here, not at the server

    def uploaded(self) -> None:
        """The round's upload is done: the next round's traffic counts from here."""
        self._mark = self._counters()


class RoundObserver:
    """What a federated client tells as it works (``FederatedOptions.observers``):
    a display, a run folder, an emulator. Every hook is optional."""

    def round_started(self, round_index: int, rounds: int, steps: int) -> None:
        """A round begins: ``steps`` local steps of ``rounds`` in the federation."""

    def step_done(self, record: StepRecord) -> None:
        """A training step finished."""

    def round_done(self, round_index: int, record: dict) -> None:
        """A round's upload was taken; ``record`` is what it carried."""

    def record_extra(self) -> dict:
        """Keys of ``split.records`` this observer adds to the round's record."""
        return {}

    def close(self) -> None:
        """The federation is over or the client stops (called by whoever made the observer)."""
