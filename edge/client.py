"""The edge client: a ZeroMQ DEALER and the split training step.

The client model is the transformers model itself with the server's blocks
replaced: the first server block by a ``RemoteBlock`` whose autograd function
sends the hidden state to the server on the way forward and the gradient on the
way back, the others by passthroughs. One ``loss.backward()`` on the client
therefore drives the whole split backward pass, the server's included.

A client outlives a server restart: its ``Connection`` resends what got no
answer (``--reconnect-for``), a heartbeat thread keeps its session alive
(``edge.heartbeat``), and when the server answers that it holds no session
for it, the client says hello again with its token, gets its saved
server-side adapter back if the server kept one, and redoes the interrupted
step whole (a federated client redoes the round: ``edge.federated``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from split.adapter_folder import record_split
from split.devices import place, resolve_device, resolve_dtype
from split.families import family_for
from split.linkcodecs import LinkCodecs, Sender
from split.lora import LoraSpec, adapter_state, attach_lora, save_adapter
from split.partition import CLIENT, Cut, build_segment, load_config, resolve_model_path
from split.protocol import Hello, ModelInfo, OptimizerSettings, Welcome
from split.quant import check_federation, check_mode, quantizer_for
from split.records import SERVER_SECONDS
from split.security import PLAIN_WARNING, check_pair, check_plain, load_client_keys
from split.seeds import seeded_rng
from split.transport import Connection, HandshakeFailed, ServerError, ServerUnavailable, SessionLost
from split.wire import Message

from .heartbeat import Heartbeat

log = logging.getLogger(__name__)

MAX_REDO = 5  # registrations again in a row for one step before the client gives up
HEARTBEAT_SHARE = 4  # the heartbeat pings every 1/4 of the server's session timeout


class ServerRefused(ServerError):
    """The server refused to register this client."""


class _Remote(torch.autograd.Function):
    """The server's part as one differentiable function: its blocks (U-shaped
    split, output a hidden state) or its blocks, norm, head and loss (two-part
    split, output the loss)."""

    @staticmethod
    def forward(ctx, hidden, link, step):
        ctx.link, ctx.step = link, step
        ctx.device, ctx.dtype, ctx.shape = hidden.device, hidden.dtype, tuple(hidden.shape)
        return link.remote_forward(hidden, step, train=True)

    @staticmethod
    def backward(ctx, grad):
        return ctx.link.remote_backward(ctx.step, grad, ctx.shape).to(ctx.device, ctx.dtype), None, None


def reply_tensor(reply: Message, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Tensor ``name`` of a server's reply, checked before the client computes
    with it: present, floating point, finite, and of ``shape`` (or, when
    ``shape`` is shorter, starting with it). A server that sends anything else
    gets a ``ServerError`` naming what was wrong, never a crash deeper in."""
    tensor = reply.tensors.get(name)
    if tensor is None:
        raise ServerError(f"the server's reply lacks tensor {name!r}")
    got = tuple(tensor.shape)
    if not tensor.is_floating_point() or got[:len(shape)] != shape or len(got) < len(shape):
        raise ServerError(f"the server's {name!r} must be a float tensor of shape {shape}"
                          f"{' + ...' if name == 'logits' else ''}, got {got} {tensor.dtype}")
    if not bool(torch.isfinite(tensor).all()):
        raise ServerError(f"the server's {name!r} holds NaN or infinite values")
    return tensor


def reply_seconds(reply: Message) -> float:
    """The compute seconds a forward or backward reply says the server spent:
    a finite number >= 0, else a ``ServerError`` naming what came."""
    value = reply.meta.get(SERVER_SECONDS)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ServerError(f"the server's reply must give {SERVER_SECONDS!r} as a finite number of seconds >= 0, "
                          f"got {value!r}"[:300])
    return float(value)


def register(conn: Connection, hello: Hello, timeout: float, retry: bool) -> Welcome:
    """Say ``hello`` on ``conn`` and keep the session token the server answers
    with; a refusal is a ``ServerRefused`` naming the server and the cause."""
    try:
        welcome = Welcome.from_message(conn.request(hello.to_message(), timeout=timeout, retry=retry))
    except HandshakeFailed as exc:  # its text already names the server and the cause
        raise ServerRefused(str(exc), exc.code) from None
    except ServerError as exc:
        raise ServerRefused(f"the server at {conn.address} refused this client: {exc}") from None
    conn.token = welcome.token
    return welcome


