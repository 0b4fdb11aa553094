"""A run folder (``--run-dir``): JSON Lines files a client or a server
appends its records to as a run goes, one JSON object a line.

- ``steps.jsonl`` (client): one line per training step (``edge.metering.StepRecord``);
- ``clients.jsonl`` (client and server): one line per client and round, the
  round record of ``split.records`` with ``client`` and ``round``; a client
  writes its own, a server everyone's, as their uploads arrive;
- ``rounds.jsonl`` (server): one line per round the coordinator closed
  (``server.rounds.RoundLog``).

``fedsplit report RUN_DIR`` reads ``clients.jsonl``.
"""

from __future__ import annotations

import json
from pathlib import Path

STEPS, CLIENTS, ROUNDS = "steps.jsonl", "clients.jsonl", "rounds.jsonl"
RUN_FILES = (STEPS, CLIENTS, ROUNDS)


class RunFolder:
    """Appends records to the JSON Lines files of one run's folder.

    A folder that already holds a run's files is refused, so two runs never
    mix in one file, unless ``resume`` (a server continuing its run)."""

    def __init__(self, path: str | Path, resume: bool = False, option: str = "--run-dir"):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"{option} {self.path} is a file; give a folder (it is made if missing)")
        held = [name for name in RUN_FILES if (self.path / name).exists()]
        if held and not resume:
            raise ValueError(f"{option} {self.path} already holds {', '.join(held)} of another run; give a new "
                             "folder, or remove those files")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"{option} {self.path}: cannot make the folder ({exc.strerror})") from None
        self._files = {}

    def append(self, name: str, record: dict) -> None:
        """Write ``record`` as one line of ``name`` and flush it, so that a run
        stopped half-way leaves every finished line readable."""
        handle = self._files.get(name)
        if handle is None:
            handle = self._files[name] = open(self.path / name, "a", encoding="utf-8")
        handle.write(json.dumps(record, separators=(",", ":")) + "\n")
        handle.flush()

    def close(self) -> None:
        """Close the files (appending again reopens them)."""
        for handle in self._files.values():
            handle.close()
        self._files = {}
