"""One client segment serving many federated clients in turn (Flower's
simulation runs hundreds of clients on a few worker processes).

A ``PooledClient`` loads the client segment once; each client it runs brings
only what is its own: its session on the backbone server (id and token), its
LoRA and head, its step counters and its data. Its optimizer is rebuilt every
round anyway (``FederatedClient._train_round``), as the server's is at every
load. Frozen weights are shared: the strategy sends the cumulative
frozen-weight updates so far, and the segment's weights are set to the
pretrained ones plus that sum, whichever client ran on it last.

``round_client`` trains one round of one client through the backbone server
and returns its upload message instead of sending it: a Flower ClientApp
replies with it (``edge.flower_client``). No Flower import here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from split.lora import PEFT_PREFIX, fold_delta
from split.protocol import FederationSettings, RoundOffer
from split.security import load_client_keys
from split.transport import Connection
from split.wire import Message

from .client import ClientConfig, SplitClient, register
from .federated import FederatedClient, FederatedOptions, _round_state
from .adapter_uploads import AdapterUploads

log = logging.getLogger(__name__)


@dataclass
class ClientCounters:
    """What one client carries from round to round besides its tensors."""

    token: str = ""
    rank: int = 0  # its current rank (HetLoRA may prune it)
    steps: int = 0  # client steps so far: seeds its client-side dropout
    step_id: int = 0  # the next step id sent to the server: seeds its server-side dropout

    def to_config(self) -> dict:
        return {"token": self.token, "rank": self.rank, "steps": self.steps, "step-id": self.step_id}

    @classmethod
    def from_config(cls, config) -> "ClientCounters":
        """Counters kept in a client's own state (Flower's context.state)."""
        values = (config.get("token", ""), config.get("rank", 0), config.get("steps", 0), config.get("step-id", 0))
        token, rank, steps, step_id = values
        if not isinstance(token, str) or any(not isinstance(v, int) or isinstance(v, bool) or v < 0
                                             for v in (rank, steps, step_id)):
            raise ValueError(f"this client's saved counters are damaged: {config!r}"[:300])
        return cls(token, rank, steps, step_id)


class PooledClient(SplitClient):
    """A client segment built once (``config.cut`` fixed, no connection yet),
    then pointed at one client's session after another (``use``)."""

    def __init__(self, config: ClientConfig):
        if config.cut is None:
            raise ValueError("a pooled client segment needs the cut (the server's) before it connects")
        self.config = config
        self.emulator = None
        self.heartbeat = None  # the ClientApp talks to the server only while it trains
        self.registrations = 0
        self.conn: Connection | None = None
        self.federation = None
        hello, quantizer = self._prepare()
        self.cut = config.cut
        self._hello_payload = hello
        self._build(quantizer)
        self.initial = self.round_state()  # what a client that never trained starts from
        self.pristine: dict[str, torch.Tensor] = {}  # frozen weights before any update, of the modules updated

    def use(self, client_id: str, counters: ClientCounters, address: str) -> None:
        """Act as ``client_id`` from now on: its own connection and session
        token, its step counters (its LoRA and head: ``load_state``)."""
        if self.conn is not None:
            self.conn.close()
        cfg = self.config
        self.conn = Connection(address, client_id, timeout=cfg.timeout, keys=load_client_keys(cfg.key, cfg.server_key),
                               reconnect_for=cfg.reconnect_for)
        self.conn.token = counters.token
        self.link.conn = self.conn
        self.steps = counters.steps
        self.link.rewind(counters.step_id)

    def hello(self) -> str:
        """Register the current client with the server; returns its session token."""
        welcome = register(self.conn, self._hello_payload, self.config.connect_timeout, retry=False)
        self.federation = welcome.federation
        if self.federation is None:
            raise RuntimeError(f"the server at {self.conn.address} runs no federation")
        return welcome.token

    def round_state(self) -> dict[str, torch.Tensor]:
        """Copies of what changes in a round: the LoRA factors and the head."""
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if _round_state(n)}

    def load_state(self, tensors: dict[str, torch.Tensor] | None) -> None:
        """Give the segment a client's LoRA and head (None: the initial ones)."""
        tensors = self.initial if tensors is None else tensors
        params = {n: p for n, p in self.model.named_parameters() if _round_state(n)}
        if set(tensors) != set(params):
            odd = sorted(set(tensors) ^ set(params))
            raise ValueError(f"a client's saved LoRA and head do not fit this segment (they differ in {odd[:3]})")
        with torch.no_grad():
            for name, value in tensors.items():
                if value.shape != params[name].shape:
                    raise ValueError(f"{name}: saved {tuple(value.shape)}, the segment has "
                                     f"{tuple(params[name].shape)}")
                params[name].copy_(value)

    def set_frozen(self, cumulative: dict[str, torch.Tensor]) -> None:
        """Frozen weights = pretrained + ``cumulative`` (every update so far):
        the same for every client, whichever ran on this segment before."""
        for module in sorted(set(cumulative) | set(self.pristine)):
            weight = self.model.get_submodule(PEFT_PREFIX + module).get_base_layer().weight
            if module not in self.pristine:
                self.pristine[module] = weight.detach().clone()
            with torch.no_grad():
                weight.copy_(self.pristine[module])
            if module in cumulative:
                fold_delta(self.model, module, cumulative[module])

    def close(self, say_bye: bool = False) -> None:
        """Close the connection; the session stays on the server for the client's next round."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class _CapturedUpload(FederatedClient):
    """A federated client whose upload is handed back, not sent: the
    strategy takes it from the Flower reply."""

    captured: Message | None = None

    def _request(self, msg):
        if msg.op == "upload":
            self.captured = msg
            return Message("ok")
        return super()._request(msg)


def join_client(pool: PooledClient, client_id: str, address: str, train, num_samples: int,
                labels: tuple[str, ...] | None) -> tuple[ClientCounters, FederationSettings]:
    """Register ``client_id`` with the backbone server and join its federation
    (over ZeroMQ, fedsplit's own join); returns its first counters."""
    pool.use(client_id, ClientCounters(), address)
    token = pool.hello()
    pool.load_state(None)
    runner = FederatedClient(pool, train, num_samples, options=FederatedOptions(labels=labels))
    settings = runner.join()
    return ClientCounters(token, pool.config.lora.rank, 0, 0), settings


def round_client(pool: PooledClient, client_id: str, address: str, counters: ClientCounters,
                 saved: dict[str, torch.Tensor] | None, settings: FederationSettings, offer: RoundOffer, train,
                 num_samples: int) -> tuple[Message, dict, ClientCounters, dict[str, torch.Tensor]]:
    """Train one offered round as ``client_id``; returns its upload message,
    the round's record (split.records), its new counters and its LoRA and head."""
    if offer.status != "train":
        raise ValueError(f"a Flower train message must carry a 'train' offer, got {offer.status!r}")
    pool.use(client_id, counters, address)
    pool.load_state(saved)
    pool.set_frozen(offer.deltas)  # cumulative on this path
    offer.deltas = {}
    runner = _CapturedUpload(pool, train, num_samples)
    runner.rank = counters.rank
    runner.settings = settings
    runner.adapters = AdapterUploads(settings)
    runner._begin(offer)
    runner._take_part(offer)
    if runner.captured is None:
        raise RuntimeError("the round ended without an upload")
    after = ClientCounters(counters.token, runner.rank, pool.steps, pool.link.step_id)
    return runner.captured, runner.records[-1].record, after, pool.round_state()

