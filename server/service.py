"""The backbone server: a ZeroMQ ROUTER loop, one compute thread, and a
dispatch table from op to handler.

The server hosts blocks [K1, L - K2) of a model (its ``--cut``) and serves any
client whose own cut keeps at least those blocks on the client side. The jobs
behind the handlers live elsewhere: sessions, adapters, optimizers and expiry
in ``sessions.py``; forward and backward in ``compute.py``; turns at the
compute thread in ``scheduler.py``; rounds in ``rounds.py``; checkpoints in
``checkpoint.py``; per-client adapters on disk in ``persist.py``; the
reply cache for resent requests in ``replies.py``; payloads in
``split/protocol.py``. ``handle`` answers one
message without sockets (running its work inline), so tests can drive a
server in-process.

Threads, and who owns what (``serve``):

- The loop thread owns the ROUTER socket (ZeroMQ sockets are not thread-safe).
  It receives, validates, answers what needs no model at once (``status``,
  ``ping``, ``probe``, ``plan``, refusals of malformed or out-of-bounds requests,
  "busy" when a connection's queue is full), queues the rest, and sends every reply.
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
import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import zmq

from split.devices import place, resolve_device, resolve_dtype
from split.linkcodecs import Sender
from split.families import block_of
from split.lora import adapter_state
from split.partition import SERVER, Cut, build_segment
from split.protocol import Hello, Join, ModelInfo, UploadPayload, Welcome
from split.quant import check_mode, quantizer_for, refuse_frozen_updates
from split.records import SERVER_SECONDS
from split.security import PLAIN_WARNING, CurveServer, check_pair, check_plain, load_server_keys, peer_key
from split.wire import Limits, Message, WireError, decode, encode, error, frame_len

from .admission import model_layout
from .allocation import Resources
from .checkpoint import last_round, read_coordinator, write_round
from .compute import BackboneCompute
from .persist import CLIENTS, SessionStore, mismatch, owned_by, restore, session_record, token_digest
from .plans import answer_plan, load_plan
from .probe import ProbeResponder
from .replies import StepReused, replay_key
from .rounds import Coordinator, FederationConfig, FederationError
from .runlog import ServerRunLog
from .scheduler import Scheduler
from .serving import ServedAdapter, check_serving
from .sessions import MB, RequestError, Session, Sessions, check_server_lora
from .strategies.base import ClientInfo, StrategyError

log = logging.getLogger(__name__)

# Ops the loop thread answers itself, at once, whatever the compute thread is doing.
LOOP_OPS = ("status", "ping", "probe", "plan")
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
    bind: str = "tcp://127.0.0.1:5555"  # loopback: other machines need keys and e.g. tcp://*:5555
    secret_key: str | None = None  # this server's NAME.key_secret: CurveZMQ on (with allow)
    allow: str | None = None  # folder of the client public keys (NAME.key) the server admits
    task: str = "classification"
    num_labels: int = 2
    seed: int = 0
    dropout: bool = True
    session_timeout: float = 120.0
    pending_timeout: float = 60.0  # seconds a forward waits for its backward before its graph is dropped
    max_pending: int = 8  # forwards one client may leave waiting for their backward
    limits: Limits = field(default_factory=Limits)
    attn_implementation: str | None = None
    federation: FederationConfig | None = None
    checkpoint_dir: str | None = None
    resume: bool = False  # continue from checkpoint_dir: its newest round, and the clients' saved adapters
    save_every: int = 20  # plain split training: save a client's server-side adapter every N of its steps
    server_lora: str = "per-client"  # or "shared": one server-side adapter every client trains
    device: str = "cpu"  # cpu, cuda, cuda:N, mps or auto
    dtype: str = "float32"  # frozen weights: float32, bfloat16 or float16
    quantize: str = "none"  # the backbone blocks' frozen linear weights: none, 8bit or 4bit (split/quant.py)
    max_rank: int = 256  # largest LoRA rank a hello may ask for (and at most each module's smaller dimension)
    max_tokens: int = 16384  # largest batch x sequence of one forward
    max_sessions: int = 64  # sessions held at once
    max_pending_mb: float = 2048.0  # MiB all waiting forwards' graphs may hold together
    max_queued: int = 8  # requests one connection may have waiting for the compute thread
    recv_hwm: int = 8  # messages ZeroMQ buffers per connection before the loop reads them
    plan: str | None = None  # plan file (`fedsplit plan --json`): each device profile's entry, served by "plan"
    run_dir: str | None = None  # a federation's clients.jsonl and rounds.jsonl (server/runlog.py)
    adapter: str | None = None  # a saved adapter every session starts from, for inference (server/serving.py)

    def __post_init__(self):
        if self.run_dir is not None and self.federation is None:
            raise ValueError("--run-dir records a federation's rounds; this server runs none: add --strategy")
        check_server_lora(self.server_lora)  # before the model loads
        if not (math.isfinite(self.pending_timeout) and self.pending_timeout > 0):
            raise ValueError(f"pending_timeout must be a finite number of seconds > 0, got {self.pending_timeout}")
        resolve_device(self.device)
        resolve_dtype(self.dtype)
        check_mode(self.quantize)
        folding = None if self.federation is None else self.federation.frozen_updates()
        if self.quantize != "none" and folding is not None:
            raise refuse_frozen_updates(f"--quantize {self.quantize} with {folding}")
        if not check_pair(("--secret-key", self.secret_key), ("--allow", self.allow)):
            check_plain(self.bind, "--bind", "--secret-key and --allow")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("--resume continues from saved state: give the --checkpoint-dir it was saved in")
        if self.adapter is not None:
            check_serving(self.federation is not None, self.server_lora, self.cut)
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0 steps (0: never), got {self.save_every}")
        for name in ("max_pending", "max_rank", "max_tokens", "max_sessions", "max_queued", "recv_hwm"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.max_pending_mb > 0:
            raise ValueError(f"max_pending_mb must be > 0 MiB, got {self.max_pending_mb!r}")


@dataclass
class Call:
    """A function for the compute thread (``BackboneServer.submit``)."""

    fn: Callable[[], object]
    future: Future

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            self.future.set_result(self.fn())
        except BaseException as exc:  # noqa: BLE001 - the caller gets it from the future
            self.future.set_exception(exc)


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
        self.keys = load_server_keys(config.secret_key, config.allow)  # a bad key file fails before the model loads
        self.curve: CurveServer | None = None
        # Made before the model loads: a bad --run-dir fails at once.
        self.runlog = ServerRunLog(config.run_dir, config.resume) if config.federation is not None else None
        self._context: zmq.Context | None = None  # the server's own, when it runs an authenticator
        self.device, dtype = resolve_device(config.device), resolve_dtype(config.dtype)
        quantizer = quantizer_for(config.quantize, self.device, dtype)  # before the model loads
        self.segment = seg = build_segment(
            config.model, SERVER, config.cut, task=config.task, num_labels=config.num_labels,
            seed=config.seed, dropout=config.dropout, dtype=dtype, attn_implementation=config.attn_implementation,
            on_loaded=quantizer,
        )
        if quantizer is not None:
            quantizer.finish(seg.model)
        heads = seg.family.trained_heads(seg.task) if seg.cut.two_part else []
        place(seg.model, self.device, heads)
        self.model_info = ModelInfo.of(seg.path, seg.config)
        # A client resends at most one request at a time, but pipelined forwards
        # each keep a reply until their backward: room for both, twice over.
        self.sessions = Sessions(seg, config.session_timeout, config.server_lora, config.seed,
                                 max_sessions=config.max_sessions, max_rank=config.max_rank,
                                 pending_budget=int(config.max_pending_mb * MB),
                                 pending_timeout=config.pending_timeout, reply_cache=2 * config.max_pending)
        plain = config.federation is None
        self.served = None if config.adapter is None else ServedAdapter.load(config.adapter, seg)
        if self.served is not None:
            self.sessions.fold(self.served.base_delta)
        self.store = SessionStore(config.checkpoint_dir if plain else None, config.save_every, None)
        self.compute = BackboneCompute(seg, self.sessions, config.max_pending, self.device, dtype,
                                       max_tokens=config.max_tokens)
        self.coordinator = None if config.federation is None else Coordinator(
            config.federation, self.sessions, model_layout(seg.config, seg.family, seg.task))
        self.sessions.score_gradients = self.coordinator is not None and self.coordinator.allocation.wants_gradients
        self.plan = None if config.plan is None else load_plan(
            config.plan, self.model_info, seg.cut, config.max_rank, config.max_tokens,
            None if self.coordinator is None else (config.federation.strategy,
                                                   self.coordinator.strategy.heterogeneous_ranks,
                                                   self.coordinator.strategy.block_subsets))
        self._tick_error: str | None = None
        if config.resume and not plain:
            self._resume()
        elif config.resume:
            self._resume_plain()
        # Ops that need no session get the routing id; the others get the caller's session.
        self.open_ops: dict[str, Callable[[bytes, str, Message], Message]] = {
            "hello": self._hello, "status": self._status, "probe": self._probe, "plan": self._plan}
        self.session_ops: dict[str, Callable[[Session, Message], Message]] = {
            "forward": self._idempotent(self._forward), "backward": self._idempotent(self._backward),
            "adapter": self._adapter, "bye": self._bye, "ping": self._ping,
            "join": self._idempotent(self._join), "round": self._idempotent(self._round),
            "upload": self._idempotent(self._upload)}
        self.probes = ProbeResponder(config.limits)
        self.scheduler = Scheduler(config.max_queued)
        self.socket = None
        self._replies: deque[tuple[bytes, list]] = deque()  # (routing id, encoded reply) from the compute thread
        self._worker_error: BaseException | None = None
        # False: a driver outside the server (server/flower_strategy.py) starts and closes the rounds.
        self.round_clock = True
        log.debug("server segment: blocks %s of %d, %.1f MB of %.1f MB", self.sessions.hosted, seg.num_layers,
                 seg.owned_bytes / 1e6, seg.checkpoint_bytes / 1e6)

    # ------------------------------------------------------------ socket loop

    def bind(self, context: zmq.Context | None = None) -> str:
        """Bind the ROUTER socket, a CurveZMQ server with its authenticator
        when the server has keys; returns the bound endpoint."""
        raise_open_files_limit()
        if self.keys is not None and context is None:
            # One ZAP authenticator serves a whole context: a context of its
            # own keeps this server's allowlist from applying to other sockets.
            context = self._context = zmq.Context()
        context = context or zmq.Context.instance()
        self.socket = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self._limit_socket(self.socket)
        if self.keys is not None:
            self.curve = CurveServer(self.keys, context)
            self.curve.secure(self.socket)
        self.socket.bind(self.config.bind)
        endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        if self.keys is None:
            log.warning(PLAIN_WARNING, endpoint)
        else:
            log.info("CurveZMQ on %s: %d client keys admitted from %s", endpoint, len(self.keys.allowed),
                     self.keys.folder)
        return endpoint

    def close(self) -> None:
        """Close the socket and stop the authenticator (and the server's own context)."""
        if self.socket is not None:
            self.socket.close(linger=0)
        if self.curve is not None:
            self.curve.stop()
            self.curve = None
        if self._context is not None:
            self._context.term()
            self._context = None
        if self.runlog is not None:
            self.runlog.close()

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
                frames, extra = self._receive_frames()
            except zmq.Again:
                return
            routing_id, body = frames[0].bytes, frames[1:]
            peer = peer_key(body[0]) if self.curve is not None and body else ""
            if extra:
                admitted = _malformed(routing_id, WireError(
                    f"a message of {len(body) + extra} frames exceeds the limit of "
                    f"{self.config.limits.max_tensors + 1} (a header and one frame per tensor)"))
            else:
                admitted = self._admit(routing_id, body, peer, defer=True)
            if isinstance(admitted, Job) and not self.scheduler.put(routing_id, admitted):
                admitted = self._busy(admitted)
            if isinstance(admitted, Message):
                self.socket.send_multipart([routing_id] + encode(admitted), copy=False)

    def _receive_frames(self) -> tuple[list, int]:
        """One message's frames, read one by one: past a header and
        ``max_tensors`` tensor frames (plus the routing id) the rest are read
        and dropped unkept, so a message of a million empty frames costs no
        million frame objects. Returns (kept frames, frames dropped)."""
        keep = self.config.limits.max_tensors + 2
        frames = [self.socket.recv(zmq.NOBLOCK, copy=False)]
        dropped = 0
        while self.socket.getsockopt(zmq.RCVMORE):
            if len(frames) < keep:
                frames.append(self.socket.recv(copy=False))
            else:
                self.socket.recv(copy=True)
                dropped += 1
        return frames, dropped

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
                if isinstance(job, Call):
                    job.run()
                elif job is not None:
                    # Encoded here: a reply's tensors may sit on an accelerator this thread is using.
                    self._replies.append((job.routing_id, _encode_reply(self._run(job))))
                    _wake(wake)
                elif self.scheduler.closed:
                    return
                self.tick()
        except BaseException as exc:  # noqa: BLE001 - handed to the loop, which stops the server with it
            log.exception("the compute thread failed")
            self._worker_error = exc
            _wake(wake)

    def submit(self, fn: Callable[[], object]) -> Future:
        """Run ``fn()`` on the compute thread, in a turn of its own between
        requests; the future holds its result. What owns the model (the
        coordinator, the sessions) is then touched by one thread only."""
        call = Call(fn, Future())
        if not self.scheduler.put(Call, call):
            raise RuntimeError("a call to the compute thread is already waiting; wait for its result first")
        return call.future

    def tick(self) -> None:
        """Expire silent sessions, advance the rounds, checkpoint a closed round."""
        self.sessions.expire(busy=self.scheduler.busy)
        if self.coordinator is None or not self.round_clock:
            return
        try:
            closed = self.coordinator.tick()
            self.runlog.rounds(self.coordinator.history)
            if closed is not None and self.config.checkpoint_dir is not None:
                self._checkpoint(closed.round)
        except Exception as exc:  # noqa: BLE001 - the server outlives a failing round; the coordinator notes why
            reason = f"{type(exc).__name__}: {exc}"
            if reason != self._tick_error:  # once per reason, not once per poll
                log.exception("the federation could not advance; the server keeps serving")
            self._tick_error = reason
        else:
            self._tick_error = None

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
        except Exception:  # decode is meant to be total: this is a bug here, not the peer's
            return _decode_bug(routing_id)

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
            except Exception:  # decode is meant to be total: this is a bug here, not the peer's
                return _decode_bug(job.routing_id)
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
        token = msg.meta.get("token", "")
        resent = self._resent_hello(msg.client, token, peer, msg.meta.get("rid"))
        if resent is not None:
            return resent
        self.sessions.check_owner(msg.client, token, peer)
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
        # Only a token or an authenticated key can prove a saved adapter is the caller's.
        record = self.store.find(msg.client) if isinstance(token, str) and (token or peer) else None
        if record is not None and not owned_by(record, token, peer):
            record = None  # someone else's adapter: this hello opens a fresh session
        if self.served is not None:
            self.served.check(hello.lora)
        session = self.sessions.open(msg.client, routing_id, cut, hello.lora, hello.seed, hello.optimizer, peer,
                                     token=token if record is not None else None)
        session.down = Sender(hello.codecs.down)  # this client's replies go in its down codec
        restored = self._restore(session, record)
        if self.served is not None and restored is None:
            try:
                self.served.install(self.sessions, session)
            except RequestError:
                self.sessions.drop(msg.client)
                raise
        fed = self.config.federation
        welcome = Welcome(seg.num_layers, seg.cut, self.config.session_timeout,
                          None if fed is None else fed.settings(), session.token, restored).to_message(msg.client)
        if isinstance(token, str) and token:
            session.hello, session.welcome = (token_digest(token), msg.meta.get("rid")), welcome
        return welcome

    def _resent_hello(self, client: str, token, peer: str, rid) -> Message | None:
        """The welcome already sent for this very hello (same token, rid and
        key), if its reply was lost and the client sent it again; otherwise
        None. A first hello presents no token and is never answered this way."""
        session = self.sessions.by_client.get(client)
        if not (isinstance(token, str) and token and session is not None and session.welcome is not None):
            return None
        if session.peer != peer or session.hello != (token_digest(token), rid):
            return None
        return session.welcome

    def _restore(self, session: Session, record) -> int | None:
        """Give ``session`` its owner's saved adapter; returns its steps (None:
        nothing to restore, the adapter starts afresh)."""
        if record is None or session.shared:
            if self.coordinator is not None:
                self.coordinator.returning.pop(session.client, None)
            return None
        why = mismatch(record, session)
        if why is not None:
            log.warning("client %s: its saved server-side adapter is not restored: %s", session.client, why)
            return None
        try:
            restore(self.sessions, session, record)
        except ValueError as exc:
            log.warning("client %s: its saved server-side adapter is not restored: %s", session.client, exc)
            return None
        fed = record.meta.get("federation")
        if self.coordinator is not None and fed is not None:
            self.coordinator.returning[session.client] = (int(fed["synced"]), int(fed["rounds"]))
        log.warning("client %s registered again: its server-side adapter is restored at step %d",
                    session.client, session.steps)
        return session.steps

    def _status(self, routing_id: bytes, peer: str, msg: Message) -> Message:
        return Message("ok", meta={**self.sessions.status(), "queued": self.scheduler.queued()})

    def _probe(self, routing_id: bytes, peer: str, msg: Message) -> Message:
        # Open like status: a device times its link before it registers (split/probe.py).
        return self.probes.answer(msg)

    def _plan(self, routing_id: bytes, peer: str, msg: Message) -> Message:
        return answer_plan(self.plan, msg)

    def _ping(self, session: Session, msg: Message) -> Message:
        return Message("ok", msg.client, msg.step)  # Sessions.get has refreshed the session's clock

    def _forward(self, session: Session, msg: Message) -> Message:
        if msg.meta.get("train", True) and not session.graphs and self.store.due(session):
            # Saved before this step, once the client has every earlier reply:
            # a restored adapter then never holds a step the client redoes.
            self.store.save(self.sessions, session)
        started = time.perf_counter()
        train = bool(msg.meta.get("train", True))
        tensors = self.compute.forward(session, msg.step, msg.tensors, train)
        reply = Message("ok", msg.client, msg.step, meta={SERVER_SECONDS: time.perf_counter() - started},
                        tensors=tensors)
        return session.down.code(reply, ("hidden",), train)  # a two-part reply's logits and loss go raw

    def _backward(self, session: Session, msg: Message) -> Message:
        started = time.perf_counter()
        grad = self.compute.backward(session, msg.step, msg.tensors.get("grad"))
        reply = Message("ok", msg.client, msg.step, meta={SERVER_SECONDS: time.perf_counter() - started},
                        tensors={"grad": grad})
        return session.down.code(reply, ("grad",))

    def _adapter(self, session: Session, msg: Message) -> Message:
        return Message("ok", msg.client, msg.step, tensors=adapter_state(self.sessions.model, session.adapter))

    def _bye(self, session: Session, msg: Message) -> Message:
        self.sessions.drop(session.client)
        return Message("ok", msg.client, msg.step)

    def _idempotent(self, handler: Callable[[Session, Message], Message]) -> Callable[[Session, Message], Message]:
        """``handler`` answering a resent request from the session's reply
        cache, so that its effect happens once (server/replies.py)."""

        def answer(session: Session, msg: Message) -> Message:
            key, rid = replay_key(msg), msg.meta.get("rid")
            if key is None:
                return handler(session, msg)
            try:
                cached = session.replies.get(key, rid)
            except StepReused as exc:
                raise RequestError(str(exc)) from None
            if cached is not None:
                log.info("client %s: %s (step %d) resent, answered from the reply cache", session.client, msg.op,
                         msg.step)
                return cached
            session.replies.settle(rid)
            reply = handler(session, msg)
            session.replies.put(key, rid, reply)
            if msg.op == "backward":
                session.replies.discard(("forward", msg.step))  # its reply has arrived: a backward follows it
            return reply

        return answer

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
        resources = Resources(join.capacity, join.train_memory, join.block_costs)
        settings = self._federation().join(session.client, info, join.modules, join.profile, join.labels, resources)
        return Message("ok", msg.client, msg.step, meta=settings.to_meta())

    def _round(self, session: Session, msg: Message) -> Message:
        return self._federation().poll(session.client).to_message(msg.client)

    def _upload(self, session: Session, msg: Message) -> Message:
        fed, payload = self._federation(), UploadPayload.from_message(msg)
        fed.upload(session.client, payload)  # checks the record; refuses the upload if it is bad
        self.runlog.upload(session.client, payload.round, payload.record, len(fed.uploads), len(fed.selected))
        return Message("ok", msg.client, msg.step)

    # ------------------------------------------------------------ checkpoints

    def _checkpoint(self, round_index: int) -> None:
        coord, seg = self.coordinator, self.segment
        folder = write_round(self.config.checkpoint_dir, round_index, coord.global_model(), seg.family, seg.task,
                             str(seg.path), coord.merged, coord.snapshot(), self.sessions.shared_factors(),
                             labels=coord.labels, clients=self._client_records())
        self.store.restore_from = folder / CLIENTS
        log.info("checkpoint %s", folder)

    def _client_records(self) -> list:
        """Each federated client's server-side adapter as the next round
        starts, with its sync and round counts: what it resumes from."""
        coord, records = self.coordinator, []
        for client, member in coord.members.items():
            session = self.sessions.by_client.get(client)
            if session is not None and not session.shared:
                # The next round's download is made again on resume: not counted yet.
                rounds = member.rounds - (coord.phase == "running" and client in coord.selected)
                records.append(session_record(self.sessions, session, {"synced": member.synced, "rounds": rounds}))
        return records

    def _resume(self) -> None:
        folder = last_round(self.config.checkpoint_dir)
        if folder is None:
            raise ValueError(f"--resume: no complete round_N folder in {self.config.checkpoint_dir}")
        snap = read_coordinator(folder)
        self.coordinator.restore(snap)
        self.runlog.rounds_written = len(self.coordinator.history)  # written by the run being resumed
        self.store.restore_from = folder / CLIENTS
        hosted = set(self.sessions.hosted)
        self.sessions.fold({m: d for m, d in snap["merged"].items() if block_of(m) in hosted})
        log.warning("resuming after %s: next round %d of %d", folder.name, self.coordinator.round,
                    self.coordinator.config.rounds)

    def _resume_plain(self) -> None:
        """Plain split training: clients get their saved adapters back at their next hello."""
        folder = self.store.folder
        if not folder.is_dir() or not any(folder.glob("*.safetensors")):
            raise ValueError(f"--resume: no saved client adapters in {folder} (a server started with "
                             "--checkpoint-dir and --save-every writes them there)")
        self.store.restore_from = folder
        log.warning("resuming: %d saved client adapters in %s", len(list(folder.glob("*.safetensors"))), folder)


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


def _encode_reply(reply: Message) -> list:
    """A reply's frames; a reply its codec cannot encode (a lossy codec given
    NaN hidden states, say) becomes an error reply naming why."""
    try:
        return encode(reply)
    except WireError as exc:
        log.warning("client %s: the reply to step %d could not be encoded: %s", reply.client, reply.step, exc)
        failed = error(reply.client, reply.step, f"the server could not encode its reply: {exc}", "failed")
        failed.meta["rid"] = reply.meta.get("rid")
        return encode(failed)


def _malformed(routing_id: bytes, exc: WireError) -> Message:
    """The error reply refusing a message that breaks the protocol."""
    log.warning("malformed message from %r: %s", routing_id, exc)
    return error("", 0, f"malformed message: {exc}", "malformed")


def _decode_bug(routing_id: bytes) -> Message:
    """The reply to a message whose decoding raised something other than WireError."""
    log.exception("server bug: decoding a message from %r raised; answered as malformed", routing_id)
    return error("", 0, "malformed message: the server could not decode it", "malformed")


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
