"""What the server holds for its clients: sessions, their server-side LoRA
adapters and optimizers, and when they expire.

All clients share one frozen backbone wrapped by peft; each client has its own
named adapter on it (SplitFed-V1) or all train one shared adapter
(SplitFed-V2). ``Sessions`` also implements the coordinator's ``ServerSide``:
loading a round's LoRA into a client's adapter, collecting it, and folding
updates into the frozen weights.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
import time
import warnings
from dataclasses import dataclass, field
from functools import cached_property

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from peft.utils.other import ModulesToSaveWrapper
from transformers.pytorch_utils import Conv1D

from split.gradients import BlockGradients, lora_blocks
from split.linkcodecs import Sender
from split.lora import (LoraSpec, attach_lora, fold_delta, get_factors, init_lora, lora_layers, pad_rows,
                        set_factors, set_trainable)
from split.partition import Cut, Segment
from split.protocol import OptimizerSettings
from split.tensorfile import CheckpointIndex
from split.wire import Message

from .replies import ReplyCache

log = logging.getLogger(__name__)

SHARED, IDLE = "shared", "idle"
SERVER_LORA = ("per-client", "shared")  # SplitFed-V1: one adapter per client; V2: one all clients train


def check_server_lora(value: str) -> None:
    """Refuse an unknown server-side LoRA mode."""
    if value not in SERVER_LORA:
        raise ValueError(f"server_lora must be one of {', '.join(SERVER_LORA)}, got {value!r}")


class RequestError(Exception):
    """A well-formed request that cannot be served; its text goes back to the
    client with ``code`` (see ``split.wire.ERROR_CODES``)."""

    code = "refused"


class SessionError(RequestError):
    """No session answers to this client id and token: the client must say hello."""

    code = "session"


class BusyError(RequestError):
    """A request the server cannot take at its present load; the same request may succeed later."""

    code = "busy"


MB = 1 << 20


class PendingMemory:
    """The bytes every waiting forward's graph holds, against one budget for
    all clients. The compute thread adds and removes; the loop thread reads
    the totals for ``status``: hence the lock."""

    def __init__(self, budget: int):
        if budget <= 0:
            raise ValueError(f"the pending-graph budget must be > 0 bytes, got {budget}")
        self.budget = budget
        self._bytes = 0
        self._count = 0
        self._lock = threading.Lock()

    def full(self) -> bool:
        """Whether the budget is spent (a new forward is refused before it runs)."""
        with self._lock:
            return self._bytes >= self.budget

    def add(self, nbytes: int) -> None:
        """Count a graph of ``nbytes``, or refuse it: "refused" when it alone
        exceeds the budget, "busy" when the graphs already waiting leave no room."""
        with self._lock:
            if nbytes > self.budget:
                raise RequestError(
                    f"this forward's graph holds {nbytes / MB:.1f} MiB, more than the {self.budget / MB:.1f} MiB "
                    "the server keeps for all waiting forwards (--max-pending-mb): send smaller batches")
            if self._bytes + nbytes > self.budget:
                raise BusyError(
                    f"waiting forwards hold {self._bytes / MB:.1f} of {self.budget / MB:.1f} MiB (--max-pending-mb) "
                    f"and this one needs {nbytes / MB:.1f} MiB: send the backward of earlier steps, or retry later")
            self._bytes += nbytes
            self._count += 1

    def remove(self, nbytes: int) -> None:
        with self._lock:
            self._bytes -= nbytes
            self._count -= 1

    def totals(self) -> tuple[int, int]:
        """(graphs, bytes) waiting now."""
        with self._lock:
            return self._count, self._bytes


class Graphs:
    """One session's forwards awaiting their backward: step -> (input, output),
    each counted in the server's ``PendingMemory`` until it is popped or cleared.
    Only the compute thread touches it."""

    def __init__(self, memory: PendingMemory):
        self.memory = memory
        self._entries: dict[int, tuple[Pending, int]] = {}

    def put(self, step: int, h_in: torch.Tensor, out: torch.Tensor, nbytes: int) -> None:
        """Keep a graph of ``nbytes`` (raises if the budget has no room for it)."""
        if step in self._entries:
            raise RequestError(f"step {step} already has a forward waiting for its backward")
        self.memory.add(nbytes)
        self._entries[step] = (Pending(h_in, out, time.monotonic()), nbytes)

    def pop(self, step: int, default=None) -> "Pending | None":
        """``step``'s waiting graph, now no longer counted; ``default`` if none waits."""
        entry = self._entries.pop(step, None)
        if entry is None:
            return default
        self.memory.remove(entry[1])
        return entry[0]

    def stale(self, now: float, timeout: float) -> list[int]:
        """Steps whose forward has waited longer than ``timeout`` seconds."""
        return sorted(step for step, (p, _) in self._entries.items() if now - p.since > timeout)

    def clear(self) -> None:
        for step in list(self._entries):
            self.pop(step)

    def __contains__(self, step) -> bool:
        return step in self._entries

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class Pending:
    """A training forward whose backward has not arrived: the injected input,
    the output to backpropagate from, and when the forward ran."""

    h_in: torch.Tensor
    out: torch.Tensor
    since: float


