"""Typed payloads of the session and federation ops: one home for what a hello,
a join, a round and an upload carry, and for what the server answers.

Each payload turns into a ``Message`` (``to_message``) and back
(``from_message``); both sides use the same classes, so a field is added in one
place. ``from_message`` treats the message as hostile: every field is checked
for type and range, and anything else raises ``ProtocolError`` (a
``WireError``) naming the op, the field and what was expected.

Tensors of a federation payload travel under prefixed names, one group per
prefix: ``A:``/``B:`` LoRA factors, ``H:`` the shared head, ``D:`` updates to
fold into frozen weights, each followed by the whole-model name.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter_codec import parse_adapter_codec
from .fingerprint import checkpoint_fingerprint
from .linkcodecs import LinkCodecs
from .lora import LoraSpec
from .partition import Cut
from .wire import Message, WireError

FACTOR_A, FACTOR_B, HEAD, DELTA = "A:", "B:", "H:", "D:"
PREFIXES = (FACTOR_A, FACTOR_B, HEAD, DELTA)
TRAINABLE = ("both", "A", "B")
ALLOCATIONS = ("fixed", "fedra", "fedpilot", "fisher")  # how a federation chooses the blocks each client trains
ROUND_STATUS = ("wait", "train", "done")
_MISSING = object()
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TOKEN = re.compile(r"[0-9a-f]{32}")
MAX_SOURCE = 512
MAX_LABELS = 100_000
# LoRA targets of a hello: each module name is matched against every target,
# so a list of a million would cost the server minutes (the family's own
# lists have 2 to 7 names).
MAX_TARGETS = 64
MAX_TARGET_NAME = 200
# Layer allocation: per-block maps (memory costs, gradient scores) name at most
# this many blocks, and a memory figure is at most 1 PiB.
MAX_BLOCKS = 4096
MAX_BYTES = 1 << 50
_BLOCK_KEY = re.compile(r"0|[1-9][0-9]{0,5}")


class ProtocolError(WireError):
    """A message whose payload does not fit its op's schema."""


# ---------------------------------------------------------------- field checks


