"""A client's side of a federation: join, then follow the server's rounds.

Each round the client receives its offer (client-side LoRA factors at its
rank, the shared head, updates to fold into its frozen weights), trains the
round's local steps through the server, and uploads its client-side LoRA, head
and sample count. The server adds the client's server-side LoRA itself. The
client halves of methods run here: HetLoRA's regulariser and self-pruning
(``edge.hetlora``) and FedDPA's personal adapter (``edge.personal``).

When the server loses this client's session mid-round (it restarted from its
last committed round, or the session expired), the client registers again,
joins again and redoes the round from the state it had when the round began:
its LoRA, head and personal adapter as they were right after it applied the
round's offer, its step counters, and the frozen-weight updates it had already
folded (the server hands the same round out again, and those updates are not
folded twice).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch

from split.families import block_of
from split.gradients import BlockGradients, lora_blocks
from split.lora import (PEFT_PREFIX, fold_delta, get_factors, init_lora, lora_layers, pad_rows, set_factors,
                        set_trainable)
from split.protocol import FederationSettings, Join, RoundOffer, UploadPayload
from split.seeds import stable_seed
from split.transport import SessionLost
from split.wire import Message

from .adapter_uploads import AdapterUploads
from .client import MAX_REDO, SplitClient
from .hetlora import HetLoRAOptions, RankRegulariser
from .metering import RoundMeter, upload_bytes
from .personal import PersonalAdapter

log = logging.getLogger(__name__)


@dataclass
class RoundRecord:
    """One round seen from a client."""

    round: int
    accuracy: float | None  # of the downloaded global model, before local training
    loss: float | None
    bytes_sent: int
    bytes_received: int
    seconds: float = 0.0  # the round's wall-clock here (an emulated device's, sleeps included)
    record: dict = field(default_factory=dict)  # what was metered (split.records), as sent with the upload


@dataclass
class FederatedOptions:
    blocks: list[int] | None = None  # blocks whose LoRA this client trains (None: all)
    profile: str = ""
    poll: float = 0.2
    evaluate: bool = False  # evaluate the global model at each round start and at the end
    max_wait: float = 3600.0
    personal: bool = False  # FedDPA: a second, local adapter that is trained but never uploaded
    personal_test: object | None = None  # batches of the client's own held-out data
    labels: tuple[str, ...] | None = None  # class names in head order, checked against the other clients'
    # What this client affords, for a server that allocates blocks every round (--allocation):
    capacity: int | None = None  # blocks it can train per round
    train_memory: int | None = None  # bytes for trainable blocks
    block_costs: dict[int, int] | None = None  # each block's training memory in bytes (edge.allocation)
    blocks_planned: bool = False  # ``blocks`` came from a plan: a server that allocates decides them instead
    budget_bytes: int | None = None  # the device profile's memory budget, reported in each round record
    observers: list = field(default_factory=list)  # edge.metering.RoundObserver: display, run folder, ...


def _head_name(param_name: str) -> str:
    """``base_model.model.classifier.modules_to_save.default.weight`` -> ``classifier.weight``."""
    name = param_name[len(PEFT_PREFIX):] if param_name.startswith(PEFT_PREFIX) else param_name
    return name.replace(".modules_to_save.default", "")


@dataclass
class RoundStart:
    """What a client held when it began a round, after applying the round's
    offer: what it goes back to when the round must be redone."""

    round: int
    tensors: dict[str, torch.Tensor]  # LoRA (global and personal) and head, by parameter name
    rank: int
    steps: int
    step_id: int
    records: int

    @classmethod
    def take(cls, runner: "FederatedClient", round_index: int) -> "RoundStart":
        client = runner.client
        tensors = {n: p.detach().clone() for n, p in client.model.named_parameters() if _round_state(n)}
        return cls(round_index, tensors, runner.rank, client.steps, client.link.step_id, len(runner.records))

    def put_back(self, runner: "FederatedClient") -> None:
        client = runner.client
        params = dict(client.model.named_parameters())
        with torch.no_grad():
            for name, value in self.tensors.items():
                params[name].copy_(value)
        runner.rank, client.steps = self.rank, self.steps
        client.link.rewind(self.step_id)
        del runner.records[self.records:]


def _round_state(name: str) -> bool:
    """Whether a client parameter changes during a round (LoRA factors, the trained head)."""
    return "lora_" in name or ".modules_to_save." in name


def head_params(client: SplitClient) -> dict[str, torch.nn.Parameter]:
    """The client's trained head (modules_to_save copies), by plain name."""
    return {_head_name(n): p for n, p in client.model.named_parameters()
            if ".modules_to_save.default." in n}