@dataclass
class Session:
    """What the server holds for one client."""

    client: str
    routing_id: bytes  # where replies go: the connection the latest authenticated request came from
    token: str  # the secret the server issued at hello; only its holder is served
    peer: str  # the CurveZMQ public key the session was opened with ("" on a plain socket)
    adapter: str
    cut: Cut
    spec: LoraSpec
    optimizer_settings: OptimizerSettings
    optimizer: torch.optim.Optimizer
    params: list
    last_seen: float
    graphs: Graphs = None  # forwards awaiting their backward; Sessions.open gives one counted in its budget
    steps: int = 0
    seed: int = 0  # the client's seed: its server-side dropout is drawn from it and the step
    replies: ReplyCache = field(default_factory=lambda: ReplyCache(16))  # see server/replies.py
    saved_steps: int = 0  # steps when its adapter was last saved (server/persist.py)
    hello: tuple = ()  # (SHA-256 of the token the opening hello presented, its rid): spots a resent hello
    welcome: Message | None = None  # the answer to that hello, sent again to its resend
    gradients: BlockGradients | None = None  # squared gradients per block this round (--allocation fisher)
    down: Sender = field(default_factory=Sender)  # the client's down codec and its residuals (split/linkcodecs.py)

    def __post_init__(self):
        if not isinstance(self.graphs, Graphs):
            raise TypeError("a Session needs its Graphs, counted in the server's PendingMemory")

    @property
    def shared(self) -> bool:
        return self.adapter == SHARED


def _owns(session: Session, token: str, peer: str, need_token: bool = False) -> bool:
    """Whether a request with ``token`` from ``peer`` belongs to ``session``:
    its token always does (and, on an encrypted socket, only from its key);
    for a hello, the same authenticated key is enough (a restarted client)."""
    if session.peer and peer != session.peer:
        return False
    # As bytes: compare_digest raises TypeError on a str with non-ASCII characters.
    if isinstance(token, str) and token and hmac.compare_digest(token.encode(), session.token.encode()):
        return True
    return bool(session.peer) and not need_token


def make_optimizer(params: list, settings: OptimizerSettings) -> torch.optim.Optimizer:
    """AdamW over a session's trainable server-side parameters."""
    if not params:
        raise RequestError("the requested LoRA targets match no module in the server's blocks")
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)


def idle_parameter() -> torch.nn.Parameter:
    """An empty parameter: the optimizer of an adapter that trains nothing this round (it never steps it)."""
    return torch.nn.Parameter(torch.zeros(0))


def _adaptable(model: torch.nn.Module):
    """(name, module) of each module of the wrapped model as peft names it
    when it adds an adapter, without what lies inside peft's own wrappers
    (a LoRA layer's base layer and factors are no targets)."""
    inside = None
    for name, module in model.named_modules():  # parents first: a wrapper's modules follow it
        if inside is not None and name.startswith(inside):
            continue
        inside = name + "." if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)) else None
        if name:
            yield name, module


def _linear_shape(module: torch.nn.Module) -> tuple[int, int] | None:
    """(d_out, d_in) of a linear layer (or of the one a LoRA layer wraps); None for anything else."""
    base = module.get_base_layer() if isinstance(module, LoraLayer) else module
    if isinstance(base, torch.nn.Linear):
        return base.out_features, base.in_features
    if isinstance(base, Conv1D):  # GPT-2's layers keep the weight as (d_in, d_out)
        d_in, d_out = base.weight.shape
        return d_out, d_in
    return None


