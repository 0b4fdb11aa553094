"""A client's run folder (``fedsplit client --run-dir``): every training
step to ``steps.jsonl``, every round record to ``clients.jsonl`` (the same
lines a server writes for all its clients, so ``fedsplit report`` reads
either folder)."""

from __future__ import annotations

from pathlib import Path

from split.runfolder import CLIENTS, STEPS, RunFolder

from .metering import RoundObserver, StepRecord


class ClientRunLog(RoundObserver):
    """Writes a client's steps and round records as they happen; keeps the
    round rows for the closing table."""

    def __init__(self, folder: str | Path | None, client_id: str):
        self.folder = None if folder is None else RunFolder(folder)
        self.client_id = client_id
        self.rows: list[dict] = []

    def step_done(self, record: StepRecord) -> None:
        if self.folder is not None:
            self.folder.append(STEPS, {"client": self.client_id, **record.to_dict()})

    def round_done(self, round_index: int, record: dict) -> None:
        row = {"client": self.client_id, "round": round_index, **record}
        self.rows.append(row)
        if self.folder is not None:
            self.folder.append(CLIENTS, row)

    def close(self) -> None:
        if self.folder is not None:
            self.folder.close()
