"""Round records: what a client measured in one round, as a flat map of known
numeric keys. A client builds one per round (``edge.metering``), writes it to
its run folder and sends it with its upload; the server checks it as hostile
input (``check_record``) before it writes it to its own run folder; ``fedsplit
report`` reads the same lines back.

Every key is optional (a client that did not evaluate sends no accuracy), but
a key that is present must be listed in ``RECORD_FIELDS`` and hold a number of
its kind within its range. Another part of fedsplit that measures something
per round (an emulated device, a profile's budget) adds its key to
``RECORD_FIELDS``; the client merges its values into the record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The key of a forward or backward reply's metadata giving the seconds the
# server computed for that request (its queue time aside).
SERVER_SECONDS = "server_s"

MAX_BYTES = 1 << 50  # 1 PiB: beyond any honest byte count or memory size
MAX_SECONDS = 1e7  # about 16 weeks: beyond any honest round
MAX_COUNT = 10 ** 9


@dataclass(frozen=True)
class Field:
    """One key of a round record: an integer or a float in [low, high]."""

    kind: str  # "int" or "float"
    low: float
    high: float
    unit: str = ""
    help: str = ""


RECORD_FIELDS: dict[str, Field] = {
    "steps": Field("int", 0, MAX_COUNT, "", "training steps of the round"),
    "loss": Field("float", 0.0, 1e9, "", "mean task loss of the round's steps"),
    "accuracy": Field("float", 0.0, 1.0, "", "accuracy of the downloaded global model, before local training"),
    "seconds": Field("float", 0.0, MAX_SECONDS, "s", "wall time of the round on the client"),
    "compute_s": Field("float", 0.0, MAX_SECONDS, "s", "steps: client computation"),
    "network_s": Field("float", 0.0, MAX_SECONDS, "s", "steps: waiting on the network and the server's queue (its compute aside)"),
    "server_s": Field("float", 0.0, MAX_SECONDS, "s", "steps: the server's computation, as it reported it"),
    "bytes_up": Field("int", 0, MAX_BYTES, "B", "frames sent before the upload (polls, steps)"),
    "bytes_down": Field("int", 0, MAX_BYTES, "B", "frames received before the upload (polls, download, steps)"),
    "upload_bytes": Field("int", 0, MAX_BYTES, "B", "the upload's frames as encoded before its record was added"),
    "download_bytes": Field("int", 0, MAX_BYTES, "B", "the round offer's frames (part of bytes_down)"),
    "eval_s": Field("float", 0.0, MAX_SECONDS, "s", "evaluating the global model (its time is not the steps')"),
    "eval_bytes": Field("int", 0, MAX_BYTES, "B", "frames sent and received to evaluate the global model"),
    "peak_rss": Field("int", 0, MAX_BYTES, "B", "peak resident memory of the client process in the round"),
    "peak_uss": Field("int", 0, MAX_BYTES, "B", "largest unique memory sampled after each step"),
    "peak_cuda": Field("int", 0, MAX_BYTES, "B", "peak CUDA memory allocated by torch in the round"),
    "budget_bytes": Field("int", 1, MAX_BYTES, "B", "the memory budget of the client's device profile"),
    # An emulated device's busy time in the round (edge.emulate_record), robust to a shared machine's load:
    "emulated_compute_s": Field("float", 0.0, MAX_SECONDS, "s", "emulated: compute as long as the device takes"),
    "emulated_link_s": Field("float", 0.0, MAX_SECONDS, "s", "emulated: the delays the device's link imposed"),
    "emulated_train_s": Field("float", 0.0, MAX_SECONDS, "s", "emulated: compute and link within training steps"),
}


class RecordError(ValueError):
    """A round record that breaks the schema; the text names the key and the rule."""


def _number(value, kind: str) -> bool:
    if isinstance(value, bool):  # a bool is an int to Python, never a measurement
        return False
    return isinstance(value, int) if kind == "int" else isinstance(value, (int, float))


def check_record(record) -> dict[str, int | float]:
    """``record`` checked against ``RECORD_FIELDS``: a map of at most as many
    keys as the schema has, every key known, every value a finite number of
    its kind within its range. Returns a plain copy (floats as float); raises
    ``RecordError`` naming the first thing wrong."""
    if not isinstance(record, dict):
        raise RecordError(f"the round record must be a map of numbers, got {type(record).__name__}")
    if len(record) > len(RECORD_FIELDS):
        raise RecordError(f"the round record has {len(record)} keys; the schema knows {len(RECORD_FIELDS)}")
    out: dict[str, int | float] = {}
    for key, value in record.items():
        field = RECORD_FIELDS.get(key) if isinstance(key, str) else None
        if field is None:
            shown = key[:40] if isinstance(key, str) else repr(key)[:40]
            raise RecordError(f"the round record has an unknown key {shown!r}; known keys: "
                              f"{', '.join(sorted(RECORD_FIELDS))}")
        if not _number(value, field.kind):
            what = "an integer" if field.kind == "int" else "a number"
            raise RecordError(f"round record key {key!r} must be {what}, got {type(value).__name__}")
        if not math.isfinite(value):
            raise RecordError(f"round record key {key!r} must be finite, got {value}")
        if not field.low <= value <= field.high:
            raise RecordError(f"round record key {key!r} must be in [{field.low:g}, {field.high:g}], got {value:g}")
        out[key] = float(value) if field.kind == "float" else int(value)
    return out
