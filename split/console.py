"""What a fedsplit process shows on its console: its own log lines at INFO
by default in a concise format, library warnings that tell the user nothing
silenced, and one stderr console shared by log lines and progress bars (so a
log line printed during a bar lands above it instead of through it)."""

from __future__ import annotations

import logging
import sys
import warnings

from rich.console import Console
from rich.logging import RichHandler

# The packages whose loggers speak for fedsplit; every other logger is a library's.
OWN_LOGGERS = ("split", "server", "edge", "profiles", "bench", "__main__")

# Library warnings that say nothing a user can act on.
SILENCED = (
    # peft still calls a transformers property deprecated in v5.
    (".*is_gradient_checkpointing.*", FutureWarning),
    # bitsandbytes' 8-bit inference matmul quantizes its input through float16 (--quantize 8bit).
    ("MatMul8bitLt: inputs will be cast from .* to float16 during quantization", UserWarning),
)

_stderr: Console | None = None


def stderr_console() -> Console:
    """The process's console on stderr, shared by log lines and progress bars."""
    global _stderr
    if _stderr is None:
        _stderr = Console(stderr=True)
    return _stderr


def table_console() -> Console:
    """A console on stdout for summary tables: the terminal's width, or 120
    columns in a file or a pipe (rich's 80 would cut a table's cells)."""
    console = Console()
    return console if console.is_terminal else Console(width=120)


class ConciseFormatter(logging.Formatter):
    """``HH:MM:SS message``; warnings and errors also say their level."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
        self._info = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        return self._info.format(record) if record.levelno == logging.INFO else super().format(record)


def setup_logging(level: str = "INFO") -> None:
    """fedsplit's own loggers at ``level``, libraries at WARNING (or
    ``level`` if that is stricter); on a terminal through rich, elsewhere as
    plain lines on stderr. Silences ``SILENCED``. Like ``logging.basicConfig``
    it leaves a process whose logging is already set up (an application
    embedding fedsplit, a test harness) as it is, warnings filters aside."""
    for message, category in SILENCED:
        warnings.filterwarnings("ignore", message=message, category=category)
    root = logging.getLogger()
    if root.handlers:
        return
    numeric = getattr(logging, level.upper())
    if sys.stderr.isatty():
        handler: logging.Handler = RichHandler(console=stderr_console(), show_path=False, log_time_format="%X")
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(ConciseFormatter())
    root.addHandler(handler)
    root.setLevel(max(numeric, logging.WARNING))
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(numeric)
