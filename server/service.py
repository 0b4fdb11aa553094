"""The backbone server: a ZeroMQ ROUTER loop and a dispatch table from op to handler.

The server hosts blocks [K1, L - K2) of a model (its ``--cut``) and serves any
client whose own cut keeps at least those blocks on the client side. The jobs
behind the handlers live elsewhere: sessions, adapters, optimizers and expiry
in ``sessions.py``; forward and backward in ``compute.py``; rounds in
``rounds.py``; checkpoints in ``checkpoint.py``; payloads in
``split/protocol.py``. ``handle`` answers one message without sockets, so
tests can drive a server in-process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import zmq

from split.devices import place, resolve_device, resolve_dtype
from split.families import block_of
from split.lora import adapter_state
from split.partition import SERVER, Cut, build_segment
from split.protocol import Hello, Join, ModelInfo, UploadPayload, Welcome
from split.wire import Limits, Message, WireError, decode, encode, error

from .checkpoint import last_round, read_coordinator, write_round
from .compute import BackboneCompute
from .rounds import Coordinator, FederationConfig, FederationError
from .sessions import MB, RequestError, Session, Sessions, check_server_lora
from .strategies.base import ClientInfo, StrategyError

log = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    """How the server is started, and the limits of what clients may ask of it."""

    model: str | None = None
    cut: Cut = field(default_factory=Cut)
    bind: str = "tcp://*:5555"
    task: str = "classification"
    num_labels: int = 2
    seed: int = 0
    dropout: bool = True
    session_timeout: float = 120.0
    max_pending: int = 8  # forwards one client may leave waiting for their backward
    limits: Limits = field(default_factory=Limits)
    attn_implementation: str | None = None
    federation: FederationConfig | None = None
    checkpoint_dir: str | None = None
    resume: bool = False  # continue from the newest round in checkpoint_dir
    server_lora: str = "per-client"  # or "shared": one server-side adapter every client trains
    device: str = "cpu"  # cpu, cuda, cuda:N, mps or auto
    dtype: str = "float32"  # frozen weights: float32, bfloat16 or float16
    max_rank: int = 256  # largest LoRA rank a hello may ask for (and at most each module's smaller dimension)
    max_tokens: int = 16384  # largest batch x sequence of one forward
    max_sessions: int = 64  # sessions held at once
    max_pending_mb: float = 2048.0  # MiB all waiting forwards' graphs may hold together

    def __post_init__(self):
        check_server_lora(self.server_lora)  # before the model loads
        resolve_device(self.device)
        resolve_dtype(self.dtype)
        if self.resume and (self.federation is None or self.checkpoint_dir is None):
            raise ValueError("--resume continues a federation: give its --strategy and --checkpoint-dir")
        for name in ("max_pending", "max_rank", "max_tokens", "max_sessions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.max_pending_mb > 0:
            raise ValueError(f"max_pending_mb must be > 0 MiB, got {self.max_pending_mb!r}")


class BackboneServer:
    """Hosts the backbone segment and serves clients over one ROUTER socket."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.device, dtype = resolve_device(config.device), resolve_dtype(config.dtype)
        self.segment = seg = build_segment(
            config.model, SERVER, config.cut, task=config.task, num_labels=config.num_labels,
            seed=config.seed, dropout=config.dropout, dtype=dtype, attn_implementation=config.attn_implementation,
        )
        heads = seg.family.trained_heads(seg.task) if seg.cut.two_part else []
        place(seg.model, self.device, heads)
        self.model_info = ModelInfo.of(seg.path, seg.config)
        self.sessions = Sessions(seg, config.session_timeout, config.server_lora, config.seed,
                                 max_sessions=config.max_sessions, max_rank=config.max_rank,
                                 pending_budget=int(config.max_pending_mb * MB))
        self.compute = BackboneCompute(seg, self.sessions, config.max_pending, self.device, dtype,
                                       max_tokens=config.max_tokens)
        self.coordinator = None if config.federation is None else Coordinator(config.federation, self.sessions)
        if config.resume:
            self._resume()
        # Ops that need no session get the routing id; the others get the caller's session.
        self.open_ops: dict[str, Callable[[bytes, str, Message], Message]] = {
            "hello": self._hello, "status": self._status}
        self.session_ops: dict[str, Callable[[Session, Message], Message]] = {
            "forward": self._forward, "backward": self._backward, "adapter": self._adapter, "bye": self._bye,
            "join": self._join, "round": self._round, "upload": self._upload}
        self.socket = None
        log.info("server segment: blocks %s of %d, %.1f MB of %.1f MB", self.sessions.hosted, seg.num_layers,
                 seg.owned_bytes / 1e6, seg.checkpoint_bytes / 1e6)

    # ------------------------------------------------------------ socket loop

    def bind(self, context: zmq.Context | None = None) -> str:
        """Bind the ROUTER socket; returns the bound endpoint."""
        context = context or zmq.Context.instance()
        self.socket = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, self.config.limits.max_message_bytes + (1 << 20))
        self.socket.bind(self.config.bind)
        return self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def serve(self, should_stop=lambda: False, poll_ms: int = 200) -> None:
        """Serve until ``should_stop()`` is true."""
        if self.socket is None:
            self.bind()
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        while not should_stop():
            if poller.poll(poll_ms):
                frames = self.socket.recv_multipart(copy=False)
                routing_id, body = frames[0].bytes, frames[1:]
                reply = self.handle(routing_id, body)
                self.socket.send_multipart([routing_id] + encode(reply), copy=False)
            self.tick()

    def tick(self) -> None:
        """Expire silent sessions, advance the rounds, checkpoint a closed round."""
        self.sessions.expire()
        if self.coordinator is not None:
            closed = self.coordinator.tick()
            if closed is not None and self.config.checkpoint_dir is not None:
                self._checkpoint(closed.round)

    # ------------------------------------------------------------ dispatch

    def handle(self, routing_id: bytes, frames: list, peer: str = "") -> Message:
        """Answer one message; never raises for anything a client sent.
        ``peer`` is the sender's authenticated CurveZMQ key ("" on a plain
        socket): a session is served only to its token from that key."""
        try:
            msg = decode(frames, self.config.limits)
        except WireError as exc:
            log.warning("malformed message from %r: %s", routing_id, exc)
            return error("", 0, f"malformed message: {exc}", "malformed")
        token = msg.meta.get("token", "")
        session = None
        try:
            if msg.op in self.open_ops:
                reply = self.open_ops[msg.op](routing_id, peer, msg)
            elif msg.op in self.session_ops:
                session = self.sessions.get(msg.client, token, peer, routing_id)
                reply = self.session_ops[msg.op](session, msg)
            else:
                raise RequestError(f"op {msg.op!r} is a reply, not a request")
        except RequestError as exc:
            reply = error(msg.client, msg.step, str(exc), exc.code)
        except WireError as exc:
            reply = error(msg.client, msg.step, str(exc), "malformed")
        except (FederationError, StrategyError) as exc:
            reply = error(msg.client, msg.step, str(exc), "refused")
        except Exception as exc:  # a bad tensor can fail deep inside the model
            log.exception("request %s from %s failed", msg.op, msg.client)
            if session is not None:
                session.graphs.pop(msg.step, None)
            reply = error(msg.client, msg.step, f"{msg.op} failed on the server: {type(exc).__name__}: {exc}")
        reply.meta["rid"] = msg.meta.get("rid")
        return reply

    # ------------------------------------------------------------ session ops

    def _hello(self, routing_id: bytes, peer: str, msg: Message) -> Message:
        if not msg.client:
            raise RequestError("hello needs a client id")
        hello = Hello.from_message(msg)
        self.sessions.check_owner(msg.client, msg.meta.get("token", ""), peer)
        seg = self.segment
        mismatch = self.model_info.mismatch(hello.model)
        if mismatch:
            raise RequestError(mismatch)
        cut = hello.cut or seg.cut
        try:
            cut.check(seg.num_layers)
        except ValueError as exc:
            raise RequestError(f"bad cut: {exc}") from None
        if cut.front < seg.cut.front or cut.back < seg.cut.back:
            raise RequestError(
                f"cut {cut} asks the server for blocks it does not host: it hosts "
                f"{seg.cut.front}..{seg.num_layers - seg.cut.back - 1} (server --cut {seg.cut})")
        if cut.two_part and not seg.cut.two_part:
            raise RequestError("a two-part split (back = 0) needs a server started with --cut K1,0")
        if cut.two_part and hello.task != seg.task:
            raise RequestError(f"the server's head is for task {seg.task!r}, the client asked {hello.task!r}")
        if cut.two_part and seg.task == "classification" and hello.num_labels != seg.config.num_labels:
            raise RequestError(
                f"the server's classification head has {seg.config.num_labels} labels, the client's data has "
                f"{hello.num_labels}; restart the server with --num-labels {hello.num_labels}")
        session = self.sessions.open(msg.client, routing_id, cut, hello.lora, hello.seed, hello.optimizer, peer)
        fed = self.config.federation
        welcome = Welcome(seg.num_layers, seg.cut, self.config.session_timeout,
                          None if fed is None else fed.settings(), session.token)
        return welcome.to_message(msg.client)

    def _status(self, routing_id: bytes, peer: str, msg: Message) -> Message:
        return Message("ok", meta=self.sessions.status())

    def _forward(self, session: Session, msg: Message) -> Message:
        tensors = self.compute.forward(session, msg.step, msg.tensors, bool(msg.meta.get("train", True)))
        return Message("ok", msg.client, msg.step, tensors=tensors)

    def _backward(self, session: Session, msg: Message) -> Message:
        grad = self.compute.backward(session, msg.step, msg.tensors.get("grad"))
        return Message("ok", msg.client, msg.step, tensors={"grad": grad})

    def _adapter(self, session: Session, msg: Message) -> Message:
        return Message("ok", msg.client, msg.step, tensors=adapter_state(self.sessions.model, session.adapter))

    def _bye(self, session: Session, msg: Message) -> Message:
        self.sessions.drop(session.client)
        return Message("ok", msg.client, msg.step)

    # ------------------------------------------------------------ federation ops

    def _federation(self) -> Coordinator:
        if self.coordinator is None:
            raise RequestError("this server runs no federation: start it with --strategy and --rounds")
        return self.coordinator

    def _join(self, session: Session, msg: Message) -> Message:
        join = Join.from_message(msg)
        if join.rank != session.spec.rank:
            raise RequestError(f"join says rank {join.rank}, hello said {session.spec.rank}")
        if join.labels is not None and self.segment.task != "classification":
            raise RequestError(f"join names class labels, but this server trains {self.segment.task!r}")
        info = ClientInfo(session.client, join.rank, join.alpha, join.blocks, join.num_samples)
        settings = self._federation().join(session.client, info, join.modules, join.profile, join.labels)
        return Message("ok", msg.client, msg.step, meta=settings.to_meta())

    def _round(self, session: Session, msg: Message) -> Message:
        return self._federation().poll(session.client).to_message(msg.client)

    def _upload(self, session: Session, msg: Message) -> Message:
        self._federation().upload(session.client, UploadPayload.from_message(msg))
        return Message("ok", msg.client, msg.step)

    # ------------------------------------------------------------ checkpoints

    def _checkpoint(self, round_index: int) -> None:
        coord, seg = self.coordinator, self.segment
        folder = write_round(self.config.checkpoint_dir, round_index, coord.global_model(), seg.family, seg.task,
                             str(seg.path), coord.merged, coord.snapshot(), self.sessions.shared_factors(),
                             labels=coord.labels)
        log.info("checkpoint %s", folder)

    def _resume(self) -> None:
        folder = last_round(self.config.checkpoint_dir)
        if folder is None:
            raise ValueError(f"--resume: no complete round_N folder in {self.config.checkpoint_dir}")
        snap = read_coordinator(folder)
        self.coordinator.restore(snap)
        hosted = set(self.sessions.hosted)
        self.sessions.fold({m: d for m, d in snap["merged"].items() if block_of(m) in hosted})
        log.warning("resuming after %s: next round %d of %d", folder.name, self.coordinator.round,
                    self.coordinator.config.rounds)