def _field(meta: dict, op: str, key: str, kind: str, default=_MISSING):
    """``meta[key]`` checked against ``kind``: "int", "count" (int >= 0),
    "positive" (int >= 1), "float", "str", "bool", "map" or "list"."""
    value = meta.get(key, default)
    if value is _MISSING:
        raise ProtocolError(f"{op}: field {key!r} is missing")
    if value is None and default is None:
        return None
    accepts, what = _KINDS[kind]
    if not accepts(value):
        raise ProtocolError(f"{op}: field {key!r} must be {what}, got {value!r}")
    return float(value) if kind == "float" else value


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# kind -> (test, what the error says is expected)
_KINDS = {
    "int": (_integer, "an integer"),
    "count": (lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    "positive": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
              "a finite number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "map": (lambda v: isinstance(v, dict), "a map"),
    "list": (lambda v: isinstance(v, list), "a list"),
}


def _choice(meta: dict, op: str, key: str, choices: tuple, default=_MISSING):
    value = _field(meta, op, key, "str", default)
    if value not in choices:
        raise ProtocolError(f"{op}: field {key!r} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _int_pair(value, op: str, what: str) -> tuple[int, int]:
    if not isinstance(value, list) or len(value) != 2 or not all(_integer(v) and v >= 0 for v in value):
        raise ProtocolError(f"{op}: {what} must be a list of two integers >= 0, got {value!r}")
    return int(value[0]), int(value[1])


def _cut(value, op: str) -> Cut:
    return Cut(*_int_pair(value, op, "'cut'"))


def _blocks(meta: dict, op: str) -> frozenset[int] | None:
    blocks = _field(meta, op, "blocks", "list", None)
    if blocks is None:
        return None
    if not all(_integer(b) and b >= 0 for b in blocks):
        raise ProtocolError(f"{op}: field 'blocks' must list block indices >= 0, got {blocks!r}")
    return frozenset(blocks)


def _block_map(meta: dict, op: str, key: str, what: str, accepts, expected: str) -> dict | None:
    """A per-block map sent with string keys ("3": value): None when absent;
    keys block indices, at most ``MAX_BLOCKS`` of them, values passing ``accepts``."""
    raw = _field(meta, op, key, "map", None)
    if raw is None:
        return None
    if len(raw) > MAX_BLOCKS:
        raise ProtocolError(f"{op}: field {key!r} names {len(raw)} blocks, at most {MAX_BLOCKS}")
    out = {}
    for k, v in raw.items():
        if not _BLOCK_KEY.fullmatch(k):
            raise ProtocolError(f"{op}: field {key!r} must be keyed by block indices (\"0\", \"1\", ...), "
                                f"got {k[:40]!r}")
        if not accepts(v):
            raise ProtocolError(f"{op}: {what} of block {k} must be {expected}, got {v!r}")
        out[int(k)] = v
    return out


def _block_list(meta: dict, op: str, key: str) -> frozenset[int] | None:
    """A list of distinct block indices (None when absent), at most ``MAX_BLOCKS``."""
    blocks = _field(meta, op, key, "list", None)
    if blocks is None:
        return None
    if len(blocks) > MAX_BLOCKS or not all(_integer(b) and 0 <= b < MAX_BLOCKS for b in blocks) or \
            len(set(blocks)) != len(blocks):
        raise ProtocolError(f"{op}: field {key!r} must list at most {MAX_BLOCKS} distinct block indices")
    return frozenset(blocks)


def _labels(meta: dict, op: str) -> tuple[str, ...] | None:
    labels = _field(meta, op, "labels", "list", None)
    if labels is None:
        return None
    if not labels or len(labels) > MAX_LABELS or len(set(map(str, labels))) != len(labels) or \
            not all(isinstance(x, str) and 0 < len(x) <= MAX_SOURCE for x in labels):
        raise ProtocolError(f"{op}: field 'labels' must list 1 to {MAX_LABELS} distinct non-empty names "
                            f"of at most {MAX_SOURCE} characters")
    return tuple(labels)


def pack(**groups: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors of several groups under their prefixes: ``pack(A={...}, B={...},
    head={...}, delta={...})``."""
    prefix = {"A": FACTOR_A, "B": FACTOR_B, "head": HEAD, "delta": DELTA}
    out = {}
    for group, tensors in groups.items():
        out.update({prefix[group] + name: t for name, t in tensors.items()})
    return out


def unpack(tensors: dict[str, torch.Tensor], op: str) -> dict[str, dict[str, torch.Tensor]]:
    """The groups of ``pack``; refuses a name without a known prefix."""
    groups: dict[str, dict[str, torch.Tensor]] = {p: {} for p in PREFIXES}
    for name, t in tensors.items():
        prefix = name[:2]
        if prefix not in groups or len(name) == 2:
            raise ProtocolError(f"{op}: tensor {name!r} has no group prefix ({', '.join(PREFIXES)} then a name)")
        groups[prefix][name[2:]] = t
    return groups


# ---------------------------------------------------------------- hello


@dataclass(frozen=True)
class ModelInfo:
    """What both sides must agree on about the model: its type, depth, width
    and checkpoint fingerprint (``split.fingerprint``). ``source`` names the
    checkpoint for messages only."""

    model_type: str
    num_layers: int
    hidden_size: int
    fingerprint: str
    source: str = ""

    def to_meta(self) -> dict:
        return {"model_type": self.model_type, "num_layers": self.num_layers, "hidden_size": self.hidden_size,
                "fingerprint": self.fingerprint, "source": self.source}

    @classmethod
    def from_meta(cls, meta, op: str = "hello") -> "ModelInfo":
        if not isinstance(meta, dict):
            raise ProtocolError(f"{op}: field 'model' must be a map, got {meta!r}")
        fingerprint = _field(meta, op, "fingerprint", "str")
        if not _HEX64.fullmatch(fingerprint):
            raise ProtocolError(f"{op}: field 'fingerprint' must be 64 hex digits, got {fingerprint[:80]!r}")
        source = _field(meta, op, "source", "str", "")
        if len(source) > MAX_SOURCE:
            raise ProtocolError(f"{op}: field 'source' is longer than {MAX_SOURCE} characters")
        return cls(_field(meta, op, "model_type", "str"), _field(meta, op, "num_layers", "positive"),
                   _field(meta, op, "hidden_size", "positive"), fingerprint, source)

    @classmethod
    def of(cls, folder, config) -> "ModelInfo":
        """The description of the checkpoint in ``folder`` loaded with ``config``."""
        folder = Path(folder)
        return cls(config.model_type, config.num_hidden_layers, config.get_text_config().hidden_size,
                   checkpoint_fingerprint(folder), f"{folder.parent.name}/{folder.name}")

    def mismatch(self, other: "ModelInfo") -> str | None:
        """Why a client with ``other`` cannot train through a server with this
        model (None: they match)."""
        mine = (self.model_type, self.num_layers, self.hidden_size)
        theirs = (other.model_type, other.num_layers, other.hidden_size)
        if mine != theirs:
            return (f"model mismatch: the server hosts {self.source or 'a model'} "
                    f"({self.model_type}, {self.num_layers} blocks, width {self.hidden_size}), the client has "
                    f"{other.source or 'a model'} ({other.model_type}, {other.num_layers} blocks, width "
                    f"{other.hidden_size}); start both with the same --model")
        if self.fingerprint != other.fingerprint:
            return (f"checkpoint mismatch: the server hosts {self.source or 'a checkpoint'} (fingerprint "
                    f"{self.fingerprint[:12]}), the client has {other.source or 'a checkpoint'} (fingerprint "
                    f"{other.fingerprint[:12]}): same architecture, different weights or config. "
                    "Give both sides the same checkpoint files")
        return None


@dataclass(frozen=True)
class OptimizerSettings:
    """The server-side optimizer a client asks for (AdamW)."""

    lr: float = 1e-3
    weight_decay: float = 0.0

    def __post_init__(self):
        if not (self.lr > 0 and self.weight_decay >= 0):
            raise ValueError(f"optimizer: lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")


@dataclass(frozen=True)
class Hello:
    """A client's registration: its model, cut (None: the server's), LoRA,
    seed, task, server-side optimizer, for classification its number of
    labels (a two-part server's head must have as many), and the codecs of its
    traffic (split/linkcodecs.py: the server answers in its down codec)."""

    model: ModelInfo
    lora: LoraSpec
    task: str
    seed: int = 0
    cut: Cut | None = None
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    num_labels: int | None = None
    codecs: LinkCodecs = field(default_factory=LinkCodecs)

    def to_message(self) -> Message:
        meta = {"model": self.model.to_meta(), "lora": self.lora.to_dict(), "task": self.task, "seed": self.seed,
                "optim": {"lr": self.optimizer.lr, "weight_decay": self.optimizer.weight_decay},
                "codecs": self.codecs.to_meta()}
        if self.cut is not None:
            meta["cut"] = [self.cut.front, self.cut.back]
        if self.num_labels is not None:
            meta["num_labels"] = self.num_labels
        return Message("hello", meta=meta)

    @classmethod
    def from_message(cls, msg: Message) -> "Hello":
        op, meta = "hello", msg.meta
        lora = _field(meta, op, "lora", "map")
        targets = lora.get("targets")
        if isinstance(targets, list) and (len(targets) > MAX_TARGETS or any(
                isinstance(t, str) and len(t) > MAX_TARGET_NAME for t in targets)):
            raise ProtocolError(f"hello: at most {MAX_TARGETS} LoRA targets of at most {MAX_TARGET_NAME} "
                                f"characters each, got {len(targets)}")
        try:
            spec = LoraSpec.from_dict(lora)
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"hello: bad LoRA spec {lora!r}: {exc}") from None
        optim = _field(meta, op, "optim", "map", {})
        try:
            settings = OptimizerSettings(_field(optim, op, "lr", "float", 1e-3),
                                         _field(optim, op, "weight_decay", "float", 0.0))
        except ValueError as exc:
            raise ProtocolError(f"hello: {exc}") from None
        cut = meta.get("cut")
        codecs = meta.get("codecs")
        try:
            codecs = LinkCodecs() if codecs is None else LinkCodecs.from_meta(codecs)
        except ValueError as exc:
            raise ProtocolError(f"hello: {exc}") from None
        return cls(model=ModelInfo.from_meta(_field(meta, op, "model", "map")), lora=spec,
                   task=_field(meta, op, "task", "str"), seed=_field(meta, op, "seed", "int", 0),
                   cut=None if cut is None else _cut(cut, op), optimizer=settings,
                   num_labels=_field(meta, op, "num_labels", "positive", None), codecs=codecs)


@dataclass(frozen=True)
class FederationSettings:
    """How a federation's rounds run, as a client needs to know it."""

    strategy: str
    rounds: int
    local_steps: int
    local_epochs: float = 0.0  # > 0: passes over the client's data instead of local_steps
    allocation: str = "fixed"  # "fixed": each client's --blocks; otherwise the server allocates every round
    adapter_up: str = "fp32"  # codec of the uploads' factors and head (split/adapter_codec.py)
    adapter_down: str = "fp32"  # codec of the round offers' factors and head

    def to_meta(self) -> dict:
        return {"strategy": self.strategy, "rounds": self.rounds, "local_steps": self.local_steps,
                "local_epochs": self.local_epochs, "allocation": self.allocation,
                "adapter_up": self.adapter_up, "adapter_down": self.adapter_down}

    @classmethod
    def from_meta(cls, meta, op: str) -> "FederationSettings":
        if not isinstance(meta, dict):
            raise ProtocolError(f"{op}: federation settings must be a map, got {meta!r}")
        epochs = _field(meta, op, "local_epochs", "float", 0.0)
        if epochs < 0:
            raise ProtocolError(f"{op}: field 'local_epochs' must be >= 0, got {epochs}")
        codecs = []
        for key in ("adapter_up", "adapter_down"):
            try:
                codecs.append(parse_adapter_codec(_field(meta, op, key, "str", "fp32"), f"{op}: field {key!r}").text)
            except ValueError as exc:
                raise ProtocolError(str(exc)) from None
        return cls(_field(meta, op, "strategy", "str"), _field(meta, op, "rounds", "positive"),
                   _field(meta, op, "local_steps", "positive"), epochs,
                   _choice(meta, op, "allocation", ALLOCATIONS, "fixed"), *codecs)


@dataclass(frozen=True)
class Welcome:
    """The server's answer to a hello."""

    num_layers: int
    server_cut: Cut
    session_timeout: float
    federation: FederationSettings | None = None  # None: plain split training
    token: str = ""  # the session's secret: every later request of this client carries it
    restored: int | None = None  # steps of the saved server-side adapter given back (None: a fresh one)

    def to_message(self, client: str) -> Message:
        return Message("ok", client, meta={
            "num_layers": self.num_layers, "server_cut": [self.server_cut.front, self.server_cut.back],
            "session_timeout": self.session_timeout, "token": self.token,
            "federation": None if self.federation is None else self.federation.to_meta(),
            "restored": self.restored})

    @classmethod
    def from_message(cls, msg: Message) -> "Welcome":
        op, meta = "hello reply", msg.meta
        fed = meta.get("federation")
        token = _field(meta, op, "token", "str")
        if not _TOKEN.fullmatch(token):
            raise ProtocolError(f"{op}: field 'token' must be 32 hex digits")
        return cls(_field(meta, op, "num_layers", "positive"), _cut(_field(meta, op, "server_cut", "list"), op),
                   _field(meta, op, "session_timeout", "float"),
                   None if fed is None else FederationSettings.from_meta(fed, op), token,
                   _field(meta, op, "restored", "count", None))


# ---------------------------------------------------------------- join


@dataclass(frozen=True)
class Join:
    """A client joining the federation: its LoRA rank and alpha, sample count,
    the blocks it trains (None: all), its profile, its client-side LoRA
    modules (whole-model name -> (d_out, d_in)) and, for classification, its
    class names in head order (every client's head must mean the same classes).

    For layer allocation (server/allocation.py) it may add what it can
    afford: ``capacity``, the blocks it can train per round; ``train_memory``,
    its memory budget for trainable blocks in bytes; and ``block_costs``, the
    training memory of each block of the model in bytes, from its own cost
    model (``profiles.cost.block_memory`` with its batch, sequence length and rank)."""

    rank: int
    alpha: float
    num_samples: int
    modules: dict[str, tuple[int, int]]
    blocks: frozenset[int] | None = None
    profile: str = ""
    labels: tuple[str, ...] | None = None
    capacity: int | None = None
    train_memory: int | None = None
    block_costs: dict[int, int] | None = None

    def to_message(self) -> Message:
        return Message("join", meta={
            "rank": self.rank, "alpha": self.alpha, "num_samples": self.num_samples,
            "blocks": None if self.blocks is None else sorted(self.blocks), "profile": self.profile,
            "modules": {m: [d_out, d_in] for m, (d_out, d_in) in self.modules.items()},
            "labels": None if self.labels is None else list(self.labels),
            "capacity": self.capacity, "train_memory": self.train_memory,
            "block_costs": None if self.block_costs is None else {str(b): c for b, c in self.block_costs.items()}})

    @classmethod
    def from_message(cls, msg: Message) -> "Join":
        op, meta = "join", msg.meta
        modules = {str(m): _int_pair(v, op, f"module {m!r}") for m, v in _field(meta, op, "modules", "map").items()}
        alpha = _field(meta, op, "alpha", "float")
        if alpha <= 0:
            raise ProtocolError(f"join: field 'alpha' must be > 0, got {alpha}")
        train_memory = _field(meta, op, "train_memory", "positive", None)
        if train_memory is not None and train_memory > MAX_BYTES:
            raise ProtocolError(f"join: field 'train_memory' must be at most {MAX_BYTES} bytes, got {train_memory}")
        costs = _block_map(meta, op, "block_costs", "the memory cost", lambda v: _integer(v) and 0 <= v <= MAX_BYTES,
                           f"an integer number of bytes in [0, {MAX_BYTES}]")
        return cls(_field(meta, op, "rank", "positive"), alpha, _field(meta, op, "num_samples", "count"), modules,
                   _blocks(meta, op), _field(meta, op, "profile", "str", ""), _labels(meta, op),
                   _field(meta, op, "capacity", "positive", None), train_memory, costs)


# ---------------------------------------------------------------- round


@dataclass
class RoundOffer:
    """The server's answer to a round poll.

    ``status`` is "wait" (poll again), "train" (a round to train) or "done"
    (the final global model). With "train" and "done" the offer carries the
    download: factors to load (at ``rank``, after a fresh initialisation from
    ``fresh_seed`` when that is not None), the head, which factors train, the
    method's client-side ``options``; and, in any status, ``deltas`` to fold
    into the frozen weights first.

    ``blocks`` are the blocks whose LoRA the client trains this round (None:
    all it holds; layer allocation); it uploads only their modules, and
    with ``fisher`` it also uploads each block's squared-gradient score.
    """

    status: str
    round: int
    A: dict[str, torch.Tensor] = field(default_factory=dict)
    B: dict[str, torch.Tensor] = field(default_factory=dict)
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    rank: int | None = None
    alpha: float | None = None
    trainable: str = "both"
    fresh_seed: int | None = None
    options: dict = field(default_factory=dict)
    blocks: frozenset[int] | None = None
    fisher: bool = False
    codecs: dict = field(default_factory=dict)  # packed tensor name -> CodecSpec it travels in (default raw)

    def to_message(self, client: str) -> Message:
        meta = {"status": self.status, "round": self.round, "rank": self.rank, "alpha": self.alpha,
                "trainable": self.trainable, "fresh_seed": self.fresh_seed, "options": self.options,
                "blocks": None if self.blocks is None else sorted(self.blocks), "fisher": self.fisher}
        return Message("ok", client, meta=meta,
                       tensors=pack(A=self.A, B=self.B, head=self.head, delta=self.deltas), codecs=self.codecs)

    @classmethod
    def from_message(cls, msg: Message) -> "RoundOffer":
        op, meta = "round reply", msg.meta
        groups = unpack(msg.tensors, op)
        status = _choice(meta, op, "status", ROUND_STATUS)
        rank = _field(meta, op, "rank", "positive", None)
        if status != "wait" and rank is None:
            raise ProtocolError(f"{op}: a {status!r} offer needs field 'rank'")
        return cls(status, _field(meta, op, "round", "count"), groups[FACTOR_A], groups[FACTOR_B], groups[HEAD],
                   groups[DELTA], rank, _field(meta, op, "alpha", "float", None),
                   _choice(meta, op, "trainable", TRAINABLE, "both"), _field(meta, op, "fresh_seed", "count", None),
                   _field(meta, op, "options", "map", {}), _block_list(meta, op, "blocks"),
                   _field(meta, op, "fisher", "bool", False))


# ---------------------------------------------------------------- upload


@dataclass
class UploadPayload:
    """A client's upload for ``round``: its client-side factors (at ``rank``:
    HetLoRA may have pruned it), its head and its sample count; when the
    offer asked for them, ``fisher``: per trained client-side block, the
    mean over the round's steps of the sum of its LoRA gradients squared;
    and its round record (``split.records``). The record is taken as sent
    here and checked by the coordinator (``server.admission.check_record``),
    so a bad one is refused like a bad tensor: the round stops waiting for
    that client. With ``delta`` (top-k uploads, split/adapter_codec.py) a
    factor or head tensor the round's offer carried holds the update against
    it, not the tensor itself."""

    round: int
    num_samples: int
    rank: int
    A: dict[str, torch.Tensor] = field(default_factory=dict)
    B: dict[str, torch.Tensor] = field(default_factory=dict)
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    fisher: dict[int, float] | None = None
    record: object = field(default_factory=dict)
    delta: bool = False
    codecs: dict = field(default_factory=dict)  # packed tensor name -> CodecSpec it travels in (default raw)

    def to_message(self) -> Message:
        meta = {"round": self.round, "num_samples": self.num_samples, "rank": self.rank, "record": self.record}
        if self.fisher is not None:
            meta["fisher"] = {str(b): float(v) for b, v in self.fisher.items()}
        if self.delta:
            meta["delta"] = True
        return Message("upload", meta=meta, tensors=pack(A=self.A, B=self.B, head=self.head), codecs=self.codecs)

    @classmethod
    def from_message(cls, msg: Message) -> "UploadPayload":
        op, meta = "upload", msg.meta
        groups = unpack(msg.tensors, op)
        if groups[DELTA]:
            raise ProtocolError("upload: a client cannot send frozen-weight updates (D: tensors)")
        if set(groups[FACTOR_A]) != set(groups[FACTOR_B]):
            odd = sorted(set(groups[FACTOR_A]) ^ set(groups[FACTOR_B]))
            raise ProtocolError(f"upload: modules {odd[:3]} have one LoRA factor but not the other")
        fisher = _block_map(meta, op, "fisher", "the gradient score", lambda v: _KINDS["float"][0](v) and v >= 0,
                            "a finite number >= 0")
        return cls(_field(meta, op, "round", "count"), _field(meta, op, "num_samples", "count"),
                   _field(meta, op, "rank", "positive"), groups[FACTOR_A], groups[FACTOR_B], groups[HEAD],
                   None if fisher is None else {b: float(v) for b, v in fisher.items()}, meta.get("record", {}),
                   _field(meta, op, "delta", "bool", False))
