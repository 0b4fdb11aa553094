"""fedsplit protocol messages in Flower records, and back.

A round offer or an upload is a ``split.wire.Message``: its tensors travel as
one ``ArrayRecord`` and its op, client and meta as a ``ConfigRecord`` (the
meta as JSON text: a ConfigRecord holds no nested maps). The receiver turns
the records back into a Message and reads it with the protocol's own checks
(``RoundOffer.from_message``, ``UploadPayload.from_message``): whatever came
over Flower is validated like what comes over ZeroMQ. Imports Flower: only
the Flower modules use it.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from .json_files import parse_json_object
from .wire import DTYPE_NAMES, Message

TENSORS, HEADER = "fedsplit.tensors", "fedsplit.header"
MAX_META_CHARS = 1 << 20  # a meta text beyond this is refused before it is parsed


class RecordError(ValueError):
    """Records that do not hold a fedsplit message; the text says what was wrong."""


def to_records(msg: Message, into: RecordDict | None = None) -> RecordDict:
    """``msg`` as records (added to ``into`` if given). Its tensors must be
    plain (codec-free) tensors of a dtype Flower carries (not bfloat16)."""
    if msg.codecs:
        raise RecordError(f"message {msg.op!r} has coded tensors; the Flower path carries plain tensors only")
    for name, tensor in msg.tensors.items():
        if tensor.dtype == torch.bfloat16:
            raise RecordError(f"tensor {name} is bfloat16, which Flower's ArrayRecord cannot carry")
    records = into if into is not None else RecordDict()
    records[TENSORS] = ArrayRecord(OrderedDict((k, v.detach().cpu().contiguous()) for k, v in msg.tensors.items()))
    records[HEADER] = ConfigRecord({"op": msg.op, "client": msg.client, "step": msg.step,
                                    "meta": json.dumps(msg.meta, allow_nan=False)})
    return records


def from_records(records: RecordDict, op: str) -> Message:
    """The fedsplit message ``op`` held in ``records``; a ``RecordError`` names what is missing or malformed."""
    header = records.config_records.get(HEADER)
    arrays = records.array_records.get(TENSORS)
    if header is None or arrays is None:
        raise RecordError(f"the message holds no fedsplit {op!r} (records {HEADER!r} and {TENSORS!r} expected)")
    if header.get("op") != op:
        raise RecordError(f"expected a fedsplit {op!r}, got {header.get('op')!r}")
    client, step, text = header.get("client"), header.get("step"), header.get("meta")
    if not isinstance(client, str) or not isinstance(step, int) or isinstance(step, bool):
        raise RecordError(f"{op}: the header's client and step must be text and an integer")
    if not isinstance(text, str) or len(text) > MAX_META_CHARS:
        raise RecordError(f"{op}: the header's meta must be JSON text of at most {MAX_META_CHARS} characters")
    meta = parse_json_object(text, RecordError, f"{op}: the header's meta")
    try:
        tensors = dict(arrays.to_torch_state_dict())
    except Exception as exc:  # noqa: BLE001 - whatever the arrays fail on, the sender is at fault
        raise RecordError(f"{op}: its tensors cannot be read ({type(exc).__name__}: {exc})") from None
    for name, tensor in tensors.items():
        if tensor.dtype not in DTYPE_NAMES:
            raise RecordError(f"{op}: tensor {name} has dtype {tensor.dtype}, which fedsplit does not take")
    return Message(op, client, step, meta=meta, tensors=tensors)


def state_to_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    """Named tensors (a client's LoRA and head, a global adapter) as an ArrayRecord."""
    return ArrayRecord(OrderedDict((k, v.detach().cpu().contiguous()) for k, v in tensors.items()))


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Inverse of ``state_to_record``."""
    return dict(record.to_torch_state_dict())