class Sessions:
    """The server's clients: one session each, keyed by client id."""

    def __init__(self, segment: Segment, timeout: float, server_lora: str = "per-client", seed: int = 0, *,
                 max_sessions: int, max_rank: int, pending_budget: int, pending_timeout: float = 60.0,
                 reply_cache: int = 16):
        check_server_lora(server_lora)
        self.segment = segment
        self.timeout = timeout
        self.pending_timeout = pending_timeout
        self.reply_cache = reply_cache  # replies kept per session for resent requests
        self.server_lora = server_lora
        self.max_sessions = max_sessions
        self.max_rank = max_rank
        self.pending = PendingMemory(pending_budget)
        # The compute thread alone changes by_client (open, drop, expire) and
        # reads it freely; the loop thread reads it (get, status) and updates
        # a session's clock and connection. Both hold this lock to do so.
        self.lock = threading.Lock()
        self.hosted = list(segment.cut.server_blocks(segment.num_layers))
        # peft cannot add an adapter to a model whose adapters were all deleted,
        # so a rank-1 adapter that is never activated keeps the wrapper alive.
        self.model = attach_lora(segment.model, LoraSpec(rank=1), segment.family, segment.task, seed,
                                 adapter=IDLE, blocks=self.hosted)
        self.by_client: dict[str, Session] = {}
        self._created = 0
        self._shared: tuple[LoraSpec, list, torch.optim.Optimizer] | None = None
        self._active: str | None = None
        self.score_gradients = False  # measure squared gradients per block of each round (--allocation fisher)

    # ------------------------------------------------------------ lifetime

    def check_owner(self, client: str, token: str, peer: str) -> None:
        """Refuse a hello for a client id whose session belongs to someone
        else: only the holder of its token, or a peer authenticated with the
        same key, may replace it. The refusal leaves the session untouched."""
        session = self.by_client.get(client)
        if session is None or _owns(session, token, peer):
            return
        raise RequestError(f"client id {client!r} is in use by another session; choose another --client-id "
                           f"(a session silent for {self.timeout:.0f}s is freed)")

    def check_rank(self, rank: int) -> None:
        """Refuse a rank above the server's limit: checked before anything is allocated."""
        if rank > self.max_rank:
            raise RequestError(f"LoRA rank {rank} exceeds this server's limit of {self.max_rank} (--max-rank); "
                               "ask for a smaller --rank")

    def check_lora(self, spec: LoraSpec, cut: Cut) -> dict[str, tuple[int, int]]:
        """The modules ``spec`` adapts in the server blocks of ``cut`` (name ->
        (d_out, d_in)), refusing a spec peft would fail on or that is out of
        bounds, before any adapter exists: the rank above the limit or above a
        module's smaller dimension, a target that is not a linear layer, or
        targets that match nothing."""
        self.check_rank(spec.rank)
        seg = self.segment
        config = spec.peft_config(seg.family, None, seg.task, list(cut.server_blocks(seg.num_layers)))
        matched = {name: module for name, module in _adaptable(self.model.base_model.model)
                   if check_target_module_exists(config, name)}
        if not matched:
            raise RequestError(f"the LoRA targets {', '.join(spec.target_modules(seg.family))} match no module in "
                               "the server's blocks of this cut; use the family's module names (--targets)")
        dims = {}
        for name, module in matched.items():
            shape = _linear_shape(module)
            if shape is None:
                raise RequestError(f"LoRA target {name} is a {type(module).__name__}, not a linear layer; "
                                   "choose --targets that name linear layers")
            if spec.rank > min(shape):
                raise RequestError(f"LoRA rank {spec.rank} exceeds the smaller dimension of {name} "
                                   f"({shape[0]} x {shape[1]}); ask for a rank of at most {min(shape)}")
            dims[name] = shape
        return dims

    def _check_room(self, client: str) -> None:
        """Refuse a new session once the server holds its limit (a client replacing its own does not count)."""
        if client not in self.by_client and len(self.by_client) >= self.max_sessions:
            raise BusyError(f"the server holds its limit of {self.max_sessions} sessions (--max-sessions); "
                            f"retry later (a session silent for {self.timeout:.0f}s is freed)")

    def open(self, client: str, routing_id: bytes, cut: Cut, spec: LoraSpec, seed: int,
             settings: OptimizerSettings, peer: str = "", token: str | None = None) -> Session:
        """A new session for ``client`` with its adapter, optimizer and a fresh
        token (or ``token``, one the client proved it holds, when a restored
        adapter keeps its owner); an old session of the same id is dropped only
        once the new one exists (the caller has checked the hello may replace it). Everything
        is checked before anything is allocated, and whatever a failure leaves
        half made is removed again."""
        self._check_room(client)
        self.check_lora(spec, cut)
        seg = self.segment
        heads = seg.family.trained_heads(seg.task) if seg.cut.two_part else None
        if self.server_lora == "shared":
            adapter, params, optimizer = self._shared_adapter(spec, heads, seed, settings)
        else:
            self._created += 1
            adapter = f"client{self._created}"
            try:
                self.model = attach_lora(self.model, spec, seg.family, seg.task, seed, modules_to_save=heads,
                                         adapter=adapter, blocks=list(cut.server_blocks(seg.num_layers)))
                params = [p for n, p in self.model.named_parameters() if f".{adapter}." in n]
                optimizer = make_optimizer(params, settings)
            except BaseException:
                self._discard(adapter)
                raise
        if client in self.by_client:
            log.info("client %s registers again: its old session is dropped", client)
            self.drop(client)
        session = Session(client, routing_id, token or secrets.token_hex(16), peer, adapter, cut, spec, settings,
                          optimizer, params, time.monotonic(), graphs=Graphs(self.pending), seed=seed,
                          replies=ReplyCache(self.reply_cache))
        with self.lock:
            self.by_client[client] = session
        self._active = None
        log.info("client %s joined: cut %s, LoRA r=%d, %d server-side tensors", client, cut, spec.rank, len(params))
        return session

    def _discard(self, adapter: str) -> None:
        """Remove every trace of an adapter: peft's config and each layer's
        entries. peft leaves the layers it had reached when a later module
        fails, and each leftover entry slows every later forward and hello."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
            if adapter in self.model.peft_config:
                self.model.delete_adapter(adapter)
            for module in self.model.modules():
                if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
                    module.delete_adapter(adapter)
        self._active = None

    def _shared_adapter(self, spec: LoraSpec, heads, seed: int, settings: OptimizerSettings):
        """SplitFed-V2: the one server-side adapter, created by the first client."""
        seg = self.segment
        if self._shared is None:
            try:
                self.model = attach_lora(self.model, spec, seg.family, seg.task, seed, modules_to_save=heads,
                                         adapter=SHARED, blocks=self.hosted)
                params = [p for n, p in self.model.named_parameters() if f".{SHARED}." in n]
                self._shared = (spec, params, make_optimizer(params, settings))
            except BaseException:
                self._discard(SHARED)
                raise
        shared_spec, params, optimizer = self._shared
        if (spec.rank, spec.alpha, spec.targets) != (shared_spec.rank, shared_spec.alpha, shared_spec.targets):
            raise RequestError(f"this server trains one shared server-side LoRA (rank {shared_spec.rank}, alpha "
                               f"{shared_spec.alpha}); join with the same --rank, --alpha and --targets")
        return SHARED, params, optimizer

    def get(self, client: str, token: str, peer: str, routing_id: bytes) -> Session:
        """The session of ``client`` if ``token`` (and, on an encrypted socket,
        the peer's key) is its own; replies follow the session to the
        connection this request came from. Refreshes its clock."""
        with self.lock:
            session = self.by_client.get(client)
            if session is None or not _owns(session, token, peer, need_token=True):
                # One answer for both cases, so a probe learns nothing about other clients' ids.
                raise SessionError(f"no session for client {client!r} with this token: send hello first "
                                   "(or the session expired)")
            session.routing_id = routing_id
            session.last_seen = time.monotonic()
            return session

    def current(self, session: Session) -> None:
        """Refuse work for a session that was dropped or replaced while the work waited its turn."""
        if self.by_client.get(session.client) is not session:
            raise SessionError(f"the session of client {session.client!r} ended while this request waited: "
                               "send hello again")

    def touch(self, session: Session) -> None:
        """Restart a session's clock: a client waiting for a reply is not silent."""
        with self.lock:
            session.last_seen = time.monotonic()

    def drop(self, client: str) -> None:
        """Free a client's graphs, adapter and optimizer."""
        with self.lock:
            session = self.by_client.pop(client)
        session.graphs.clear()
        if not session.shared:
            session.optimizer.state.clear()
            with warnings.catch_warnings():
                # peft warns when the active adapter goes; activate() picks the next one.
                warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
                self.model.delete_adapter(session.adapter)
        self._active = None
        log.info("client %s left after %d steps", client, session.steps)

    def expire(self, now: float | None = None, busy=lambda routing_id: False) -> list[str]:
        """Drop sessions silent for longer than the timeout, and forwards whose
        backward has not come within the pending timeout; returns the ids of
        the sessions dropped. A session whose connection has requests waiting
        their turn (``busy(routing_id)``) is not silent, however long they wait."""
        now = time.monotonic() if now is None else now
        with self.lock:
            gone = [c for c, s in self.by_client.items()
                    if now - s.last_seen > self.timeout and not busy(s.routing_id)]
        for client in gone:
            log.warning("client %s silent for more than %.0fs: its state is freed", client, self.timeout)
            self.drop(client)
        for client, session in self.by_client.items():
            stale = session.graphs.stale(now, self.pending_timeout)
            for step in stale:
                session.graphs.pop(step)
            if stale:
                # A shared adapter steps only while no graph waits: one forward never
                # backwarded would otherwise freeze it for every client.
                log.warning("client %s: forward(s) of step(s) %s waited more than %.0fs for their backward and "
                            "are dropped%s", client, stale, self.pending_timeout,
                            "; they no longer hold back the shared server-side LoRA's step" if session.shared else "")
        return gone

    def count(self) -> int:
        """Sessions held now (any thread may ask)."""
        with self.lock:
            return len(self.by_client)

    def status(self) -> dict:
        """Counts for the status op: anyone may ask, so no client ids."""
        pending, held = self.pending.totals()
        return {"sessions": self.count(), "pending": pending, "pending_mb": round(held / MB, 1)}

    def graphs_waiting(self) -> bool:
        """Whether any client's forward still waits for its backward."""
        return any(s.graphs for s in self.by_client.values())

    def activate(self, session: Session) -> None:
        """Route the backbone's LoRA layers through ``session``'s adapter."""
        if self._active == session.adapter:
            return
        self.model.set_adapter(session.adapter)
        # set_adapter makes every factor of the active adapter trainable and
        # freezes the others; what trains is each session's own list (a graph
        # another client still holds needs its parameters to keep requiring grad).
        for name, p in self.model.named_parameters():
            if "lora_" in name:
                p.requires_grad_(False)
        for other in self.by_client.values():
            for p in other.params:
                p.requires_grad_(True)
        self._active = session.adapter

    def forget_active(self) -> None:
        """Make the next ``activate`` route and mark trainable again (an
        adapter's trained parameters changed)."""
        self._active = None

    def shared_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The shared server-side LoRA (empty without one): part of the global model as it is."""
        return {} if self._shared is None else get_factors(self.model, SHARED)

    # ------------------------------------------------------------ ServerSide, for the coordinator

    def _federated(self, client: str) -> Session | None:
        """A client's session whose adapter the federation aggregates (not the shared one)."""
        session = self.by_client.get(client)
        return None if session is None or session.shared else session

    def modules_for(self, client: str) -> dict[str, tuple[int, int]]:
        session = self._federated(client)
        if session is None:
            return {}
        return {name: (layer.lora_B[session.adapter].weight.shape[0], layer.lora_A[session.adapter].weight.shape[1])
                for name, layer in lora_layers(self.model, session.adapter).items()}

    def load(self, client: str, A: dict, B: dict, trainable: str, fresh_seed: int | None, modules: set) -> None:
        session = self._federated(client)
        if session is None:
            return
        if fresh_seed is not None:
            init_lora(self.model, session.adapter, fresh_seed)
        rank = session.spec.rank  # a pruned (HetLoRA) rank fills the adapter's rank with zeros
        set_factors(self.model, {m: pad_rows(a, rank) for m, a in A.items()},
                    {m: pad_rows(b.T, rank).T for m, b in B.items()}, session.adapter)
        session.params = set_trainable(self.model, trainable, session.adapter, modules)
        # A round may leave none of the server's blocks to this client (layer allocation): nothing steps.
        session.optimizer = make_optimizer(session.params or [idle_parameter()], session.optimizer_settings)
        session.gradients = (BlockGradients(lora_blocks(self.model, session.adapter, modules))
                             if self.score_gradients else None)
        session.graphs.clear()
        self._active = None

    def collect(self, client: str) -> dict:
        session = self._federated(client)
        return {} if session is None else get_factors(self.model, session.adapter)

    def gradient_scores(self, client: str) -> dict[int, float]:
        session = self._federated(client)
        return {} if session is None or session.gradients is None else session.gradients.scores()

    def base_weight(self, module: str) -> torch.Tensor:
        """A module's pretrained weight (d_out x d_in), read from the checkpoint
        whichever side owns the module; nothing else is loaded."""
        seg = self.segment
        name = seg.sources.get(f"{module}.weight")
        if name is None:
            raise ValueError(f"{seg.path}: no weight for LoRA module {module}")
        weight = self._checkpoint.read(name, torch.float32)
        return weight.T if seg.family.conv1d else weight

    @cached_property
    def _checkpoint(self) -> CheckpointIndex:
        """The checkpoint's tensor index, read once (SVD initialisation asks per module)."""
        return CheckpointIndex(self.segment.path)

    def fold(self, deltas: dict) -> None:
        for module, delta in deltas.items():
            fold_delta(self.model, module, delta)
