"""What a federated client shows while it trains: a progress bar on a
terminal, one line per round otherwise (a log file, a pipe, ``--no-progress``)."""

from __future__ import annotations

import sys

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from split.console import stderr_console

from .metering import RoundObserver, StepRecord

MB = 1e6


def round_line(round_index: int, rounds: int, record: dict) -> str:
    """One round in one line: steps, loss, accuracy, time split, traffic, peak memory."""
    parts = [f"{record.get('steps', 0)} steps"]
    if "loss" in record:
        parts.append(f"loss {record['loss']:.3f}")
    if "accuracy" in record:
        parts.append(f"accuracy {record['accuracy']:.1%}")
    parts.append(f"{record.get('seconds', 0.0):.1f} s (compute {record.get('compute_s', 0.0):.1f} s, "
                 f"network {record.get('network_s', 0.0):.1f} s, server {record.get('server_s', 0.0):.1f} s)")
    up = record.get("bytes_up", 0) + record.get("upload_bytes", 0)
    parts.append(f"{up / MB:.1f} MB up, {record.get('bytes_down', 0) / MB:.1f} MB down")
    if "peak_rss" in record:
        parts.append(f"peak RSS {record['peak_rss'] / MB:.0f} MB")
    return f"round {round_index + 1}/{rounds}: " + ", ".join(parts)


class RoundLines(RoundObserver):
    """One line per round on ``stream`` (stdout by default)."""

    def __init__(self, stream=None):
        self.stream = stream
        self.rounds = 0

    def round_started(self, round_index: int, rounds: int, steps: int) -> None:
        self.rounds = rounds

    def round_done(self, round_index: int, record: dict) -> None:
        print(round_line(round_index, self.rounds, record), file=self.stream or sys.stdout, flush=True)


class RoundBar(RoundObserver):
    """A rich progress bar of the round's steps with the running loss, and
    each finished round's line printed above it."""

    def __init__(self):
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 TextColumn("{task.completed}/{task.total} steps"),
                                 TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(),
                                 console=stderr_console(), transient=True)
        self.task = None
        self.rounds = 0
        self.losses: list[float] = []

    def round_started(self, round_index: int, rounds: int, steps: int) -> None:
        self.rounds = rounds
        self.losses = []
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task("", total=steps, loss=float("nan"))
        self.progress.reset(self.task, total=steps, description=f"round {round_index + 1}/{rounds}",
                            loss=float("nan"))

    def step_done(self, record: StepRecord) -> None:
        self.losses.append(record.loss)
        recent = self.losses[-20:]
        self.progress.update(self.task, advance=1, loss=sum(recent) / len(recent))

    def round_done(self, round_index: int, record: dict) -> None:
        self.progress.console.print(round_line(round_index, self.rounds, record), highlight=False)

    def close(self) -> None:
        if self.task is not None:
            self.progress.stop()
            self.task = None


def round_display(progress: bool, stream=None) -> RoundObserver:
    """A bar when ``progress`` and stderr is a terminal, else one line per round."""
    return RoundBar() if progress and stderr_console().is_terminal else RoundLines(stream)
