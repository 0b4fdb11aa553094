"""The round coordinator: who trains when, from what, and what becomes of it.

Clients join with their rank, block set and sample count. Each round the
coordinator samples a fraction of them, hands each its download (its rank, its
blocks) from the strategy, waits for their uploads until the round's deadline,
then lets the strategy aggregate and checkpoints the result. A client's LoRA
lives partly on the client and partly on the server (its server-side adapter):
the coordinator joins both halves into one upload per client, so a strategy
always sees whole-model LoRA.

The coordinator does no socket I/O and writes no files: the server's loop
feeds it messages and the time, ``ServerSide`` (implemented by
``server.sessions.Sessions``) touches the server's adapters and frozen
weights, and the loop checkpoints each round ``tick`` reports closed.
Initialisation, client initialisation and FedLoRU are described in
docs/algorithms.md#global-init, #client-init and #fedloru.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from split.families import block_of
from split.protocol import FederationSettings, RoundOffer, UploadPayload
from split.seeds import generator, stable_seed

from . import admission
from .adapter_compression import AdapterCompression, check_adapter_codecs
from .admission import MAX_SAMPLES, MAX_VALUE, ModelLayout, Refused
from .allocation import ALLOCATIONS, Allocator, Resources, below_cut, check_fisher
from .strategies import get_strategy, strategy_class
from .strategies.base import ClientInfo, Download, Factors, GlobalModel, StrategyError, Upload, methods_with
from .strategies.robust import RobustConfig, robust

log = logging.getLogger(__name__)

CLIENT_INITS = ("avg", "re", "local")
GLOBAL_INITS = ("kaiming", "gaussian", "svd")


@dataclass
class FederationConfig:
    """How rounds run."""

    strategy: str = "fedit"
    strategy_options: dict = field(default_factory=dict)
    rounds: int = 3
    fraction: float = 1.0  # share of joined clients sampled each round
    min_clients: int = 2  # clients that must have joined before round 0 starts
    min_uploads: int = 1  # fewer uploads than this: the round is retried or skipped
    short_round: str = "skip"  # "skip" or "retry"
    max_retries: int = 2
    deadline: float = 600.0  # seconds a round waits for uploads
    local_steps: int = 10
    local_epochs: float = 0.0  # > 0: each client trains this many passes over its data instead of local_steps
    client_init: str = "avg"  # Avg-Initial, Re-Initial or Local-Initial
    init: str = "kaiming"  # global LoRA before round 0: peft's Kaiming-uniform A, Gaussian A, or SVD (FeDeRA)
    reinit_every: int = 0  # FedLoRU: every tau rounds merge the global LoRA into the base and start afresh
    seed: int = 0
    max_samples: int = MAX_SAMPLES  # most training samples one client may declare at join
    max_upload_value: float = MAX_VALUE  # bound on the magnitude of every uploaded value (server/admission.py)
    robust: RobustConfig = field(default_factory=RobustConfig)  # clipping, trimmed mean or median
    allocation: str = "fixed"  # which blocks each client trains per round (server/allocation.py)
    cover_all: bool = False  # FedRA: the round's participants cover every block when they can
    adapter_up: object = "fp32"  # codec of uploads' factors and head: fp32, fp16, topk:density=D (CodecSpec or text)
    adapter_down: object = "fp32"  # codec of round offers' factors and head

    def __post_init__(self):
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction of clients per round must be in (0, 1], got {self.fraction}")
        if self.short_round not in ("skip", "retry"):
            raise ValueError(f"short_round must be 'skip' or 'retry', got {self.short_round!r}")
        if self.client_init not in CLIENT_INITS:
            raise ValueError(f"client_init must be one of {CLIENT_INITS}, got {self.client_init!r}")
        if self.init not in GLOBAL_INITS:
            raise ValueError(f"init must be one of {GLOBAL_INITS}, got {self.init!r}")
        if self.local_epochs < 0:
            raise ValueError(f"local_epochs must be >= 0 (0: use local_steps), got {self.local_epochs}")
        if self.reinit_every < 0:
            raise ValueError(f"reinit_every must be >= 0 (0: never), got {self.reinit_every}")
        if self.rounds < 1 or self.local_steps < 1 or self.min_clients < 1 or self.min_uploads < 1:
            raise ValueError("rounds, local_steps, min_clients and min_uploads must be at least 1")
        if not (math.isfinite(self.deadline) and self.deadline > 0):
            raise ValueError(f"the round deadline must be a finite number of seconds > 0, got {self.deadline}")
        if self.max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {self.max_samples}")
        if not (math.isfinite(self.max_upload_value) and self.max_upload_value > 0):
            raise ValueError(f"max_upload_value must be a finite number > 0, got {self.max_upload_value}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if self.cover_all and self.allocation != "fedra":
            raise ValueError(f"--cover-all applies to --allocation fedra, not {self.allocation}")
        if "seed" in self.strategy_options:
            raise ValueError("the strategy's seed is the run's seed: give --seed, not --strategy-option seed=...")
        check_adapter_codecs(self)

    def settings(self) -> FederationSettings:
        """What a client needs to know of these rounds."""
        return FederationSettings(self.strategy, self.rounds, self.local_steps, self.local_epochs, self.allocation,
                                  self.adapter_up.text, self.adapter_down.text,
                                  self.frozen_updates() is not None)

    def frozen_updates(self) -> str | None:
        """What in these rounds updates the frozen weights (None: nothing does)."""
        if strategy_class(self.strategy).frozen_updates:
            return f"--strategy {self.strategy} folds part of each round's update into the frozen weights"
        if self.init == "svd":
            return "--init svd moves the weights' principal part into the adapter"
        if self.reinit_every:
            return "--reinit-every merges the global LoRA into the frozen weights"
        return None


class FederationError(ValueError):
    """A federation request out of turn (not joined, not selected, a closed
    round); its text goes back to the client."""


class ServerSide(Protocol):
    """What the coordinator needs from the server."""

    def modules_for(self, client: str) -> dict[str, tuple[int, int]]:
        """Server-side LoRA modules of a client: name -> (d_out, d_in)."""

    def load(self, client: str, A: dict, B: dict, trainable: str, fresh_seed: int | None,
             modules: set[str]) -> None:
        """Set up a client's server-side adapter for a round."""

    def collect(self, client: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """A client's server-side factors now."""

    def gradient_scores(self, client: str) -> dict[int, float]:
        """Per server-side block the client trained since its last load, the
        mean over its backward steps of the sum of its LoRA gradients squared
        (empty unless the server measures them: --allocation fisher)."""

    def fold(self, deltas: dict[str, torch.Tensor]) -> None:
        """Add updates to the server's frozen weights."""

    def base_weight(self, module: str) -> torch.Tensor:
        """A module's pretrained weight, d_out x d_in (for SVD initialisation)."""


@dataclass
class Member:
    """A client that joined the federation."""

    info: ClientInfo
    modules: dict[str, tuple[int, int]]  # client-side LoRA modules: name -> (d_out, d_in)
    profile: str = ""
    server_modules: frozenset[str] = frozenset()  # its server-side LoRA modules when it joined
    synced: int = 0  # client-side delta records it has applied
    rounds: int = 0  # rounds it took part in


@dataclass
class RoundLog:
    """What happened in one round."""

    round: int
    selected: list[str]
    uploaded: list[str]
    aggregated: bool
    seconds: float
    note: str = ""
    allocation: dict[str, list[int]] = field(default_factory=dict)  # blocks each client trained (--allocation)


def initial_factors(shapes: dict[str, tuple[int, int]], rank: int, alpha: float, seed: int,
                    init: str = "kaiming") -> dict[str, Factors]:
    """The global LoRA before round 0, B = 0 and A drawn from the seed and the
    module name: Kaiming-uniform as split.lora.init_lora (peft's default), or
    Gaussian N(0, 1/r) (peft's "gaussian")."""
    out = {}
    for name, (d_out, d_in) in sorted(shapes.items()):
        gen = generator(seed, name)
        A = torch.empty(rank, d_in)
        if init == "gaussian":
            torch.nn.init.normal_(A, std=1.0 / rank, generator=gen)
        else:
            torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=gen)
        out[name] = Factors(A, torch.zeros(d_out, rank), alpha)
    return out


