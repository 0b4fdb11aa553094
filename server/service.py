"""The backbone server: a ZeroMQ ROUTER loop, one session per client.

The server hosts blocks [K1, L - K2) of a model (its ``--cut``) and serves any
client whose own cut keeps at least those blocks on the client side. Each client
has its own server-side LoRA adapter (a named peft adapter on the one frozen
backbone) and its own optimizer. A forward in training mode keeps the autograd
graph until that step's backward arrives; a client silent for longer than the
session timeout loses its graphs, adapter and optimizer.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import zmq

from split.families import block_of, get_module, join, set_module
from split.lora import (LoraSpec, adapter_state, attach_lora, fold_delta, get_factors, init_lora, lora_layers,
                        pad_rows, set_factors, set_trainable)
from split.partition import SERVER, Cut, Passthrough, build_segment
from split.wire import Limits, Message, WireError, decode, encode, error
from server.strategies.base import ClientInfo, StrategyError

if TYPE_CHECKING:
    from server.rounds import FederationConfig

log = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    """How the server is started."""

    model: str | None = None
    cut: Cut = field(default_factory=Cut)
    bind: str = "tcp://*:5555"
    task: str = "classification"
    num_labels: int = 2
    seed: int = 0
    dropout: bool = True
    session_timeout: float = 120.0
    max_pending: int = 8
    limits: Limits = field(default_factory=Limits)
    attn_implementation: str | None = None
    federation: "FederationConfig | None" = None
    checkpoint_dir: str | None = None
    resume: bool = False  # continue from the newest round in checkpoint_dir
    server_lora: str = "per-client"  # or "shared": one server-side adapter every client trains

    def __post_init__(self):
        if self.server_lora not in ("per-client", "shared"):
            raise ValueError(f"server_lora must be 'per-client' or 'shared', got {self.server_lora!r}")


@dataclass
class Session:
    """What the server holds for one client."""

    client: str
    routing_id: bytes
    adapter: str
    cut: Cut
    spec: LoraSpec
    optimizer: torch.optim.Optimizer
    params: list
    last_seen: float
    optim: dict = field(default_factory=dict)
    pending: dict = field(default_factory=dict)  # step -> (input hidden state, output)
    steps: int = 0


class RequestError(Exception):
    """A well-formed request that cannot be served; its text goes back to the client."""


def _optimizer(params, options: dict) -> torch.optim.Optimizer:
    lr = float(options.get("lr", 1e-3))
    wd = float(options.get("weight_decay", 0.0))
    betas = tuple(options.get("betas", (0.9, 0.999)))
    if not params:
        raise RequestError("the requested LoRA targets match no module in the server's blocks")
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd, betas=betas)


class BackboneServer:
    """Hosts the backbone segment and serves clients over one ROUTER socket."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.segment = build_segment(
            config.model, SERVER, config.cut, task=config.task, num_labels=config.num_labels,
            seed=config.seed, dropout=config.dropout, attn_implementation=config.attn_implementation,
        )
        # peft cannot add an adapter to a model whose adapters were all deleted,
        # so a rank-1 adapter that is never activated keeps the wrapper alive.
        self.model = attach_lora(self.segment.model, LoraSpec(rank=1), self.segment.family, config.task,
                                 config.seed, adapter="idle",
                                 layers=list(config.cut.server_blocks(self.segment.num_layers)))
        self.sessions: dict[str, Session] = {}
        self.coordinator = None
        if config.federation is not None:
            from server.rounds import Coordinator

            self.coordinator = Coordinator(config.federation, self)
            self.coordinator.on_round_end = self._round_closed
            if config.resume:
                self._resume()
        self._adapters = 0
        self._shared = None  # (spec, params, optimizer) of the shared server-side adapter
        self._active: str | None = None
        self.socket = None
        log.info("server segment: blocks %s of %d, %.1f MB of %.1f MB",
                 list(config.cut.server_blocks(self.segment.num_layers)), self.segment.num_layers,
                 self.segment.owned_bytes / 1e6, self.segment.checkpoint_bytes / 1e6)

    # ------------------------------------------------------------ socket loop

    def bind(self, context: zmq.Context | None = None) -> str:
        """Bind the ROUTER socket; returns the bound endpoint."""
        context = context or zmq.Context.instance()
        self.socket = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting client takes its id back
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
            self.expire()
            if self.coordinator is not None:
                self.coordinator.tick()

    # ------------------------------------------------------------ dispatch

    def handle(self, routing_id: bytes, frames: list) -> Message:
        """Answer one message; never raises for anything a client sent."""
        try:
            msg = decode(frames, self.config.limits)
        except WireError as exc:
            log.warning("malformed message from %r: %s", routing_id, exc)
            return error("", 0, f"malformed message: {exc}")
        rid = msg.meta.get("rid")
        try:
            if msg.op == "hello":
                reply = self._hello(routing_id, msg)
            elif msg.op == "status":
                reply = self._status()
            elif msg.op in ("forward", "backward", "adapter", "bye", "join", "round", "upload"):
                session = self._session(routing_id, msg)
                reply = getattr(self, "_" + msg.op)(session, msg)
            else:
                raise RequestError(f"op {msg.op!r} is a reply, not a request")
        except (RequestError, StrategyError) as exc:
            reply = error(msg.client, msg.step, str(exc))
        except Exception as exc:  # a bad tensor can fail deep inside the model
            log.exception("request %s from %s failed", msg.op, msg.client)
            session = self.sessions.get(msg.client)
            if session is not None:
                session.pending.pop(msg.step, None)
            reply = error(msg.client, msg.step, f"{msg.op} failed on the server: {type(exc).__name__}: {exc}")
        reply.meta["rid"] = rid
        return reply

    def _session(self, routing_id: bytes, msg: Message) -> Session:
        session = self.sessions.get(msg.client)
        if session is None:
            raise RequestError(f"unknown client {msg.client!r}: send hello first (or the session expired)")
        if session.routing_id != routing_id:
            raise RequestError(f"client id {msg.client!r} is registered from another connection")
        session.last_seen = time.monotonic()
        return session

    # ------------------------------------------------------------ ops

    def _hello(self, routing_id: bytes, msg: Message) -> Message:
        meta = msg.meta
        if not msg.client:
            raise RequestError("hello needs a client id")
        seg = self.segment
        theirs = meta.get("model", {})
        ours = {"model_type": seg.config.model_type, "num_layers": seg.num_layers,
                "hidden_size": seg.config.get_text_config().hidden_size}
        for key, value in ours.items():
            if theirs.get(key) != value:
                raise RequestError(
                    f"model mismatch: the server hosts {ours}, the client has {key}={theirs.get(key)!r}; "
                    "start both with the same --model")
        try:
            cut = Cut(*meta.get("cut", [seg.cut.front, seg.cut.back]))
            cut.check(seg.num_layers)
        except (TypeError, ValueError) as exc:
            raise RequestError(f"bad cut: {exc}") from None
        ours_cut = seg.cut
        if cut.front < ours_cut.front or (cut.back < ours_cut.back):
            raise RequestError(
                f"cut {cut} asks the server for blocks it does not host: it hosts "
                f"{ours_cut.front}..{seg.num_layers - ours_cut.back - 1} (server --cut {ours_cut})")
        if cut.two_part and not ours_cut.two_part:
            raise RequestError("a two-part split (back = 0) needs a server started with --cut K1,0")
        if cut.two_part and meta.get("task", seg.task) != seg.task:
            raise RequestError(f"the server's head is for task {seg.task!r}, the client asked {meta.get('task')!r}")
        try:
            spec = LoraSpec.from_dict(meta.get("lora", {"rank": 8, "alpha": 16}))
        except (KeyError, TypeError, ValueError) as exc:
            raise RequestError(f"bad LoRA spec: {exc}") from None
        if msg.client in self.sessions:
            log.info("client %s registers again: its old session is dropped", msg.client)
            self._drop(msg.client)
        heads = seg.family.trained_heads(seg.task) if ours_cut.two_part else None
        if self.config.server_lora == "shared":
            adapter, params, optimizer = self._shared_adapter(spec, heads, meta)
        else:
            self._adapters += 1
            adapter = f"client{self._adapters}"
            self.model = attach_lora(self.model, spec, seg.family, seg.task, int(meta.get("seed", 0)),
                                     modules_to_save=heads, adapter=adapter,
                                     layers=list(cut.server_blocks(seg.num_layers)))
            params = [p for n, p in self.model.named_parameters() if f".{adapter}." in n]
            optimizer = _optimizer(params, meta.get("optim", {}))
        self.sessions[msg.client] = Session(msg.client, routing_id, adapter, cut, spec, optimizer, params,
                                            time.monotonic(), optim=dict(meta.get("optim", {})))
        self._active = None
        log.info("client %s joined: cut %s, LoRA r=%d, %d server-side tensors", msg.client, cut, spec.rank,
                 len(params))
        fed = self.config.federation
        return Message("ok", msg.client, msg.step, meta={
            "num_layers": seg.num_layers, "server_cut": [ours_cut.front, ours_cut.back],
            "session_timeout": self.config.session_timeout,
            "federation": None if fed is None else {"strategy": fed.strategy, "rounds": fed.rounds,
                                                    "local_steps": fed.local_steps}})

    def _shared_adapter(self, spec: LoraSpec, heads, meta: dict):
        """SplitFed-V2: the one server-side adapter, created by the first client."""
        seg = self.segment
        if self._shared is None:
            self.model = attach_lora(self.model, spec, seg.family, seg.task, int(meta.get("seed", 0)),
                                     modules_to_save=heads, adapter="shared",
                                     layers=list(seg.cut.server_blocks(seg.num_layers)))
            params = [p for n, p in self.model.named_parameters() if ".shared." in n]
            self._shared = (spec, params, _optimizer(params, meta.get("optim", {})))
        shared_spec, params, optimizer = self._shared
        if (spec.rank, spec.alpha, spec.targets) != (shared_spec.rank, shared_spec.alpha, shared_spec.targets):
            raise RequestError(f"this server trains one shared server-side LoRA (rank {shared_spec.rank}, alpha "
                               f"{shared_spec.alpha}); join with the same --rank, --alpha and --targets")
        return "shared", params, optimizer

    def _status(self) -> Message:
        return Message("ok", meta={
            "sessions": len(self.sessions),
            "pending": sum(len(s.pending) for s in self.sessions.values()),
            "clients": sorted(self.sessions)})

    def _activate(self, session: Session) -> None:
        if self._active == session.adapter:
            return
        self.model.set_adapter(session.adapter)
        # set_adapter makes every factor of the active adapter trainable and
        # freezes the others; what trains is each session's own list (a graph
        # another client still holds needs its parameters to keep requiring grad).
        for name, p in self.model.named_parameters():
            if "lora_" in name:
                p.requires_grad_(False)
        for other in self.sessions.values():
            for p in other.params:
                p.requires_grad_(True)
        self._active = session.adapter

    @contextmanager
    def _client_blocks(self, cut: Cut):
        """Run only the client's server blocks: hosted blocks the client keeps
        itself become passthroughs for the duration of the call."""
        seg = self.segment
        blocks = seg.blocks()
        mine = set(cut.server_blocks(seg.num_layers))
        saved = {}
        for i in seg.cut.server_blocks(seg.num_layers):
            if i not in mine:
                saved[i] = blocks[i]
                blocks[i] = Passthrough()
        norm_path = join(seg.family.prefix, seg.family.norm) if seg.family.norm else None
        norm = None
        if norm_path and seg.cut.two_part and not cut.two_part:
            norm = get_module(seg.model, norm_path)
            set_module(seg.model, norm_path, torch.nn.Identity())
        try:
            yield
        finally:
            for i, block in saved.items():
                blocks[i] = block
            if norm is not None:
                set_module(seg.model, norm_path, norm)

    def _forward(self, session: Session, msg: Message) -> Message:
        seg = self.segment
        t = msg.tensors
        hidden = t.get("hidden")
        mask = t.get("attention_mask")
        if hidden is None or mask is None:
            raise RequestError("forward needs tensors 'hidden' and 'attention_mask'")
        width = seg.config.get_text_config().hidden_size
        if hidden.dim() != 3 or hidden.shape[-1] != width or not hidden.is_floating_point():
            raise RequestError(f"'hidden' must be a float tensor of shape (batch, tokens, {width}), "
                               f"got {tuple(hidden.shape)} {hidden.dtype}")
        if tuple(mask.shape) != tuple(hidden.shape[:2]):
            raise RequestError(f"'attention_mask' must have shape {tuple(hidden.shape[:2])}, got {tuple(mask.shape)}")
        positions = t.get("position_ids")
        if positions is not None and (positions.dim() != 2 or positions.shape[-1] != hidden.shape[1]):
            raise RequestError(f"'position_ids' must have shape (batch or 1, {hidden.shape[1]})")
        train = bool(msg.meta.get("train", True))
        if train and len(session.pending) >= self.config.max_pending:
            raise RequestError(f"{len(session.pending)} forwards are waiting for their backward; "
                               "send the backward of earlier steps first")
        if train and msg.step in session.pending:
            raise RequestError(f"step {msg.step} already has a forward waiting for its backward")
        self._activate(session)
        mask = mask.long()
        h_in = hidden.to(torch.float32).detach().requires_grad_(train)
        seg.injected.value = h_in
        self.model.train(train)
        two_part = session.cut.two_part
        kwargs = {"attention_mask": mask}
        if positions is not None:
            kwargs["position_ids"] = positions.long()
        try:
            with self._client_blocks(session.cut), torch.set_grad_enabled(train):
                if two_part:
                    labels = t.get("labels")
                    if labels is None:
                        raise RequestError("a two-part forward needs 'labels'")
                    ids = self._dummy_ids(mask, pooled=True)
                    out = seg.model(input_ids=ids, labels=labels.long(), **kwargs)
                    result = {"loss": out.loss.detach().reshape(1), "logits": out.logits.detach()}
                    keep = out.loss
                else:
                    ids = self._dummy_ids(mask, pooled=False)
                    out = seg.base()(input_ids=ids, **kwargs).last_hidden_state
                    result = {"hidden": out.detach()}
                    keep = out
        finally:
            seg.injected.value = None
        if train:
            session.pending[msg.step] = (h_in, keep)
        return Message("ok", msg.client, msg.step, tensors=result)

    def _dummy_ids(self, mask: torch.Tensor, pooled: bool) -> torch.Tensor:
        """Token ids for the server's forward: the injected embedding ignores them,
        but a pooled classification head finds each sequence's last token by its
        pad id, so padding positions carry the pad id."""
        if not pooled:
            return torch.zeros_like(mask)
        cfg = self.segment.config
        pad = cfg.pad_token_id or 0
        other = (pad + 1) % cfg.get_text_config().vocab_size
        return torch.where(mask.bool(), torch.full_like(mask, other), torch.full_like(mask, pad))

    def _backward(self, session: Session, msg: Message) -> Message:
        entry = session.pending.pop(msg.step, None)
        if entry is None:
            raise RequestError(f"no forward is waiting for a backward at step {msg.step}")
        h_in, out = entry
        grad = msg.tensors.get("grad")
        if grad is None:
            raise RequestError("backward needs tensor 'grad'")
        if grad.numel() != out.numel() or (out.dim() > 0 and tuple(grad.shape) != tuple(out.shape)):
            raise RequestError(f"'grad' must have shape {tuple(out.shape) or (1,)}, got {tuple(grad.shape)}")
        self._activate(session)
        out.backward(grad.to(out.dtype).reshape(out.shape))
        grad_in = h_in.grad
        # A shared adapter may step only when no other client's graph still
        # needs its current values; until then gradients accumulate.
        if session.adapter != "shared" or not any(s.pending for s in self.sessions.values()):
            session.optimizer.step()
            session.optimizer.zero_grad(set_to_none=True)
        session.steps += 1
        return Message("ok", msg.client, msg.step, tensors={"grad": grad_in.detach()})

    def _adapter(self, session: Session, msg: Message) -> Message:
        return Message("ok", msg.client, msg.step, tensors=adapter_state(self.model, session.adapter))

    def _bye(self, session: Session, msg: Message) -> Message:
        self._drop(session.client)
        return Message("ok", msg.client, msg.step)

    # ------------------------------------------------------------ federation

    def _federation(self):
        if self.coordinator is None:
            raise RequestError("this server runs no federation: start it with --strategy and --rounds")
        return self.coordinator

    def _join(self, session: Session, msg: Message) -> Message:
        meta = msg.meta
        layers = meta.get("layers")
        info = ClientInfo(session.client, int(meta.get("rank", session.spec.rank)),
                          float(meta.get("alpha", session.spec.alpha)),
                          None if layers is None else frozenset(int(x) for x in layers),
                          int(meta.get("num_samples", 1)))
        if info.rank != session.spec.rank:
            raise RequestError(f"join says rank {info.rank}, hello said {session.spec.rank}")
        modules = {str(k): (int(v[0]), int(v[1])) for k, v in dict(meta.get("modules", {})).items()}
        settings = self._federation().join(session.client, info, modules, str(meta.get("profile", "")))
        return Message("ok", msg.client, msg.step, meta=settings)

    def _round(self, session: Session, msg: Message) -> Message:
        status, download, deltas, round_index = self._federation().poll(session.client)
        meta = {"status": status, "round": round_index}
        tensors = {f"D:{m}": d for m, d in deltas.items()}
        if download is not None:
            meta.update(trainable=download.trainable, fresh=download.fresh, rank=download.rank,
                        alpha=download.alpha, options=download.options,
                        local_steps=self.config.federation.local_steps,
                        local_epochs=self.config.federation.local_epochs,
                        seed=self.config.federation.seed)
            tensors.update({f"A:{m}": v for m, v in download.A.items()})
            tensors.update({f"B:{m}": v for m, v in download.B.items()})
            tensors.update({f"X:{m}": v for m, v in download.extra.items()})
        return Message("ok", msg.client, msg.step, meta=meta, tensors=tensors)

    def _upload(self, session: Session, msg: Message) -> Message:
        t = msg.tensors
        pick = lambda prefix: {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}  # noqa: E731
        self._federation().upload(session.client, int(msg.meta.get("round", -1)), pick("A:"), pick("B:"),
                                  pick("X:"), int(msg.meta.get("num_samples", 1)),
                                  int(msg.meta.get("rank", session.spec.rank)))
        return Message("ok", msg.client, msg.step)

    def _round_closed(self, coordinator, entry) -> None:
        log.warning("round %d closed: %d of %d uploads%s (%.1fs)", entry.round, len(entry.uploaded),
                    len(entry.selected), "" if entry.aggregated else f", {entry.note}", entry.seconds)
        if self.config.checkpoint_dir is None:
            return
        from server.checkpoint import write_round
        from split.lora import PEFT_PREFIX

        factors, extra = coordinator.global_lora()
        tensors = {}
        for m, f in factors.items():
            tensors[f"{PEFT_PREFIX}{m}.lora_A.weight"] = f.A
            tensors[f"{PEFT_PREFIX}{m}.lora_B.weight"] = f.B
        tensors.update({f"{PEFT_PREFIX}{name}": v for name, v in extra.items()})
        if self._shared is not None:  # the shared server-side LoRA is part of the global model as it is
            for m, (a, b) in get_factors(self.model, "shared").items():
                tensors[f"{PEFT_PREFIX}{m}.lora_A.weight"] = a
                tensors[f"{PEFT_PREFIX}{m}.lora_B.weight"] = b
        seg = self.segment
        targets = sorted({m.rsplit(".", 1)[-1] for m in factors})
        heads = sorted({name.rsplit(".", 1)[0] for name in extra})
        spec = LoraSpec(rank=coordinator.r_max, alpha=coordinator.alpha, targets=tuple(targets))
        config = spec.peft_config(seg.family, heads, seg.task).to_dict()
        config["base_model_name_or_path"] = str(seg.path)
        config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
        folder = write_round(self.config.checkpoint_dir, entry.round, tensors, config, coordinator.merged,
                             coordinator.snapshot())
        log.info("checkpoint %s", folder)

    def _resume(self) -> None:
        from server.checkpoint import last_round, read_coordinator

        if self.config.checkpoint_dir is None:
            raise ValueError("--resume needs --checkpoint-dir")
        folder = last_round(self.config.checkpoint_dir)
        if folder is None:
            raise ValueError(f"--resume: no complete round_N folder in {self.config.checkpoint_dir}")
        snap = read_coordinator(folder)
        self.coordinator.restore(snap)
        hosted = set(self.segment.cut.server_blocks(self.segment.num_layers))
        self.fold({m: d for m, d in snap["merged"].items() if block_of(m) in hosted})
        log.warning("resuming after %s: next round %d of %d", folder.name, self.coordinator.round,
                    self.coordinator.config.rounds)

    # ServerSide, for the coordinator

    def modules_for(self, client: str) -> dict[str, tuple[int, int]]:
        session = self.sessions.get(client)
        if session is None or session.adapter == "shared":  # trained by every client, not aggregated
            return {}
        return {name: (layer.lora_B[session.adapter].weight.shape[0], layer.lora_A[session.adapter].weight.shape[1])
                for name, layer in lora_layers(self.model, session.adapter).items()}

    def load(self, client: str, A: dict, B: dict, trainable: str, fresh_seed: int | None, modules: set) -> None:
        session = self.sessions.get(client)
        if session is None or session.adapter == "shared":
            return
        if fresh_seed is not None:
            init_lora(self.model, session.adapter, fresh_seed)
        rank = session.spec.rank  # a pruned (HetLoRA) rank fills the adapter's rank with zeros
        set_factors(self.model, {m: pad_rows(a, rank) for m, a in A.items()},
                    {m: pad_rows(b.T, rank).T for m, b in B.items()}, session.adapter)
        session.params = set_trainable(self.model, trainable, session.adapter, modules)
        session.optimizer = _optimizer(session.params, session.optim)
        session.pending.clear()
        self._active = None

    def collect(self, client: str) -> dict:
        session = self.sessions.get(client)
        return {} if session is None or session.adapter == "shared" else get_factors(self.model, session.adapter)

    def base_weight(self, module: str) -> torch.Tensor:
        """A module's pretrained weight (d_out x d_in), read from the checkpoint
        whichever side owns the module; nothing else is loaded."""
        from split.partition import checkpoint_name
        from split.tensorfile import CheckpointIndex

        seg = self.segment
        index = CheckpointIndex(seg.path)
        name = checkpoint_name(f"{module}.weight", seg.family.prefix, index)
        if name is None:
            raise ValueError(f"{seg.path}: no weight for LoRA module {module}")
        weight = index.read(name, torch.float32)
        return weight.T if seg.family.name == "gpt2" else weight  # Conv1D stores in x out

    def fold(self, deltas: dict) -> None:
        for module, delta in deltas.items():
            fold_delta(self.model, module, delta)

    # ------------------------------------------------------------ lifetime

    def _drop(self, client: str) -> None:
        session = self.sessions.pop(client)
        session.pending.clear()
        if session.adapter != "shared":
            session.optimizer.state.clear()
            self.model.delete_adapter(session.adapter)
        self._active = None
        log.info("client %s left after %d steps", client, session.steps)

    def expire(self, now: float | None = None) -> list[str]:
        """Drop sessions silent for longer than the timeout; returns their ids."""
        now = time.monotonic() if now is None else now
        gone = [c for c, s in self.sessions.items() if now - s.last_seen > self.config.session_timeout]
        for client in gone:
            log.warning("client %s silent for more than %.0fs: its state is freed", client,
                        self.config.session_timeout)
            self._drop(client)
        return gone
