"""The backbone server: a ZeroMQ ROUTER loop and a dispatch table from op to handler.

The server hosts blocks [K1, L - K2) of a model (its ``--cut``) and serves any
client whose own cut keeps at least those blocks on the client side. The jobs
behind the handlers live elsewhere: sessions, adapters, optimizers and expiry
in ``sessions.py``; forward and backward in ``compute.py``; rounds in
``rounds.py``; checkpoints in ``checkpoint.py``; per-client adapters on disk
in ``persist.py``; the reply cache for resent requests in ``replies.py``;
payloads in ``split/protocol.py``. ``handle`` answers one message without sockets, so
tests can drive a server in-process.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import zmq

from split.devices import place, resolve_device, resolve_dtype
from split.families import block_of
from split.lora import adapter_state
from split.partition import SERVER, Cut, build_segment
from split.protocol import Hello, Join, ModelInfo, UploadPayload, Welcome
from split.security import PLAIN_WARNING, CurveServer, check_pair, check_plain, load_server_keys, peer_key
from split.wire import Limits, Message, WireError, decode, encode, error

from .admission import model_layout
from .checkpoint import last_round, read_coordinator, write_round
from .compute import BackboneCompute
from .persist import CLIENTS, SessionStore, mismatch, owned_by, restore, session_record, token_digest
from .replies import StepReused, replay_key
from .rounds import Coordinator, FederationConfig, FederationError
from .sessions import RequestError, Session, Sessions, check_server_lora
from .strategies.base import ClientInfo, StrategyError

log = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    """How the server is started."""

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
    max_pending: int = 8
    limits: Limits = field(default_factory=Limits)
    attn_implementation: str | None = None
    federation: FederationConfig | None = None
    checkpoint_dir: str | None = None
    resume: bool = False  # continue from checkpoint_dir: its newest round, and the clients' saved adapters
    save_every: int = 20  # plain split training: save a client's server-side adapter every N of its steps
    server_lora: str = "per-client"  # or "shared": one server-side adapter every client trains
    device: str = "cpu"  # cpu, cuda, cuda:N, mps or auto
    dtype: str = "float32"  # frozen weights: float32, bfloat16 or float16

    def __post_init__(self):
        check_server_lora(self.server_lora)  # before the model loads
        if not (math.isfinite(self.pending_timeout) and self.pending_timeout > 0):
            raise ValueError(f"pending_timeout must be a finite number of seconds > 0, got {self.pending_timeout}")
        resolve_device(self.device)
        resolve_dtype(self.dtype)
        if not check_pair(("--secret-key", self.secret_key), ("--allow", self.allow)):
            check_plain(self.bind, "--bind", "--secret-key and --allow")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("--resume continues from saved state: give the --checkpoint-dir it was saved in")
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0 steps (0: never), got {self.save_every}")


class BackboneServer:
    """Hosts the backbone segment and serves clients over one ROUTER socket."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.keys = load_server_keys(config.secret_key, config.allow)  # a bad key file fails before the model loads
        self.curve: CurveServer | None = None
        self._context: zmq.Context | None = None  # the server's own, when it runs an authenticator
        self.device, dtype = resolve_device(config.device), resolve_dtype(config.dtype)
        self.segment = seg = build_segment(
            config.model, SERVER, config.cut, task=config.task, num_labels=config.num_labels,
            seed=config.seed, dropout=config.dropout, dtype=dtype, attn_implementation=config.attn_implementation,
        )
        heads = seg.family.trained_heads(seg.task) if seg.cut.two_part else []
        place(seg.model, self.device, heads)
        self.model_info = ModelInfo.of(seg.path, seg.config)
        # A client resends at most one request at a time, but pipelined forwards
        # each keep a reply until their backward: room for both, twice over.
        self.sessions = Sessions(seg, config.session_timeout, config.server_lora, config.seed,
                                 pending_timeout=config.pending_timeout, reply_cache=2 * config.max_pending)
        plain = config.federation is None
        self.store = SessionStore(config.checkpoint_dir if plain else None, config.save_every, None)
        self.compute = BackboneCompute(seg, self.sessions, config.max_pending, self.device, dtype)
        self.coordinator = None if config.federation is None else Coordinator(
            config.federation, self.sessions, model_layout(seg.config, seg.family, seg.task))
        self._tick_error: str | None = None
        if config.resume and not plain:
            self._resume()
        elif config.resume:
            self._resume_plain()
        # Ops that need no session get the routing id; the others get the caller's session.
        self.open_ops: dict[str, Callable[[bytes, str, Message], Message]] = {
            "hello": self._hello, "status": self._status}
        self.session_ops: dict[str, Callable[[Session, Message], Message]] = {
            "forward": self._idempotent(self._forward), "backward": self._idempotent(self._backward),
            "adapter": self._adapter, "bye": self._bye, "ping": self._ping,
            "join": self._idempotent(self._join), "round": self._idempotent(self._round),
            "upload": self._idempotent(self._upload)}
        self.socket = None
        log.info("server segment: blocks %s of %d, %.1f MB of %.1f MB", self.sessions.hosted, seg.num_layers,
                 seg.owned_bytes / 1e6, seg.checkpoint_bytes / 1e6)

    # ------------------------------------------------------------ socket loop

    def bind(self, context: zmq.Context | None = None) -> str:
        """Bind the ROUTER socket, a CurveZMQ server with its authenticator
        when the server has keys; returns the bound endpoint."""
        if self.keys is not None and context is None:
            # One ZAP authenticator serves a whole context: a context of its
            # own keeps this server's allowlist from applying to other sockets.
            context = self._context = zmq.Context()
        context = context or zmq.Context.instance()
        self.socket = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, self.config.limits.max_message_bytes + (1 << 20))
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
                reply = self.handle(routing_id, body, peer_key(body[0]) if self.curve is not None and body else "")
                self.socket.send_multipart([routing_id] + encode(reply), copy=False)
            self.tick()

    def tick(self) -> None:
        """Expire silent sessions, advance the rounds, checkpoint a closed round."""
        self.sessions.expire()
        if self.coordinator is None:
            return
        try:
            closed = self.coordinator.tick()
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
        """Answer one message; never raises for anything a client sent.
        ``peer`` is the sender's authenticated CurveZMQ key ("" on a plain
        socket): a session is served only to its token from that key."""
        try:
            msg = decode(frames, self.config.limits)
        except WireError as exc:
            log.warning("malformed message from %r: %s", routing_id, exc)
            return error("", 0, f"malformed message: {exc}", "malformed")
        except Exception:  # decode is meant to be total: this is a bug here, not the peer's
            log.exception("server bug: decoding a message from %r raised; answered as malformed", routing_id)
            return error("", 0, "malformed message: the server could not decode it", "malformed")
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
        session = self.sessions.open(msg.client, routing_id, cut, hello.lora, hello.seed, hello.optimizer, peer,
                                     token=token if record is not None else None)
        restored = self._restore(session, record)
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
        return Message("ok", meta=self.sessions.status())

    def _forward(self, session: Session, msg: Message) -> Message:
        if msg.meta.get("train", True) and not session.graphs and self.store.due(session):
            # Saved before this step, once the client has every earlier reply:
            # a restored adapter then never holds a step the client redoes.
            self.store.save(self.sessions, session)
        tensors = self.compute.forward(session, msg.step, msg.tensors, bool(msg.meta.get("train", True)))
        return Message("ok", msg.client, msg.step, tensors=tensors)

    def _backward(self, session: Session, msg: Message) -> Message:
        grad = self.compute.backward(session, msg.step, msg.tensors.get("grad"))
        return Message("ok", msg.client, msg.step, tensors={"grad": grad})

    def _adapter(self, session: Session, msg: Message) -> Message:
        return Message("ok", msg.client, msg.step, tensors=adapter_state(self.sessions.model, session.adapter))

    def _ping(self, session: Session, msg: Message) -> Message:
        return Message("ok", msg.client, msg.step)  # Sessions.get has refreshed the session

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