class BackboneLink:
    """What the client's placeholders need to reach the server for the current batch.

    ``waited`` and ``served`` add up the seconds the client spent in forward
    and backward requests and the part of them the server says it computed
    (``edge.metering`` reads them around each step).

    ``up`` sends the forward's hidden state and, in the U-shaped split, the
    backward's gradient in the client's up codec (split/linkcodecs.py)."""

    def __init__(self, conn: Connection, rotary: bool, up: Sender | None = None, two_part: bool = False):
        self.conn = conn
        self.rotary = rotary
        self.up = up or Sender()
        self.two_part = two_part
        self.attention_mask: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.position_ids: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self._step = 0
        self.waited = 0.0
        self.served = 0.0

    def _request(self, msg: Message) -> Message:
        """``conn.request``, timed, with the server's reported compute time."""
        started = time.perf_counter()
        reply = self.conn.request(msg)
        waited = time.perf_counter() - started
        self.waited += waited
        # A reply the server's cache answered again says what the first answer
        # cost: the client waited only for what it actually waited.
        self.served += min(reply_seconds(reply), waited)
        return reply

    def next_step(self) -> int:
        """The id of the next step sent to the server."""
        self._step += 1
        return self._step - 1

    @property
    def step_id(self) -> int:
        """The id the next step will get."""
        return self._step

    def rewind(self, step: int) -> None:
        """Give the next step id ``step`` again: a step redone after the server
        lost its session keeps its id, and so its server-side dropout."""
        self._step = step

    def capture_mask(self, module, args, kwargs):
        """Forward pre-hook on the client model: keep the batch's 2-D attention mask."""
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self.attention_mask = mask

    def remote_forward(self, hidden: torch.Tensor, step: int, train: bool) -> torch.Tensor:
        mask = self.attention_mask
        if mask is None:
            mask = torch.ones(hidden.shape[:2], dtype=torch.uint8)
        tensors = {"hidden": hidden.detach(), "attention_mask": mask.to(torch.uint8)}
        if self.rotary and self.position_ids is not None:
            tensors["position_ids"] = self.position_ids
        if self.labels is not None:
            tensors["labels"] = self.labels
        msg = self.up.code(Message("forward", step=step, meta={"train": train}, tensors=tensors), ("hidden",), train)
        reply = self._request(msg)
        # The reply is in the server's dtype; the client computes in its own.
        if self.labels is None:
            return reply_tensor(reply, "hidden", tuple(hidden.shape)).to(hidden.device, hidden.dtype)
        self.logits = reply_tensor(reply, "logits", tuple(hidden.shape[:1])).to(hidden.device, torch.float32)
        return reply_tensor(reply, "loss", (1,)).reshape(()).to(hidden.device, torch.float32)

    def remote_backward(self, step: int, grad: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """The gradient at the cut for step ``step``, whose forward sent a hidden state of ``shape``."""
        msg = Message("backward", step=step, tensors={"grad": grad.contiguous()})
        if not self.two_part:  # the two-part split's grad is the loss's: one number, sent exactly
            self.up.code(msg, ("grad",))
        reply = self._request(msg)
        return reply_tensor(reply, "grad", shape)

    def through_server(self, hidden: torch.Tensor, training: bool) -> torch.Tensor:
        """The server's part applied to ``hidden``: differentiable when training
        (the backward goes to the server), a plain remote call otherwise."""
        step = self.next_step()
        if not (torch.is_grad_enabled() and training):
            return self.remote_forward(hidden, step, train=False)
        if not hidden.requires_grad:
            # Nothing trainable below the cut: the server still needs its backward.
            hidden = hidden.detach().requires_grad_()
        return _Remote.apply(hidden, self, step)


class RemoteBlock(nn.Module):
    """Stands for the first server block in the client model (U-shaped split)."""

    def __init__(self, link: BackboneLink):
        super().__init__()
        self.link = link

    def forward(self, hidden_states, *args, **kwargs):
        self.link.position_ids = kwargs.get("position_ids")
        return self.link.through_server(hidden_states, self.training)


@dataclass
class ClientConfig:
    """How a client joins a server and trains."""

    server: str = "tcp://127.0.0.1:5555"
    model: str | None = None
    cut: Cut | None = None  # None: the server's cut
    task: str = "classification"
    num_labels: int = 2
    lora: LoraSpec = field(default_factory=LoraSpec)
    lr: float = 1e-3
    head_lr: float | None = None  # None: same as lr
    weight_decay: float = 0.0
    seed: int = 0
    dropout: bool = True
    client_id: str = ""
    timeout: float = 120.0
    connect_timeout: float = 30.0
    reconnect_for: float = 300.0  # seconds a request that got no answer is resent (0: never)
    attn_implementation: str | None = None
    device: str = "cpu"  # cpu, cuda, cuda:N, mps or auto
    dtype: str = "float32"  # frozen weights: float32, bfloat16 or float16
    quantize: str = "none"  # the blocks' frozen linear weights: none, 8bit or 4bit (split/quant.py)
    key: str | None = None  # this client's NAME.key_secret: CurveZMQ on (with server_key)
    server_key: str | None = None  # the server's public NAME.key
    codec_up: str = "fp32"  # codec of the hidden states and gradients this client sends (split/codecs.py)
    codec_down: str = "fp32"  # codec the server answers this client in

    @property
    def codecs(self) -> LinkCodecs:
        return LinkCodecs.parse(self.codec_up, self.codec_down)

    def __post_init__(self):
        for name in ("lr", "head_lr", "timeout", "connect_timeout"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        if not (math.isfinite(self.reconnect_for) and self.reconnect_for >= 0):
            raise ValueError(f"reconnect_for must be a finite number of seconds >= 0, got {self.reconnect_for}")
        resolve_device(self.device)
        resolve_dtype(self.dtype)
        self.codecs  # noqa: B018 - a bad codec text fails here, naming the option
        check_mode(self.quantize)
        if not check_pair(("--key", self.key), ("--server-key", self.server_key)):
            check_plain(self.server, "--server", "--key and --server-key")


def leave(conn: Connection, heartbeat, say_bye: bool = True) -> None:
    """Stop ``heartbeat`` (None: none runs), say bye to the server (freeing
    this client's state there) unless ``say_bye`` is False, and close ``conn``."""
    if heartbeat is not None:
        heartbeat.stop()
    if say_bye:
        try:
            conn.request(Message("bye"), timeout=5.0, retry=False)
        except SessionLost:
            log.info("the server had already freed this client's session")
        except (ServerUnavailable, ServerError) as exc:
            log.warning("could not say bye to the server: %s", exc)
    conn.close()


class SplitClient:
    """One client of a backbone server: its segment, its LoRA, its optimizer.

    With an ``emulator`` (``edge.emulate.EmulatedDevice``) the client runs
    under a device's limits: its messages pay the device's link, its compute
    blocks are slowed to the device's speed, and its memory is checked against
    the device's budget after the model is loaded and after every block."""

    def __init__(self, config: ClientConfig, emulator=None):
        self.config = config
        self.emulator = emulator
        client_id = config.client_id or f"client-{uuid.uuid4().hex[:8]}"
        keys = load_client_keys(config.key, config.server_key)
        if keys is None:
            log.warning(PLAIN_WARNING, config.server)
        self.conn = Connection(config.server, client_id, timeout=config.timeout, keys=keys,
                               reconnect_for=config.reconnect_for)
        self.conn.shaper = emulator
        self.heartbeat: Heartbeat | None = None
        self.registrations = 0  # hellos after the first (the server lost the session)
        try:
            self._join()
        except Exception:
            self.conn.close()
            raise
        if emulator is not None:
            try:
                emulator.check_memory("after loading the model")
            except Exception:
                self.close()
                raise

    def _computing(self, what: str):
        """A compute block (dilated and memory-checked under emulation)."""
        return nullcontext() if self.emulator is None else self.emulator.computing(what)

    def _join(self) -> None:
        cfg = self.config
        hello, quantizer = self._prepare()
        # A wrong address fails fast: only a registered client waits for a restarting server.
        welcome = self._hello(hello, retry=False)
        self.cut = cfg.cut or welcome.server_cut
        self._hello_payload = dataclasses.replace(hello, cut=self.cut)  # said again, with the cut now fixed
        if quantizer is not None:
            check_federation(welcome.federation)
        self._build(quantizer)
        self.heartbeat = Heartbeat(self.conn, welcome.session_timeout / HEARTBEAT_SHARE)

    def _prepare(self) -> tuple[Hello, object]:
        """The hello this client says and its weights' quantizer (None: none),
        checked before anything is loaded or sent."""
        cfg = self.config
        self._path = path = resolve_model_path(cfg.model)
        model_cfg = load_config(path, cfg.task, cfg.num_labels, cfg.dropout)
        self.family = family_for(model_cfg)
        if cfg.cut is not None:
            cfg.cut.check(model_cfg.num_hidden_layers)
        self.device = resolve_device(cfg.device)
        # Checked before the hello: a device where bitsandbytes cannot run fails before it joins.
        quantizer = quantizer_for(cfg.quantize, self.device, resolve_dtype(cfg.dtype))
        hello = Hello(ModelInfo.of(path, model_cfg), cfg.lora, cfg.task, cfg.seed, cfg.cut,
                      OptimizerSettings(cfg.lr, cfg.weight_decay),
                      num_labels=cfg.num_labels if cfg.task == "classification" else None, codecs=cfg.codecs)
        return hello, quantizer

    def _build(self, quantizer) -> None:
        """Load the client segment of ``self.cut`` with its LoRA, head and
        optimizer, its first server block replaced by the link to the server."""
        cfg, fam = self.config, self.family
        self.segment = build_segment(self._path, CLIENT, self.cut, task=cfg.task, num_labels=cfg.num_labels,
                                     seed=cfg.seed, dropout=cfg.dropout, dtype=resolve_dtype(cfg.dtype),
                                     attn_implementation=cfg.attn_implementation, on_loaded=quantizer)
        if quantizer is not None:
            quantizer.finish(self.segment.model)
        self.link = BackboneLink(self.conn, fam.rotary, Sender(cfg.codecs.up), self.cut.two_part)
        self.heads = [] if self.cut.two_part else fam.trained_heads(cfg.task)
        place(self.segment.model, self.device, self.heads)
        if not self.cut.two_part:
            self.segment.blocks()[self.cut.front] = RemoteBlock(self.link)
            self.segment.model.register_forward_pre_hook(self.link.capture_mask, with_kwargs=True)
        self.model = attach_lora(self.segment.model, cfg.lora, fam, cfg.task, cfg.seed,
                                 modules_to_save=self.heads or None)
        lora = [p for n, p in self.model.named_parameters() if p.requires_grad and "lora_" in n]
        head = [p for n, p in self.model.named_parameters() if p.requires_grad and "lora_" not in n]
        groups = [{"params": lora}]
        if head:
            groups.append({"params": head, "lr": cfg.head_lr or cfg.lr})
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.steps = 0

    def _hello(self, hello: Hello, retry: bool) -> Welcome:
        """Register with the server (with this connection's token, if it has
        one: the proof that a saved server-side adapter is this client's)."""
        welcome = register(self.conn, hello, self.config.connect_timeout, retry)
        self.federation = welcome.federation  # None: plain split training
        return welcome

    def reregister(self) -> Welcome:
        """Say hello again after the server answered that it holds no session
        for this client (it restarted, or the session expired). The server
        gives back this client's saved server-side adapter if it kept one."""
        federated = self.federation is not None
        welcome = self._hello(self._hello_payload, retry=True)
        if (welcome.federation is not None) != federated:
            raise RuntimeError(f"the server at {self.config.server} came back "
                               f"{'without' if federated else 'with'} a federation; restart this client")
        self.registrations += 1
        if welcome.restored is None:
            log.warning("%s registered again; the server kept no adapter for it: its server-side LoRA starts "
                        "afresh (a server started with --checkpoint-dir keeps it)", self.conn.client_id)
        else:
            log.warning("%s registered again; the server gave back its server-side adapter at step %d (this "
                        "client is at step %d)", self.conn.client_id, welcome.restored, self.steps)
        return welcome

    def _redoing(self, work, undo=lambda: None):
        """``work()``, done again after registering again if the server lost
        this client's session meanwhile; ``undo()`` first clears what the
        interrupted attempt left. A federated client's interrupted step is not
        redone here: its round is (``edge.federated``)."""
        for attempt in range(MAX_REDO + 1):
            try:
                return work()
            except SessionLost as exc:
                undo()
                if self.federation is not None or attempt == MAX_REDO:
                    raise
                log.warning("%s: %s; registering again to redo the step", self.conn.client_id, exc)
                self.reregister()
        raise AssertionError("unreachable")

    # ------------------------------------------------------------ training

    def _outputs(self, batch: dict, with_labels: bool):
        """Run the split forward; returns (loss or None, logits)."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        labels = batch.get("labels") if with_labels else None
        if not self.cut.two_part:
            kwargs = {k: v for k, v in batch.items() if k != "labels"}
            out = self.model(**kwargs, labels=labels)
            return out.loss, out.logits
        base = self.segment.base()
        self.link.attention_mask = batch.get("attention_mask")
        hidden = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        self.link.labels = batch["labels"]
        try:
            loss = self.link.through_server(hidden, self.model.training)
        finally:
            self.link.labels = None
        return loss, self.link.logits

    def train_step(self, batch: dict, penalty=None) -> float:
        """One optimizer step through the server; returns the task loss.
        ``penalty()``, if given, is a regulariser added to the loss. A step
        the server lost half-way is redone whole, from its forward, under the
        same step id: no gradient of the interrupted attempt is kept."""
        first = self.link.step_id

        def undo():
            self.optimizer.zero_grad(set_to_none=True)
            self.link.rewind(first)

        with self._computing(f"training step {self.steps + 1}"):
            return self._redoing(lambda: self._train_step(batch, penalty), undo)

    def _train_step(self, batch: dict, penalty) -> float:
        self.model.train()
        with seeded_rng(self.device, self.config.seed, "dropout", "client", self.steps):
            loss, _ = self._outputs(batch, with_labels=True)
        (loss + penalty() if penalty is not None else loss).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return float(loss.detach())

    @torch.no_grad()
    def predict(self, batch: dict) -> torch.Tensor:
        """Logits for a batch, in evaluation mode (the server keeps no graph)."""
        self.model.eval()
        with self._computing("an evaluation batch"):
            return self._redoing(lambda: self._outputs(batch, with_labels=self.cut.two_part)[1])

    @torch.no_grad()
    def loss(self, batch: dict) -> float:
        """The task loss of a labelled batch, in evaluation mode (no training)."""
        self.model.eval()
        with self._computing("an evaluation batch"):
            return float(self._redoing(lambda: self._outputs(batch, with_labels=True)[0]))

    def evaluate(self, batches) -> float:
        """Accuracy over labelled batches."""
        correct = total = 0
        for batch in batches:
            pred = self.predict(batch).argmax(-1).cpu()
            correct += int((pred == batch["labels"]).sum())
            total += len(batch["labels"])
        return correct / max(total, 1)

    # ------------------------------------------------------------ adapters

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Client and server LoRA together, under whole-model PEFT names."""
        state = adapter_state(self.model)
        server = self._redoing(lambda: self.conn.request(Message("adapter")).tensors)
        overlap = set(state) & set(server)
        if overlap:
            raise RuntimeError(f"client and server both hold {sorted(overlap)[:3]}: the cut is inconsistent")
        state.update(server)
        return state

    def save_adapter(self, folder: str | Path, labels: list[str] | None = None, tokenizer=None) -> Path:
        """Save one standard PEFT adapter for the whole model; with ``labels``
        (class names in head order) and ``tokenizer``, the folder also names the
        labels and holds the tokenizer (``split.lora.save_adapter``)."""
        fam = self.family
        if labels is not None and len(labels) != self.config.num_labels:
            raise ValueError(f"{len(labels)} label names for a head of {self.config.num_labels} labels")
        heads = fam.trained_heads(self.config.task)
        saved = save_adapter(folder, self.adapter_state(), self.config.lora, fam, self.config.task,
                             str(self.segment.path), heads, labels=labels, tokenizer=tokenizer)
        record_split(saved, self.cut, self._hello_payload.model)  # what `fedsplit export` needs to know
        return saved

    def close(self, say_bye: bool = True) -> None:
        """Leave the server (freeing this client's state there) and close the socket."""
        leave(self.conn, self.heartbeat, say_bye)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