def svd_factors(weights: dict[str, torch.Tensor], rank: int, alpha: float) -> dict[str, Factors]:
    """FeDeRA: A and B from the top-``rank`` singular triplets of each pretrained
    weight, split evenly (B = U sqrt(S), A = sqrt(S) V^T, divided by sqrt(s)
    so that s B A is the best rank-r approximation of W)."""
    out = {}
    scale = alpha / rank
    for name, w in sorted(weights.items()):
        U, S, Vh = torch.linalg.svd(w.float(), full_matrices=False)
        root = (S[:rank] / scale).sqrt()
        out[name] = Factors(root[:, None] * Vh[:rank], U[:, :rank] * root[None, :], alpha)
    return out


def _preview(labels: tuple[str, ...], shown: int = 6) -> str:
    head = ", ".join(labels[:shown])
    return f"[{head}{', ...' if len(labels) > shown else ''}] ({len(labels)})"


class Coordinator:
    """Runs the rounds of one federation.

    ``layout`` is what the server knows of the model (every LoRA-able module's
    true shape, the trained head): each join and upload is checked against it
    and against the run's settings before it is taken (server/admission.py),
    so a client's data never makes a round fail; a client that cannot take
    part is refused with the reason."""

    def __init__(self, config: FederationConfig, server: ServerSide, layout: ModelLayout):
        self.config = config
        self.server = server
        self.layout = layout
        self.strategy = robust(get_strategy(config.strategy, seed=config.seed, **config.strategy_options),
                               config.robust)
        if config.robust.active:
            log.warning("robust aggregation: %s", config.robust.describe())
        self.allocation = Allocator(config.allocation, layout.num_layers, config.seed, config.cover_all)
        self.compression = AdapterCompression(config.adapter_up, config.adapter_down)
        if self.allocation.active and not self.strategy.block_subsets:
            self.strategy.refuse_block_subsets(f"--allocation {config.allocation} gives clients block subsets")
        self.members: dict[str, Member] = {}
        self.labels: tuple[str, ...] | None = None  # class names in head order, from the first client naming them
        # Classes of the shared head: from the first client naming its labels, or
        # else from the first upload taken with a head.
        self.classes: int | None = None
        self.state: dict | None = None
        self.round = 0
        self.phase = "waiting"  # waiting -> running -> done
        self.selected: list[str] = []
        self.undelivered: dict[str, Download] = {}  # selected for the round, download not yet handed out
        self.handed: set[str] = set()
        self.uploads: dict[str, Upload] = {}
        self.refused: dict[str, str] = {}  # selected clients the running round cannot take, with the reason
        self.stalled: str | None = None  # why the next round cannot start (clients are told when they poll)
        self.started = 0.0
        self.retries = 0
        self.deltas: list[dict[str, torch.Tensor]] = []  # client-side updates to frozen weights, in order
        self.merged: dict[str, torch.Tensor] = {}  # every update to frozen weights so far, both sides
        self.shapes: dict[str, tuple[int, int]] = {}
        self.r_max = 0
        self.alpha = 0.0
        self.history: list[RoundLog] = []
        # client -> (synced, rounds) saved with its server-side adapter, for a
        # client whose restored session proved it is the one that had them
        self.returning: dict[str, tuple[int, int]] = {}

    # ---------------------------------------------------------------- messages

    def join(self, client: str, info: ClientInfo, modules: dict[str, tuple[int, int]],
             profile: str = "", labels: tuple[str, ...] | None = None,
             resources: Resources = Resources()) -> FederationSettings:
        """Register a client; returns the federation's settings for it. A
        client that names its classes must name the same ones, in the same
        order, as the clients before it: averaging heads whose row i means
        different classes trains a wrong model."""
        if labels is not None:
            if self.labels is not None and labels != self.labels:
                raise FederationError(
                    f"client {client!r} has classes {_preview(labels)}, the federation has {_preview(self.labels)}; "
                    "every client's data must show the same set of labels")
            if self.classes is not None and len(labels) != self.classes:
                raise FederationError(f"client {client!r} has {len(labels)} classes, the federation's head has "
                                      f"{self.classes}; every client's data must show the same set of labels")
        server_modules = frozenset(self.server.modules_for(client))
        try:
            self._admit(client, info, modules, server_modules)
            self.allocation.check(resources, info.blocks)
        except (Refused, StrategyError) as exc:
            log.warning("client %s refused at join: %s", client, exc)
            raise FederationError(f"join refused: {exc}") from None
        if labels is not None and self.labels is None:
            self.labels, self.classes = labels, len(labels)
        old = self.members.get(client)
        synced, rounds = (old.synced, old.rounds) if old else self.returning.pop(client, (0, 0))
        self.members[client] = Member(info, modules, profile, server_modules, synced=synced, rounds=rounds)
        self.allocation.register(client, resources, below_cut(modules, server_modules))
        if client in self.handed and client not in self.uploads:
            self._redeliver(client)
        log.info("client %s joined the federation: rank %d, %d samples%s", client, info.rank, info.num_samples,
                 f", blocks {sorted(info.blocks)}" if info.blocks is not None else "")
        return self.config.settings()

    def _admit(self, client: str, info: ClientInfo, modules: dict[str, tuple[int, int]],
               server_modules: frozenset[str]) -> None:
        """Refuse a join that a round could not take: what the model does not
        have, a sample count beyond the cap, and a rank, alpha, block set or
        module set the strategy cannot combine with the clients before it (or,
        once round 0 has started, with the run's global LoRA)."""
        admission.check_samples(info.num_samples, self.config.max_samples)
        admission.check_blocks(self.layout, info.blocks)
        admission.check_modules(self.layout, modules, server_modules)
        others = [m for c, m in sorted(self.members.items()) if c != client]
        # Mixed ranks and block subsets where the method has none (the error names those that do).
        self.strategy.check([m.info for m in others] + [info])
        strategy = self.strategy
        if self.state is not None:
            if strategy.heterogeneous_ranks and info.rank > self.r_max:
                raise Refused(f"rank {info.rank} is above this run's largest rank {self.r_max}, fixed when round 0 "
                              f"started; join with --rank {self.r_max} or lower")
            if not strategy.heterogeneous_ranks and info.rank != self.r_max:
                raise Refused(f"{strategy.name} trains one rank, {self.r_max}; join with --rank {self.r_max}")
        alphas = {m.info.alpha for m in others} | ({self.alpha} if self.state is not None else set())
        if not strategy.mixed_alphas and alphas and alphas != {info.alpha}:
            raise Refused(f"{strategy.name} needs one LoRA alpha for every client: the federation trains alpha "
                          f"{sorted(alphas)[0]:g}, this client {info.alpha:g}; join with --alpha "
                          f"{sorted(alphas)[0]:g}, or run {', '.join(methods_with('mixed_alphas'))}")
        whole = set(modules) | server_modules
        federation = set(self.shapes) if self.shapes else (
            set(others[0].modules) | others[0].server_modules if others else None)
        if federation is not None and whole != federation:
            differ = sorted(whole ^ federation)
            raise Refused(f"this client's LoRA covers other modules than the federation's (they differ in "
                          f"{differ[:3]}{' ...' if len(differ) > 3 else ''}); join with the same --targets as "
                          "the other clients")

    def _redeliver(self, client: str) -> None:
        """A selected client that joins again mid-round (its session was lost
        after it took its download) gets the round again: its server-side
        adapter is reloaded and it redoes the round from its start."""
        member = self.members[client]
        member.rounds -= 1  # _download counts the round again
        self.handed.discard(client)
        self.undelivered[client] = self._download(member)
        log.warning("client %s joined again during round %d: it redoes the round", client, self.round)

    def poll(self, client: str) -> RoundOffer:
        """What a client does now: wait, train a round from its download, or
        take the final model; with the frozen-weight updates it has not applied."""
        member = self.members.get(client)
        if member is None:
            raise FederationError(f"client {client!r} has not joined the federation: send join first")
        if self.phase == "done":
            return self._offer("done", member, self._download(member, final=True))
        if self.phase == "running" and client in self.refused:
            raise FederationError(f"round {self.round} cannot take this client: {self.refused[client]}")
        if self.phase == "waiting" and self.stalled is not None:
            raise FederationError(f"the federation cannot start round {self.round}: {self.stalled}")
        if self.phase == "running" and client in self.undelivered:
            self.handed.add(client)
            return self._offer("train", member, self.undelivered.pop(client))
        return RoundOffer("wait", self.round)

    def _offer(self, status: str, member: Member, download: Download) -> RoundOffer:
        fresh = self._fresh_seed() if download.fresh else None
        blocks = None if status == "done" else self._blocks(member)
        offer = RoundOffer(status, self.round, A=download.A, B=download.B, head=download.head,
                           deltas=self._deltas_for(member), rank=download.rank, alpha=download.alpha,
                           trainable=download.trainable, fresh_seed=fresh, options=download.options,
                           blocks=blocks, fisher=status == "train" and self.allocation.wants_gradients)
        # The final model goes lossless: it is what clients save and evaluate.
        return self.compression.offer(member.info.client, offer) if status == "train" else offer

    def _blocks(self, member: Member) -> frozenset[int] | None:
        """The blocks a client trains in the running round: the allocation's
        where blocks are allocated, else those it joined with (None: all)."""
        allocated = self.allocation.blocks_for(member.info.client)
        return member.info.blocks if allocated is None else allocated

    def _fresh_seed(self) -> int:
        """The seed of this round's fresh LoRA: one draw per round, the same on
        every client and on the server, as the global LoRA of round 0 is."""
        return stable_seed(self.config.seed, "fresh", self.round)

    def upload(self, client: str, payload: UploadPayload) -> None:
        """Take a client's upload (its client-side LoRA); its server-side LoRA
        is collected here."""
        if self.phase != "running" or payload.round != self.round:
            raise FederationError(f"round {payload.round} is closed (the federation is at round {self.round}, "
                                  f"{self.phase}); the upload is dropped")
        if client not in self.handed:
            raise FederationError(f"client {client!r} was not selected for round {payload.round}")
        if client in self.refused:
            raise FederationError(f"round {self.round} already refused this client: {self.refused[client]}")
        member = self.members[client]
        alpha, rank = member.info.alpha, payload.rank
        try:
            payload = self.compression.rebuild(client, payload)  # whole tensors again (top-k uploads)
            server_half = self._check_upload(member, payload)
        except Refused as exc:
            # The client is told now, and the round stops waiting for it.
            self.refused[client] = str(exc)
            log.warning("round %d: the upload of client %s is refused: %s", self.round, client, exc)
            raise FederationError(f"upload refused: {exc}") from None
        factors = {m: Factors(payload.A[m], payload.B[m], alpha) for m in payload.A}
        for m, (a, b) in server_half.items():
            factors[m] = Factors(a, b, alpha)
        member.info.rank = rank  # HetLoRA may have pruned it
        self.uploads[client] = Upload(client, factors, payload.num_samples, rank, self._blocks(member), payload.head)
        self.compression.forget(client)
        if self.allocation.wants_gradients:
            self.allocation.observe_gradients(client, {**self.server.gradient_scores(client), **payload.fisher})

    def _check_upload(self, member: Member, payload: UploadPayload) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Refuse an upload the strategy could not aggregate or that would
        poison the global model; returns the client's server-side half (its
        modules within its blocks, at the upload's rank)."""
        info, rank, bound = member.info, payload.rank, self.config.max_upload_value
        blocks = self._blocks(member)
        admission.check_upload_samples(payload.num_samples, info.num_samples)
        payload.record = admission.check_record(payload.record)
        admission.check_upload_rank(rank, info.rank, self.strategy.heterogeneous_ranks)
        admission.check_factors(payload.A, payload.B, rank, member.modules, blocks,
                                every_module=not self.strategy.block_subsets)
        check_fisher(payload.fisher, self.allocation.wants_gradients, blocks)
        classes = admission.check_head(self.layout, payload.head, self.classes)
        admission.check_values("LoRA factor A of", payload.A, bound)
        admission.check_values("LoRA factor B of", payload.B, bound)
        admission.check_values("head tensor", payload.head, bound)
        server_half = {m: (a[:rank], b[:, :rank])  # a pruned rank's tail is zero
                       for m, (a, b) in self.server.collect(info.client).items()
                       if blocks is None or block_of(m) in blocks}
        lost = {m for m in member.server_modules if blocks is None or block_of(m) in blocks} - set(server_half)
        if lost:
            raise Refused(f"the server no longer holds this client's server-side LoRA of {sorted(lost)[:3]} (its "
                          "session was opened again after the round began); it takes part again next round")
        for which, index in (("A", 0), ("B", 1)):
            admission.check_values(f"the server-side LoRA factor {which} of",
                                   {m: pair[index] for m, pair in server_half.items()}, bound)
        if self.classes is None and classes is not None:  # only once the whole upload is taken
            log.info("the federation's head has %d classes, as client %s's first upload says", classes, info.client)
            self.classes = classes
        return server_half

    # ---------------------------------------------------------------- time

    def tick(self, now: float | None = None) -> RoundLog | None:
        """Start or close rounds as the clock and the uploads say; returns the
        round that closed, if one did (the caller checkpoints it); a round that
        is retried has not closed."""
        now = time.monotonic() if now is None else now
        if self.phase == "waiting" and len(self.members) >= self.config.min_clients:
            try:
                self._start(now)
            except Exception as exc:  # noqa: BLE001 - the server must outlive a round that cannot start
                reason = f"{type(exc).__name__}: {exc}"
                if reason != self.stalled:  # once per reason, not once per tick
                    log.exception("round %d cannot start; clients are told when they poll", self.round)
                self.stalled = reason
                self.phase = "waiting"
            else:
                self.stalled = None
        elif self.phase == "running":
            settled = set(self.uploads) | set(self.refused)
            if settled >= set(self.selected) or now - self.started > self.config.deadline:
                return self._close(now)
        return None

    def _clients(self) -> list[ClientInfo]:
        return [self.members[c].info for c in sorted(self.members)]

    def _start(self, now: float) -> None:
        if self.state is None:
            for member in self.members.values():
                self.shapes.update(member.modules)
                self.shapes.update(self.server.modules_for(member.info.client))
            clients = self._clients()
            self.r_max = max(c.rank for c in clients)
            self.alpha = max(clients, key=lambda c: c.rank).alpha
            self.state = self.strategy.init_state(self._initial(self.config.seed), clients)
        names = sorted(self.members)
        k = max(1, math.ceil(self.config.fraction * len(names)))
        rng = random.Random(stable_seed(self.config.seed, "sample", self.round, self.retries))
        self.selected = sorted(rng.sample(names, k))
        allocated = self.allocation.plan(self.round, self.selected)
        if allocated:
            log.info("round %d allocation: %s", self.round,
                     "; ".join(f"{c} {sorted(b)}" for c, b in sorted(allocated.items())))
        self.handed = set()
        self.uploads = {}
        self.refused = {}
        self.undelivered = {}
        for c in self.selected:
            try:
                self.undelivered[c] = self._download(self.members[c])
            except Exception as exc:  # noqa: BLE001 - one client's download must not stop the others' round
                log.exception("round %d: no download for client %s; it is left out", self.round, c)
                self.refused[c] = f"the strategy has no download for it ({type(exc).__name__}: {exc})"
        self.started = now
        self.phase = "running"
        log.info("round %d: %d of %d clients selected: %s", self.round, len(self.selected), len(names),
                 ", ".join(self.selected))

    def _initial(self, seed: int) -> dict[str, Factors]:
        if self.config.init != "svd":
            return initial_factors(self.shapes, self.r_max, self.alpha, seed, self.config.init)
        factors = svd_factors({m: self.server.base_weight(m) for m in self.shapes}, self.r_max, self.alpha)
        # The principal part moves from the frozen weights into the adapter, so
        # the model computes what the pretrained one did.
        self._fold_everywhere({m: -f.delta() for m, f in factors.items()})
        return factors

    def _fold_everywhere(self, deltas: dict[str, torch.Tensor]) -> None:
        """Queue updates to frozen weights: the server's part now, the clients' on their next poll."""
        server_modules = set()
        for c in self.members:
            server_modules |= set(self.server.modules_for(c))
        for m, d in deltas.items():
            self.merged[m] = self.merged[m] + d if m in self.merged else d.clone()
        self.server.fold({m: d for m, d in deltas.items() if m in server_modules})
        client_part = {m: d for m, d in deltas.items() if m not in server_modules}
        if client_part:
            self.deltas.append(client_part)

    def _download(self, member: Member, final: bool = False) -> Download:
        info = member.info
        download = self.strategy.download(self.state, info, self.round)
        init = self.config.client_init
        if not final and init != "avg" and member.rounds > 0:
            download.A, download.B = {}, {}  # Local-Initial keeps its own LoRA; Re-Initial starts fresh
            download.fresh = init == "re"
        client_side = set(member.modules)
        server_A = {m: v for m, v in download.A.items() if m not in client_side}
        server_B = {m: v for m, v in download.B.items() if m not in client_side}
        # The final download loads too: a client that saves its adapter after the
        # last round gets the global model's server-side half, not what it last trained.
        blocks = info.blocks if final else self._blocks(member)
        modules = {m for m in self.server.modules_for(info.client) if blocks is None or block_of(m) in blocks}
        seed = self._fresh_seed() if download.fresh else None
        self.server.load(info.client, server_A, server_B, download.trainable, seed, modules)
        if not final:
            member.rounds += 1
        download.A = {m: v for m, v in download.A.items() if m in client_side}
        download.B = {m: v for m, v in download.B.items() if m in client_side}
        return download

    def _close(self, now: float) -> RoundLog | None:
        """Aggregate (or skip, or retry) the running round; returns its log
        unless it is being retried (a retried round has not closed)."""
        uploaded = sorted(self.uploads)
        missed = sorted(set(self.selected) - set(uploaded) - set(self.refused))
        if missed:
            log.warning("round %d: %s missed the deadline and are left out", self.round, ", ".join(missed))
        entry = RoundLog(self.round, list(self.selected), uploaded, False, now - self.started,
                         allocation={c: sorted(b) for c, b in sorted(self.allocation.current.items())})
        notes = [f"{c} refused: {why}" for c, why in sorted(self.refused.items())]
        result, short = None, f"only {len(uploaded)} uploads (minimum {self.config.min_uploads})"
        if len(uploaded) >= self.config.min_uploads:
            try:
                result = self.strategy.aggregate(self.state, [self.uploads[c] for c in uploaded], self.round)
            except Exception as exc:  # noqa: BLE001 - the last line of defence: admission should prevent this
                log.exception("round %d: %s could not aggregate the uploads", self.round, self.strategy.name)
                short = f"aggregation failed ({type(exc).__name__}: {exc})"
        if result is None:
            # Too few uploads, or an aggregation that failed: the round's settings say what happens.
            if self.config.short_round == "retry" and self.retries < self.config.max_retries:
                self.retries += 1
                entry.note = "; ".join([f"{short}; retried", *notes])
                self.history.append(entry)
                self._start(now)
                return None
            entry.note = "; ".join([f"{short}; skipped", *notes])
        else:
            if self.allocation.active:
                uploads = [self.uploads[c] for c in uploaded]
                self.allocation.observe_round(self.strategy.export(self.state), self.strategy.export(result.state),
                                              uploads)
            self.state = result.state
            if result.base_deltas:
                self._fold_everywhere(result.base_deltas)
            entry.aggregated = True
            tau = self.config.reinit_every
            if tau and (self.round + 1) % tau == 0 and self.round + 1 < self.config.rounds:
                # FedLoRU: the accumulated low-rank update joins the frozen weights
                # and training restarts from a fresh LoRA.
                glob = self.global_model()
                self._fold_everywhere({m: Factors(glob.A[m], glob.B[m], glob.alpha).delta() for m in glob.A})
                self.state = self.strategy.init_state(
                    self._initial(stable_seed(self.config.seed, "reinit", self.round)), self._clients())
                notes.insert(0, "global LoRA merged into the base and re-initialised (FedLoRU)")
            entry.note = "; ".join(notes)
        self.history.append(entry)
        self.retries = 0
        self.round += 1
        self.phase = "done" if self.round >= self.config.rounds else "running"
        # A round that took every upload is news; one that left clients out is a warning.
        log.log(logging.INFO if entry.aggregated and not entry.note and not missed else logging.WARNING,
                "round %d closed: %d of %d uploads %s%s (%.1fs)", entry.round, len(entry.uploaded),
                len(entry.selected), "aggregated" if entry.aggregated else "not aggregated",
                f", {entry.note}" if entry.note else "", entry.seconds)
        if self.phase == "done":
            log.info("federation finished after %d rounds", self.round)
        else:
            self._start(now)
        return entry

    def _deltas_for(self, member: Member) -> dict[str, torch.Tensor]:
        """Sum of the client-side frozen-weight updates a client has not applied
        (it applies them now: they count as synced)."""
        out: dict[str, torch.Tensor] = {}
        for record in self.deltas[member.synced:]:
            for m, d in record.items():
                if m in member.modules:
                    out[m] = out[m] + d if m in out else d.clone()
        member.synced = len(self.deltas)
        return out

    # ---------------------------------------------------------------- checkpoints

    def global_model(self) -> GlobalModel:
        """The strategy's global model with both factors of every module the
        federation trains: zeros where the method keeps a factor on the
        clients (FedSA-LoRA's B) or keeps no global value."""
        glob = self.strategy.export(self.state)
        r = glob.rank
        dtype = next(iter(glob.A.values())).dtype if glob.A else torch.float32
        A, B = {}, {}
        for m, (d_out, d_in) in sorted(self.shapes.items()):
            A[m] = glob.A.get(m, torch.zeros(r, d_in, dtype=dtype))
            B[m] = glob.B.get(m, torch.zeros(d_out, r, dtype=dtype))
        return GlobalModel(A, B, r, glob.alpha, dict(glob.head))

    def snapshot(self) -> dict:
        """Everything needed to resume after the round just closed."""
        return {"round": self.round, "phase": self.phase, "state": self.state, "deltas": self.deltas,
                "merged": self.merged, "shapes": {m: list(v) for m, v in self.shapes.items()},
                "r_max": self.r_max, "alpha": self.alpha, "strategy": self.strategy.name,
                "history": [h.__dict__ for h in self.history],
                "labels": None if self.labels is None else list(self.labels), "classes": self.classes,
                "allocation": self.allocation.snapshot()}

    def restore(self, snap: dict) -> None:
        """Continue from a snapshot (its round has closed)."""
        if snap["strategy"] != self.strategy.name:
            raise ValueError(f"the checkpoint was made with {snap['strategy']}, this server runs "
                             f"{self.strategy.name}; start it with --strategy {snap['strategy']}")
        self.state = snap["state"]
        self.deltas = list(snap["deltas"])
        self.merged = dict(snap["merged"])
        self.shapes = {m: (int(v[0]), int(v[1])) for m, v in snap["shapes"].items()}
        self.r_max, self.alpha = int(snap["r_max"]), float(snap["alpha"])
        self.history = [RoundLog(**h) for h in snap["history"]]
        self.labels = None if snap.get("labels") is None else tuple(snap["labels"])
        self.classes = snap.get("classes", None if self.labels is None else len(self.labels))
        self.allocation.restore(snap.get("allocation"))
        self.round = int(snap["round"])
        self.phase = "done" if self.round >= self.config.rounds else "waiting"
