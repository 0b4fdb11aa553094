"""The plan file ``fedsplit plan --json`` writes and ``fedsplit server --plan``
reads, and the one check of a client's entry both ends of the wire use.

::

    {"version": 1,
     "model": {"model_type": "bert", "num_layers": 6, "hidden_size": 384,
               "fingerprint": "<64 hex digits, or null>", "source": "..."},
     "seq_len": 64, "server_cut": [1, 1], "margin": 0.15, "same_rank": false,
     "clients": {"<profile name>": {"k1": 1, "k2": 1, "rank": 8, "trainable": [4, 5],
                                    "batch": 16, "seq_len": 64, "codec_up": "int8", ...}}}

Everything read is treated as hostile: each field is checked for type and
range, and a problem is a ``PlanFileError`` naming the file, the field and what
was expected.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from split.codecs import parse_codec
from split.protocol import ProtocolError
from split.wire import Message

from .planner import ClientPlan
from .quantized import QUANTIZED

VERSION = 1
MAX_NAME = 200  # a profile name (profiles/schema.py allows as many characters)
MAX_CLIENTS = 10_000
MAX_BLOCKS = 100_000
MAX_SOURCE = 512
MAX_CODEC = 100  # a codec's text: a name and a few parameters
_HEX64 = re.compile(r"[0-9a-f]{64}")


class PlanFileError(ValueError):
    """A plan file, or a plan entry from the network, that does not follow the schema."""


@dataclass(frozen=True)
class PlanModel:
    """The model a plan was made for: what a server checks against its own.
    ``fingerprint`` is None where the planner saw only the model's config."""

    model_type: str
    num_layers: int
    hidden_size: int
    fingerprint: str | None = None
    source: str = ""

    def to_dict(self) -> dict:
        return {"model_type": self.model_type, "num_layers": self.num_layers, "hidden_size": self.hidden_size,
                "fingerprint": self.fingerprint, "source": self.source}


@dataclass(frozen=True)
class PlanFile:
    """A whole plan: the model, the sequence length, the server's cut it was
    made for, and one entry per device profile name."""

    model: PlanModel
    seq_len: int
    server_cut: tuple[int, int]
    clients: dict[str, ClientPlan]
    margin: float = 0.15
    same_rank: bool = False

    def to_json(self) -> str:
        data = {"version": VERSION, "model": self.model.to_dict(), "seq_len": self.seq_len,
                "server_cut": list(self.server_cut), "margin": self.margin, "same_rank": self.same_rank,
                "clients": {name: _entry(plan) for name, plan in self.clients.items()}}
        return json.dumps(data, indent=2) + "\n"


def _entry(plan: ClientPlan) -> dict:
    """A client's entry: the plan less its device name (the key says it)."""
    entry = plan.to_dict()
    del entry["device"]
    return entry


def entry_to_meta(plan: ClientPlan) -> dict:
    """A client's plan as it travels in a message (with its device name)."""
    return plan.to_dict()


# ---------------------------------------------------------------- checks


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(data: dict, key: str, where: str, low: int) -> int:
    if key not in data:
        raise PlanFileError(f"{where}: field {key!r} is missing")
    value = data[key]
    if not (_integer(value) and value >= low):
        raise PlanFileError(f"{where}: field {key!r} must be an integer >= {low}, got {_show(value)}")
    return value


def _float(data: dict, key: str, where: str, low: float, high: float = math.inf) -> float:
    if key not in data:
        raise PlanFileError(f"{where}: field {key!r} is missing")
    value = data[key]
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and low <= value < high):
        bound = f"in [{low:g}, {high:g})" if math.isfinite(high) else f">= {low:g}"
        raise PlanFileError(f"{where}: field {key!r} must be a finite number {bound}, got {_show(value)}")
    return float(value)