@dataclass
class FederatedClient:
    """Follows the rounds of a federation for one ``SplitClient``."""

    client: SplitClient
    train: object  # iterable of batches, re-iterated as needed
    num_samples: int
    test: object | None = None
    options: FederatedOptions = field(default_factory=FederatedOptions)

    def __post_init__(self):
        self.rank = self.client.config.lora.rank  # HetLoRA may prune it
        self.layers = lora_layers(self.client.model)
        self.modules = {name: (layer.lora_B["default"].weight.shape[0], layer.lora_A["default"].weight.shape[1])
                        for name, layer in self.layers.items()}
        self.records: list[RoundRecord] = []
        self.final_accuracy: float | None = None
        self.personal_accuracy: dict[str, float] = {}
        self.settings: FederationSettings | None = None
        self.personal = PersonalAdapter(self.client) if self.options.personal else None
        self.started: RoundStart | None = None  # the latest round this client began
        self.round_blocks: frozenset[int] | None = None  # blocks the running round trains (None: options.blocks)
        self.gradient_scores: dict[int, float] | None = None  # the round's squared gradients, when asked for
        self.redone = 0  # rounds begun again after the server lost this client's session
        self.meter = RoundMeter(self.client, self.options.budget_bytes)
        self.adapters: AdapterUploads | None = None  # upload codec and error feedback, from the settings
        self.offer_bytes = 0  # frames of the latest round offer received

    def _request(self, msg):
        return self.client.conn.request(msg)

    def join(self) -> FederationSettings:
        """Join the federation; returns its settings."""
        spec = self.client.config.lora
        opts = self.options
        blocks = None if opts.blocks is None else frozenset(opts.blocks)
        federation = self.client.federation
        if opts.blocks_planned and federation is not None and federation.allocation != "fixed":
            blocks = None  # the server allocates every round, within the plan's capacity and budget
        reply = self._request(Join(spec.rank, spec.alpha, self.num_samples, self.modules, blocks, opts.profile,
                                   opts.labels, opts.capacity, opts.train_memory, opts.block_costs).to_message())
        self.settings = FederationSettings.from_meta(reply.meta, "join reply")
        if self.adapters is None or not self.adapters.follows(self.settings):
            self.adapters = AdapterUploads(self.settings)
        return self.settings

    def _apply(self, offer: RoundOffer) -> None:
        """Load an offer into the client model."""
        model = self.client.model
        for module, delta in offer.deltas.items():
            fold_delta(model, module, delta)
        if offer.fresh_seed is not None:
            init_lora(model, "default", offer.fresh_seed)
        full = self.client.config.lora.rank
        set_factors(model, {m: pad_rows(a, full) for m, a in offer.A.items()},
                    {m: pad_rows(b.T, full).T for m, b in offer.B.items()})
        self.rank = min(self.rank, offer.rank)
        heads = head_params(self.client)
        unknown = sorted(set(offer.head) - set(heads))
        if unknown:
            raise ValueError(f"the server sent head tensors {unknown[:3]} this client does not have")
        with torch.no_grad():
            for name, value in offer.head.items():
                heads[name].copy_(value)

    def _trained_modules(self) -> set[str] | None:
        """The client-side LoRA modules this client trains (None: all of them):
        those of the round's blocks when the server allocates them, else of ``--blocks``."""
        blocks = self.options.blocks if self.round_blocks is None else self.round_blocks
        return None if blocks is None else {m for m in self.modules if block_of(m) in blocks}

    def _optimizer(self, trainable: str) -> torch.optim.Optimizer:
        lora = set_trainable(self.client.model, trainable, modules=self._trained_modules())
        if self.personal is not None:
            lora += self.personal.params()
        head = list(head_params(self.client).values())
        cfg = self.client.config
        groups = [g for g in ({"params": lora}, {"params": head, "lr": cfg.head_lr or cfg.lr}) if g["params"]]
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def _steps(self) -> int:
        """The round's local steps: a fixed count, or epochs over this client's data."""
        if self.settings.local_epochs > 0:
            return max(1, math.ceil(self.settings.local_epochs * len(self.train)))
        return self.settings.local_steps

    def _round_batches(self, round_index: int):
        """The round's batches, a function of the seed and the round alone (so a
        resumed federation replays the same data), cycling through epochs."""
        seed = self.client.config.seed
        epoch = 0
        while True:
            if hasattr(self.train, "epoch"):
                yield from self.train.epoch(stable_seed(seed, round_index, epoch))
            else:  # a plain list of batches: rotate it by round
                n = len(self.train)
                yield from (self.train[(round_index * 7 + epoch * n + i) % n] for i in range(n))
            epoch += 1

    def _evaluate_global(self) -> float:
        """Accuracy of the global model (without a personal adapter)."""
        if self.personal is not None:
            return self.personal.evaluate_global(self.test)
        return self.client.evaluate(self.test)

    def _payload(self, round_index: int) -> UploadPayload:
        factors = get_factors(self.client.model, modules=self._trained_modules())
        return UploadPayload(round_index, self.num_samples, self.rank,
                             A={m: a[:self.rank].contiguous() for m, (a, _) in factors.items()},
                             B={m: b[:, :self.rank].contiguous() for m, (_, b) in factors.items()},
                             head={n: p.detach().clone() for n, p in head_params(self.client).items()},
                             fisher=self.gradient_scores)

    def _notify(self, hook: str, *args) -> None:
        for observer in self.options.observers:
            getattr(observer, hook)(*args)

    def _metered_step(self, batch, penalty) -> float:
        loss, record = self.meter.step(lambda: self.client.train_step(batch, penalty))
        self._notify("step_done", record)
        return loss

    def _train_round(self, offer: RoundOffer) -> list[float]:
        """The round's local steps, with HetLoRA's regulariser and pruning when
        the offer asks for them."""
        self.round_blocks = offer.blocks
        self.client.optimizer = self._optimizer(offer.trainable)
        batches = self._round_batches(offer.round)
        hetlora = HetLoRAOptions.from_options(offer.options)
        regulariser = None if hetlora is None else RankRegulariser(self.layers, hetlora, self.rank)
        penalty = None if regulariser is None else regulariser.penalty
        gradients = BlockGradients(lora_blocks(self.client.model, modules=self._trained_modules())) \
            if offer.fisher else None
        handles = [] if gradients is None else gradients.hook(p for p in self.client.model.parameters()
                                                              if p.requires_grad)
        try:
            losses = []
            for _ in range(self._steps()):
                losses.append(self._metered_step(next(batches), penalty))
                if gradients is not None:
                    gradients.step()
        finally:
            for handle in handles:
                handle.remove()
        self.gradient_scores = None if gradients is None else gradients.scores()
        if regulariser is not None:
            rank = regulariser.prune()
            if rank < self.rank:
                log.info("HetLoRA: rank %d -> %d", self.rank, rank)
                self.rank = rank
        return losses

    def run(self) -> list[RoundRecord]:
        """Take part until the server says the federation is done; if the
        server loses this client's session meanwhile, register and join again
        and go on (the interrupted round is redone)."""
        lost, rounds = 0, -1
        while True:
            try:
                if lost:
                    self.client.reregister()
                self.join()
                return self._follow()
            except SessionLost as exc:
                # A server that keeps losing the session before any round completes is not coming back whole.
                lost, rounds = (lost + 1, rounds) if len(self.records) == rounds else (1, len(self.records))
                if lost > MAX_REDO:
                    raise
                log.warning("%s: %s; registering and joining again", self.client.conn.client_id, exc)

    def _follow(self) -> list[RoundRecord]:
        """Poll, train and upload rounds until the federation is done."""
        waited = time.monotonic()
        while True:
            received = self.client.conn.bytes_received
            offer = RoundOffer.from_message(self._request(Message("round")))
            self.offer_bytes = self.client.conn.bytes_received - received  # in the round's record
            if offer.status == "wait":
                if time.monotonic() - waited > self.options.max_wait:
                    raise TimeoutError(f"no round for this client in {self.options.max_wait:.0f}s")
                time.sleep(self.options.poll)
                continue
            self._begin(offer)
            if offer.status == "done":
                if self.options.evaluate and self.test is not None:
                    self.final_accuracy = self._evaluate_global()
                if self.personal is not None and self.options.personal_test is not None:
                    self.personal_accuracy = self.personal.evaluate(self.options.personal_test)
                return self.records
            self._take_part(offer)
            waited = time.monotonic()

    def _begin(self, offer: RoundOffer) -> None:
        """Load an offer; an offer of the round this client began last is that
        round handed out again (the server lost the session): the client goes
        back to where it began it instead, its updates already folded."""
        last = self.started
        if offer.status == "train" and last is not None and offer.round <= last.round:
            if offer.round < last.round:
                raise RuntimeError(f"the server offers round {offer.round}, but this client already began round "
                                   f"{last.round}: the server resumed from a checkpoint older than this client's "
                                   "state; start this client again")
            last.put_back(self)
            self.adapters.rewind()
            self.redone += 1
            log.warning("%s: redoing round %d from its start", self.client.conn.client_id, offer.round)
            return
        self._apply(offer)
        if offer.status == "train":
            self.started = RoundStart.take(self, offer.round)
            self.adapters.begin(offer)

    def _take_part(self, offer: RoundOffer) -> None:
        """Train the offered round and upload it."""
        conn = self.client.conn
        self.meter.start(offer.round)
        self._notify("round_started", offer.round, self.settings.rounds, self._steps())
        evaluate = self.options.evaluate and self.test is not None
        accuracy = self.meter.evaluate(self._evaluate_global) if evaluate else None
        sent, received, started = conn.bytes_sent, conn.bytes_received, time.perf_counter()
        losses = self._train_round(offer)
        payload = self.adapters.prepare(self._payload(offer.round), offer.trainable)
        extra = {"download_bytes": self.offer_bytes}
        for observer in self.options.observers:
            extra.update(observer.record_extra())
        payload.record = self.meter.finish(accuracy, upload_bytes(payload.to_message()), extra)
        self._request(payload.to_message())
        self.meter.uploaded()
        self.records.append(RoundRecord(offer.round, accuracy, sum(losses) / len(losses),
                                        conn.bytes_sent - sent, conn.bytes_received - received,
                                        time.perf_counter() - started, payload.record))
        log.debug("round %d: loss %.3f", offer.round, self.records[-1].loss)
        self._notify("round_done", offer.round, payload.record)
