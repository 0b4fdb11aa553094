"""The backbone server: a ZeroMQ ROUTER loop, one compute thread, and a
dispatch table from op to handler.

The server hosts blocks [K1, L - K2) of a model (its ``--cut``) and serves any
client whose own cut keeps at least those blocks on the client side. The jobs
behind the handlers live elsewhere: sessions, adapters, optimizers and expiry
in ``sessions.py``; forward and backward in ``compute.py``; turns at the
compute thread in ``scheduler.py``; rounds in ``rounds.py``; checkpoints in
``checkpoint.py``; payloads in ``split/protocol.py``. ``handle`` answers one
message without sockets (running its work inline), so tests can drive a
server in-process.

Threads, and who owns what (``serve``):

- The loop thread owns the ROUTER socket (ZeroMQ sockets are not thread-safe).
  It receives, validates, answers what needs no model at once (``status``,
  ``ping``, refusals of malformed or out-of-bounds requests, "busy" when a
  connection's queue is full), queues the rest, and sends every reply.
- The compute thread owns the model: adapters, optimizers, waiting graphs,
  the coordinator and checkpoints. It runs queued requests one at a time, a
  turn per connection in order (``Scheduler``), and between them ``tick``
  (expiry, rounds). Its replies, already encoded, come back through a queue
  and an inproc PAIR socket that wakes the loop.
- ``Sessions.lock`` guards the sessions table between them: only the compute
  thread adds or drops sessions; the loop looks sessions up (and refreshes
  their clocks) under the lock. ``PendingMemory`` and ``Scheduler`` have locks
  of their own.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import zmq

from split.devices import place, resolve_device, resolve_dtype
from split.families import block_of
from split.lora import adapter_state
from split.partition import SERVER, Cut, build_segment
from split.protocol import Hello, Join, ModelInfo, UploadPayload, Welcome
from split.wire import Limits, Message, WireError, decode, encode, error, frame_len

from .checkpoint import last_round, read_coordinator, write_round
from .compute import BackboneCompute
from .rounds import Coordinator, FederationConfig, FederationError
from .scheduler import Scheduler
from .sessions import MB, RequestError, Session, Sessions, check_server_lora
from .strategies.base import ClientInfo, StrategyError

log = logging.getLogger(__name__)

# Ops the loop thread answers itself, at once, whatever the compute thread is doing.
LOOP_OPS = ("status", "ping")
# The loop decodes a header up to this size itself: even one built to be slow
# to validate (a map of a million empty lists takes about 3 s per MiB) costs
# it milliseconds. A larger header (an upload of many tensors, a join listing
# many labels) is decoded by the compute thread in its connection's turn.
LOOP_HEADER_BYTES = 16 << 10
# Connections that never complete their ZeroMQ handshake are closed after
# this long (libzmq's default is 30 s), and ZMTP heartbeats drop peers that
# stopped answering, so dead and half-open connections give back their file
# descriptors. What remains: a peer that completes the handshake and answers
# heartbeats holds its descriptor, so someone with more live connections than
# the hard limit on open files (raised to at server start) can still fill it.
HANDSHAKE_MS = 10_000
HEARTBEAT_MS, HEARTBEAT_TIMEOUT_MS, HEARTBEAT_TTL_MS = 10_000, 30_000, 60_000


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
    max_queued: int = 8  # requests one connection may have waiting for the compute thread
    recv_hwm: int = 8  # messages ZeroMQ buffers per connection before the loop reads them

    def __post_init__(self):
        check_server_lora(self.server_lora)  # before the model loads
        resolve_device(self.device)
        resolve_dtype(self.dtype)
        if self.resume and (self.federation is None or self.checkpoint_dir is None):
            raise ValueError("--resume continues a federation: give its --strategy and --checkpoint-dir")
        for name in ("max_pending", "max_rank", "max_tokens", "max_sessions", "max_queued", "recv_hwm"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.max_pending_mb > 0:
            raise ValueError(f"max_pending_mb must be > 0 MiB, got {self.max_pending_mb!r}")


@dataclass
class Job:
    """A request for the compute thread: decoded (``msg``; ``session`` for a
    session op, looked up when it arrived) or, for a large header, the raw
    ``frames`` it decodes in its turn."""

    routing_id: bytes
    peer: str
    msg: Message | None = None
    session: Session | None = None
    frames: list | None = None


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
            "join": self._join, "round": self._round, "upload": self._upload, "ping": self._ping}
        self.scheduler = Scheduler(config.max_queued)
        self.socket = None
        self._replies: deque[tuple[bytes, list]] = deque()  # (routing id, encoded reply) from the compute thread
        self._worker_error: BaseException | None = None
        log.info("server segment: blocks %s of %d, %.1f MB of %.1f MB", self.sessions.hosted, seg.num_layers,
                 seg.owned_bytes / 1e6, seg.checkpoint_bytes / 1e6)

    # ------------------------------------------------------------ socket loop

    def bind(self, context: zmq.Context | None = None) -> str:
        """Bind the ROUTER socket; returns the bound endpoint."""
        raise_open_files_limit()
        context = context or zmq.Context.instance()
        self.socket = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self._limit_socket(self.socket)
        self.socket.bind(self.config.bind)
        return self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def _limit_socket(self, socket: zmq.Socket) -> None:
        """What ZeroMQ holds for a connection before the loop sees it, and how
        soon it lets go of a silent one. A frame may be up to twice the largest
        header or tensor the wire accepts, so a client just over a limit gets a
        refusal that names it; a larger frame drops the connection unread.
        At most ``recv_hwm`` messages wait per connection."""
        limits = self.config.limits
        socket.setsockopt(zmq.MAXMSGSIZE, 2 * max(limits.max_header_bytes, limits.max_tensor_bytes))
        socket.setsockopt(zmq.RCVHWM, self.config.recv_hwm)
        socket.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
        socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
        socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        socket.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TTL_MS)

    def serve(self, should_stop=lambda: False, poll_ms: int = 200) -> None:
        """Serve until ``should_stop()`` is true: this thread runs the loop,
        a compute thread started here runs the model work (module docstring)."""
        if self.socket is None:
            self.bind()
        context = self.socket.context
        address = f"inproc://fedsplit-wake-{id(self)}"
        wake_rx, wake_tx = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
        wake_rx.bind(address)
        wake_tx.connect(address)
        self.scheduler = Scheduler(self.config.max_queued)
        worker = threading.Thread(target=self._work, args=(wake_tx, poll_ms / 1000), name="fedsplit-compute",
                                  daemon=True)
        worker.start()
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(wake_rx, zmq.POLLIN)
        try:
            while not should_stop():
                ready = dict(poller.poll(poll_ms))
                if wake_rx in ready:
                    while wake_rx.poll(0):
                        wake_rx.recv()
                self._send_replies()
                if self._worker_error is not None:
                    raise RuntimeError("the server's compute thread stopped") from self._worker_error
                if self.socket in ready:
                    self._receive()
        finally:
            self.scheduler.close()
            worker.join()
            wake_rx.close(linger=0)
            wake_tx.close(linger=0)

    def _receive(self, most: int = 64) -> None:
        """Take up to ``most`` waiting messages (then replies get their turn to be sent)."""
        for _ in range(most):
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            routing_id, body = frames[0].bytes, frames[1:]
            admitted = self._admit(routing_id, body, "", defer=True)
            if isinstance(admitted, Job) and not self.scheduler.put(routing_id, admitted):
                admitted = self._busy(admitted)
            if isinstance(admitted, Message):
                self.socket.send_multipart([routing_id] + encode(admitted), copy=False)

    def _busy(self, job: Job) -> Message:
        msg = job.msg or Message("error")
        reply = error(msg.client, msg.step, f"{self.scheduler.max_queued} requests from this connection already "
                      "wait for the server (--max-queued); wait for their replies before sending more", "busy")
        reply.meta["rid"] = msg.meta.get("rid")
        return reply

    def _send_replies(self) -> None:
        while self._replies:
            routing_id, frames = self._replies.popleft()
            self.socket.send_multipart([routing_id] + frames, copy=False)

    def _work(self, wake: zmq.Socket, poll_s: float) -> None:
        """The compute thread: run queued requests a turn at a time, and tick between them."""
        try:
            while True:
                job = self.scheduler.take(poll_s)
                if job is not None:
                    # Encoded here: a reply's tensors may sit on an accelerator this thread is using.
                    self._replies.append((job.routing_id, encode(self._run(job))))
                    _wake(wake)
                elif self.scheduler.closed:
                    return
                self.tick()
        except BaseException as exc:  # noqa: BLE001 - handed to the loop, which stops the server with it
            log.exception("the compute thread failed")
            self._worker_error = exc
            _wake(wake)

    def tick(self) -> None:
        """Expire silent sessions, advance the rounds, checkpoint a closed round."""
        self.sessions.expire(busy=self.scheduler.busy)
        if self.coordinator is not None:
            closed = self.coordinator.tick()
            if closed is not None and self.config.checkpoint_dir is not None:
                self._checkpoint(closed.round)

    # ------------------------------------------------------------ dispatch

    def handle(self, routing_id: bytes, frames: list, peer: str = "") -> Message:
        """Answer one message, running its work in this thread; never raises
        for anything a client sent. ``peer`` is the sender's authenticated
        CurveZMQ key ("" on a plain socket): a session is served only to its
        token from that key."""
        admitted = self._admit(routing_id, frames, peer, defer=False)
        return admitted if isinstance(admitted, Message) else self._run(admitted)

    def _admit(self, routing_id: bytes, frames: list, peer: str, defer: bool) -> Message | Job:
        """What the loop does with a message: its reply when it needs no model
        (a refusal, status, ping), else the Job for the compute thread. With
        ``defer`` a large header is left for the compute thread to decode."""
        if defer and frames and LOOP_HEADER_BYTES < frame_len(frames[0]) <= self.config.limits.max_header_bytes:
            return Job(routing_id, peer, frames=frames)
        try:
            msg = decode(frames, self.config.limits)
        except WireError as exc:
            return _malformed(routing_id, exc)

        def admit() -> Message | Job:
            session = self._session(msg, peer, routing_id)
            if msg.op in LOOP_OPS:
                return self._dispatch(routing_id, peer, msg, session)
            if msg.op == "forward":
                self.compute.check_inputs(msg.tensors)
            elif msg.op == "hello":
                self.sessions.check_rank(Hello.from_message(msg).lora.rank)
            return Job(routing_id, peer, msg=msg, session=session)

        return self._answering(msg, admit)

    def _run(self, job: Job) -> Message:
        """Answer a queued request (on the compute thread, or inline for ``handle``)."""
        msg = job.msg
        if msg is None:
            try:
                with gc_paused():
                    msg = decode(job.frames, self.config.limits)
            except WireError as exc:
                return _malformed(job.routing_id, exc)
        session = job.session

        def run() -> Message:
            nonlocal session
            if session is None:
                session = self._session(msg, job.peer, job.routing_id)
            else:
                self.sessions.current(session)
            try:
                return self._dispatch(job.routing_id, job.peer, msg, session)
            finally:
                if session is not None:
                    self.sessions.touch(session)

        def forget() -> None:
            if session is not None:
                session.graphs.pop(msg.step, None)

        return self._answering(msg, run, forget)

    def _session(self, msg: Message, peer: str, routing_id: bytes) -> Session | None:
        """The caller's session for a session op (refused without one); None for an open op."""
        if msg.op in self.session_ops:
            return self.sessions.get(msg.client, msg.meta.get("token", ""), peer, routing_id)
        if msg.op not in self.open_ops:
            raise RequestError(f"op {msg.op!r} is a reply, not a request")
        return None

    def _dispatch(self, routing_id: bytes, peer: str, msg: Message, session: Session | None) -> Message:
        if session is None:
            return self.open_ops[msg.op](routing_id, peer, msg)
        return self.session_ops[msg.op](session, msg)

    def _answering(self, msg: Message, answer: Callable[[], "Message | Job"],
                   on_failure: Callable[[], None] = lambda: None) -> "Message | Job":
        """``answer()``, with whatever it raises for this request turned into
        an error reply whose code says what the client can do about it."""
        try:
            reply = answer()
        except RequestError as exc:
            reply = error(msg.client, msg.step, str(exc), exc.code)
        except WireError as exc:
            reply = error(msg.client, msg.step, str(exc), "malformed")
        except (FederationError, StrategyError) as exc:
            reply = error(msg.client, msg.step, str(exc), "refused")
        except Exception as exc:  # a bad tensor can fail deep inside the model
            log.exception("request %s from %s failed", msg.op, msg.client)
            on_failure()
            reply = error(msg.client, msg.step, f"{msg.op} failed on the server: {type(exc).__name__}: {exc}")
        if isinstance(reply, Message):
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
        return Message("ok", meta={**self.sessions.status(), "queued": self.scheduler.queued()})

    def _ping(self, session: Session, msg: Message) -> Message:
        return Message("ok", msg.client, msg.step)  # Sessions.get has refreshed the session's clock

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