def _str(data: dict, key: str, where: str, most: int, empty: bool = False) -> str:
    if key not in data:
        raise PlanFileError(f"{where}: field {key!r} is missing")
    value = data[key]
    if not (isinstance(value, str) and (empty or value) and len(value) <= most):
        raise PlanFileError(f"{where}: field {key!r} must be a string of {0 if empty else 1} to {most} characters, "
                            f"got {_show(value)}")
    return value


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def _map(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise PlanFileError(f"{where} must be a map, got {_show(value)}")
    return value


def device_name(value, where: str) -> str:
    """A profile name as a plan names it: printable, 1 to MAX_NAME characters."""
    if not (isinstance(value, str) and 0 < len(value) <= MAX_NAME and value.isprintable()):
        raise PlanFileError(f"{where}: a device name must be a printable string of 1 to {MAX_NAME} characters, "
                            f"got {_show(value)}")
    return value


ENTRY_FIELDS = ("k1", "k2", "rank", "trainable", "batch", "seq_len", "predicted_peak_bytes", "budget_bytes",
                "bytes_up", "bytes_down", "predicted_step_s", "train_memory_bytes", "capacity", "dtype", "codec_up",
                "codec_down", "weights")
DTYPES = ("float32", "bfloat16", "float16")
WEIGHTS = (*DTYPES, *QUANTIZED)


def client_plan(device: str, data, where: str) -> ClientPlan:
    """``device``'s plan from a map (a file's entry or a message's), every
    field checked for type and range, and for consistency with the others."""
    data = _map(data, where)
    unknown = sorted(set(data) - set(ENTRY_FIELDS) - {"device"})
    if unknown:
        raise PlanFileError(f"{where}: unknown field {unknown[0]!r}; an entry has {', '.join(ENTRY_FIELDS)}")
    trainable = data.get("trainable")
    if not (isinstance(trainable, list) and 0 < len(trainable) <= MAX_BLOCKS
            and all(_integer(b) and b >= 0 for b in trainable)):
        raise PlanFileError(f"{where}: field 'trainable' must be a non-empty list of block indices >= 0, "
                            f"got {_show(trainable)}")
    if trainable != sorted(set(trainable)):
        raise PlanFileError(f"{where}: field 'trainable' must list each block once, in increasing order, "
                            f"got {_show(trainable)}")
    plan = ClientPlan(device, _int(data, "k1", where, 1), _int(data, "k2", where, 0), _int(data, "rank", where, 1),
                      list(trainable), _int(data, "batch", where, 1), _int(data, "seq_len", where, 2),
                      _int(data, "predicted_peak_bytes", where, 0), _int(data, "budget_bytes", where, 1),
                      _int(data, "bytes_up", where, 0), _int(data, "bytes_down", where, 0),
                      _float(data, "predicted_step_s", where, 0.0), _int(data, "train_memory_bytes", where, 0),
                      _int(data, "capacity", where, 1), _dtype(data, where), _codec(data, "codec_up", where),
                      _codec(data, "codec_down", where), _weights(data, where))
    if plan.capacity != len(trainable):
        raise PlanFileError(f"{where}: field 'capacity' is {plan.capacity} but 'trainable' lists {len(trainable)} "
                            "blocks; capacity is the number of trainable blocks")
    return plan


def _dtype(data: dict, where: str) -> str:
    value = data.get("dtype")
    if value not in DTYPES:
        raise PlanFileError(f"{where}: field 'dtype' must be one of {', '.join(DTYPES)}, got {_show(value)}")
    return value


def _codec(data: dict, key: str, where: str) -> str:
    """A wire codec's text (``split.codecs.parse_codec``), in its canonical form."""
    if key not in data:
        raise PlanFileError(f"{where}: field {key!r} is missing")
    value = data[key]
    if not (isinstance(value, str) and 0 < len(value) <= MAX_CODEC):
        raise PlanFileError(f"{where}: field {key!r} must be a codec such as fp32 or int8, got {_show(value)}")
    try:
        return parse_codec(value).text
    except ValueError as exc:
        raise PlanFileError(f"{where}: field {key!r}: {exc}") from None
def _weights(data: dict, where: str) -> str:
    """An entry's weights: unquantized in its dtype (also when the entry
    predates the field), or 8bit or 4bit."""
    value = data.get("weights", data.get("dtype"))
    if value not in WEIGHTS or (value not in QUANTIZED and value != data.get("dtype")):
        raise PlanFileError(f"{where}: field 'weights' must be the entry's dtype ({_show(data.get('dtype'))}) or "
                            f"one of {', '.join(QUANTIZED)}, got {_show(value)}")
    return value


def parse_plan(text: str, source: str) -> PlanFile:
    """The plan in JSON ``text``; ``source`` names it in errors."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlanFileError(f"{source}: not valid JSON ({exc}); `fedsplit plan --json FILE` writes a plan") from None
    data = _map(data, source)
    version = data.get("version")
    if version != VERSION:
        raise PlanFileError(f"{source}: field 'version' must be {VERSION}, got {_show(version)}; make the plan "
                            "again with this fedsplit's `fedsplit plan`")
    known = {"version", "model", "seq_len", "server_cut", "margin", "same_rank", "clients"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PlanFileError(f"{source}: unknown field {unknown[0]!r}; a plan has {', '.join(sorted(known))}")
    model = _model(data.get("model"), f"{source}: model")
    seq_len = _int(data, "seq_len", source, 2)
    cut = data.get("server_cut")
    if not (isinstance(cut, list) and len(cut) == 2 and all(_integer(v) for v in cut) and cut[0] >= 1
            and cut[1] >= 0):
        raise PlanFileError(f"{source}: field 'server_cut' must be [K1, K2] with K1 >= 1 and K2 >= 0, "
                            f"got {_show(cut)}")
    margin = _float(data, "margin", source, 0.0, 1.0)
    same_rank = data.get("same_rank")
    if not isinstance(same_rank, bool):
        raise PlanFileError(f"{source}: field 'same_rank' must be true or false, got {_show(same_rank)}")
    clients = _map(data.get("clients"), f"{source}: field 'clients'")
    if not 0 < len(clients) <= MAX_CLIENTS:
        raise PlanFileError(f"{source}: field 'clients' must hold 1 to {MAX_CLIENTS} entries, got {len(clients)}")
    plans = {}
    for name, entry in clients.items():
        where = f"{source}: clients[{_show(name)}]"
        plan = client_plan(device_name(name, where), entry, where)
        _consistent(plan, model.num_layers, tuple(cut), seq_len, where)
        plans[name] = plan
    return PlanFile(model, seq_len, (cut[0], cut[1]), plans, margin, same_rank)


def _model(value, where: str) -> PlanModel:
    data = _map(value, where)
    fingerprint = data.get("fingerprint")
    if fingerprint is not None and not (isinstance(fingerprint, str) and _HEX64.fullmatch(fingerprint)):
        raise PlanFileError(f"{where}: field 'fingerprint' must be 64 hex digits or null, got {_show(fingerprint)}")
    return PlanModel(_str(data, "model_type", where, MAX_NAME), _int(data, "num_layers", where, 2),
                     _int(data, "hidden_size", where, 1), fingerprint,
                     _str(data, "source", where, MAX_SOURCE, empty=True))


def _consistent(plan: ClientPlan, num_layers: int, server_cut: tuple[int, int], seq_len: int, where: str) -> None:
    """An entry that fits its model and the plan's server cut."""
    if plan.k1 + plan.k2 >= num_layers:
        raise PlanFileError(f"{where}: cut {plan.k1},{plan.k2} leaves the server no block of the model's "
                            f"{num_layers}; k1 + k2 must be at most {num_layers - 1}")
    if plan.k1 < server_cut[0] or plan.k2 < server_cut[1]:
        raise PlanFileError(f"{where}: cut {plan.k1},{plan.k2} asks the server for blocks outside the plan's "
                            f"server cut {server_cut[0]},{server_cut[1]}")
    outside = [b for b in plan.trainable if b >= num_layers]
    if outside:
        raise PlanFileError(f"{where}: trainable block {outside[0]} does not exist: the model has blocks "
                            f"0..{num_layers - 1}")
    if plan.seq_len != seq_len:
        raise PlanFileError(f"{where}: seq_len {plan.seq_len} differs from the plan's seq_len {seq_len}")


def read_plan(path) -> PlanFile:
    """The plan in the JSON file at ``path``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PlanFileError(f"{path}: cannot read the plan ({exc.strerror or exc}); `fedsplit plan --json "
                            f"{path}` writes one") from None
    except UnicodeDecodeError:
        raise PlanFileError(f"{path}: not UTF-8 text; a plan is JSON") from None
    return parse_plan(text, str(path))


def write_plan(plan: PlanFile, path) -> Path:
    """Write ``plan`` as JSON at ``path``; returns the path."""
    path = Path(path)
    path.write_text(plan.to_json(), encoding="utf-8")
    return path


# ---------------------------------------------------------------- the "plan" op


def plan_request(profile: str) -> Message:
    """A client's request for its plan: the name of its device profile."""
    return Message("plan", meta={"profile": profile})


def requested_profile(msg: Message) -> str:
    """The profile name a "plan" request asks for (hostile input: checked)."""
    try:
        return device_name(msg.meta.get("profile"), "plan: field 'profile'")
    except PlanFileError as exc:
        raise ProtocolError(str(exc)) from None


def plan_reply(plan: ClientPlan, client: str = "") -> Message:
    """The server's answer to a "plan" request: the device's entry."""
    return Message("ok", client, meta={"plan": entry_to_meta(plan)})


def replied_plan(msg: Message, profile: str) -> ClientPlan:
    """The plan in the server's reply to a request for ``profile``'s, checked
    as hostile input; a reply for another device is an error."""
    where = "the server's plan reply"
    data = _map(msg.meta.get("plan"), f"{where}: field 'plan'")
    device = device_name(data.get("device"), where)
    if device != profile:
        raise PlanFileError(f"{where} is for device {device!r}, this client asked for {profile!r}")
    return client_plan(device, data, where)
