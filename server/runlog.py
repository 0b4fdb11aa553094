"""The server's record of a federation: every client's round records as
their uploads are taken (``clients.jsonl``), every round the coordinator
closed (``rounds.jsonl``), both in ``--run-dir`` when one is given, and the
per-client table printed when the federation ends.

The records reach this module already checked (``server.admission.check_record``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from rich.table import Table

from split.runfolder import CLIENTS, ROUNDS, RunFolder
from split.summary import MB, client_table, sent

log = logging.getLogger(__name__)


class ServerRunLog:
    """Takes round records and closed rounds; writes them when it has a folder."""

    def __init__(self, folder: str | Path | None = None, resume: bool = False):
        self.folder = None if folder is None else RunFolder(folder, resume=resume)
        self.rows: list[dict] = []
        self.rounds_written = 0

    def upload(self, client: str, round_index: int, record: dict, taken: int, selected: int) -> None:
        """A client's upload for ``round_index`` was taken, with ``record``;
        ``taken`` of the round's ``selected`` uploads are in."""
        row = {"client": client, "round": round_index, **record}
        self.rows.append(row)
        if self.folder is not None:
            self.folder.append(CLIENTS, row)
        detail = [f"{record['steps']} steps"] if "steps" in record else []
        if "loss" in record:
            detail.append(f"loss {record['loss']:.3f}")
        if "bytes_up" in record:
            detail.append(f"{sent(record) / MB:.1f} MB up")
        log.info("round %d: upload from %s (%d of %d)%s", round_index, client, taken, selected,
                 f": {', '.join(detail)}" if detail else "")

    def rounds(self, history: list) -> None:
        """Write the coordinator's round logs not written yet (``history`` is
        its list of ``RoundLog``; a retried round has one entry per try)."""
        for entry in history[self.rounds_written:]:
            if self.folder is not None:
                self.folder.append(ROUNDS, asdict(entry))
        self.rounds_written = len(history)

    def table(self) -> Table | None:
        """The per-client table of the records taken so far (None: there are none)."""
        return client_table(self.rows, "fedsplit server: per client") if self.rows else None

    def close(self) -> None:
        if self.folder is not None:
            self.folder.close()