class _GcPause:
    """Cyclic garbage collection paused while any caller is inside. msgpack
    builds a header's objects in C without letting go of the GIL, and the
    collections a million tiny lists trigger meanwhile each walk every object
    in the process: a 0.5 MB header took 1 to 2 s instead of 40 ms, and every
    other thread, the loop included, waited. Pauses may nest and overlap."""

    def __init__(self):
        self._lock = threading.Lock()
        self._inside = 0
        self._was_enabled = False

    @contextmanager
    def __call__(self):
        with self._lock:
            if self._inside == 0:
                self._was_enabled = gc.isenabled()
                gc.disable()
            self._inside += 1
        try:
            yield
        finally:
            with self._lock:
                self._inside -= 1
                if self._inside == 0 and self._was_enabled:
                    gc.enable()


gc_paused = _GcPause()


def _malformed(routing_id: bytes, exc: WireError) -> Message:
    """The error reply refusing a message that breaks the protocol."""
    log.warning("malformed message from %r: %s", routing_id, exc)
    return error("", 0, f"malformed message: {exc}", "malformed")


def _wake(socket: zmq.Socket) -> None:
    """Wake the loop thread to send what the compute thread left it."""
    try:
        socket.send(b"", zmq.NOBLOCK)
    except zmq.Again:
        pass  # a thousand wake-ups already wait unread: the loop will find this reply with them


def raise_open_files_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit;
    returns the soft limit now in force. Each TCP connection holds a file
    descriptor: at the common soft limit of 1024, about a thousand idle
    connections leave libzmq unable to accept any other (accept fails with
    EMFILE), locking every new client out."""
    try:
        import resource
    except ImportError:  # not on this platform (Windows): nothing to raise
        log.warning("cannot raise the limit on open files on this platform")
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft >= hard:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("could not raise the limit on open files from %d to %d (%s): about %d connections at once",
                    soft, hard, exc, soft)
        return soft
    return hard
