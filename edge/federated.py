"""A client's side of a federation: join, then follow the server's rounds.

Each round the client receives its download (client-side LoRA factors at its
rank, the shared head, updates to fold into its frozen weights), trains the
round's local steps through the server, and uploads its client-side LoRA, head
and sample count. The server adds the client's server-side LoRA itself.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch

from split.families import block_of
from split.partition import stable_seed
from split.lora import (PEFT_PREFIX, fold_delta, get_factors, init_lora, lora_layers, pad_rows, set_factors,
                        set_trainable)
from split.wire import Message

from .client import SplitClient

log = logging.getLogger(__name__)


@dataclass
class RoundRecord:
    """One round seen from a client."""

    round: int
    accuracy: float | None  # of the downloaded global model, before local training
    loss: float | None
    bytes_sent: int
    bytes_received: int


@dataclass
class FederatedOptions:
    layers: list[int] | None = None  # blocks whose LoRA this client trains (None: all)
    profile: str = ""
    poll: float = 0.2
    evaluate: bool = False  # evaluate the global model at each round start and at the end
    max_wait: float = 3600.0
    personal: bool = False  # FedDPA: a second, local adapter that is trained but never uploaded
    personal_test: object | None = None  # batches of the client's own held-out data


def _head_name(param_name: str) -> str:
    """``base_model.model.classifier.modules_to_save.default.weight`` -> ``classifier.weight``."""
    name = param_name[len(PEFT_PREFIX):] if param_name.startswith(PEFT_PREFIX) else param_name
    return name.replace(".modules_to_save.default", "")


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
        self.modules = {name: [layer.lora_B["default"].weight.shape[0], layer.lora_A["default"].weight.shape[1]]
                        for name, layer in lora_layers(self.client.model).items()}
        self.records: list[RoundRecord] = []
        self.final_accuracy: float | None = None
        self.personal_accuracy: dict[str, float] = {}
        if self.options.personal:
            self._add_local_adapter()

    # ------------------------------------------------------------ FedDPA

    def _add_local_adapter(self) -> None:
        """The personal adapter on the client-side modules: B = 0, so it starts
        as a no-op; it trains beside the global one and never leaves the client."""
        cfg = self.client.config
        model = self.client.model
        model.add_adapter("local", cfg.lora.peft_config(self.client.family, None, cfg.task))
        init_lora(model, "local", stable_seed(cfg.seed, "local"))
        self._both_adapters()

    def _active(self, names: list[str]) -> None:
        # Only the LoRA layers switch: the head (a module to save) has a single copy.
        for layer in lora_layers(self.client.model).values():
            layer.set_adapter(names)

    def _both_adapters(self) -> None:
        self._active(["default", "local"])

    def _local_params(self) -> list:
        return [p for n, p in self.client.model.named_parameters() if ".local." in n]

    def evaluate_personal(self) -> dict[str, float]:
        """Accuracy on the client's own held-out data with the global adapter
        alone and with global + personal adapters combined."""
        test = self.options.personal_test
        self._active(["default"])
        try:
            global_acc = self.client.evaluate(test)
        finally:
            self._both_adapters()
        return {"global": global_acc, "personalised": self.client.evaluate(test)}

    def _request(self, op: str, **kw) -> Message:
        return self.client.conn.request(Message(op, **kw))

    def join(self) -> dict:
        spec = self.client.config.lora
        meta = {"rank": spec.rank, "alpha": spec.alpha, "num_samples": self.num_samples,
                "layers": self.options.layers, "profile": self.options.profile, "modules": self.modules}
        return self._request("join", meta=meta).meta

    def _apply(self, reply: Message) -> str:
        """Load a download into the client model; returns what trains."""
        t, meta = reply.tensors, reply.meta
        model = self.client.model
        for key, delta in t.items():
            if key.startswith("D:"):
                fold_delta(model, key[2:], delta)
        if meta.get("fresh"):
            init_lora(model, "default", int(meta.get("seed", 0)) + int(meta.get("round", 0)))
        full = self.client.config.lora.rank
        set_factors(model, {k[2:]: pad_rows(v, full) for k, v in t.items() if k.startswith("A:")},
                    {k[2:]: pad_rows(v.T, full).T for k, v in t.items() if k.startswith("B:")})
        self.rank = min(self.rank, int(meta.get("rank", full)))
        options = meta.get("options") or {}
        self.hetlora = (float(options["hetlora_lambda"]), float(options["hetlora_gamma"])) \
            if "hetlora_lambda" in options else None
        heads = head_params(self.client)
        with torch.no_grad():
            for key, value in t.items():
                if key.startswith("X:") and key[2:] in heads:
                    heads[key[2:]].copy_(value)
        return meta.get("trainable", "both")

    def _trained_modules(self) -> set[str] | None:
        """The client-side LoRA modules this client trains (None: all of them)."""
        layers = self.options.layers
        return None if layers is None else {m for m in self.modules if block_of(m) in layers}

    def _optimizer(self, trainable: str) -> torch.optim.Optimizer:
        lora = set_trainable(self.client.model, trainable, modules=self._trained_modules())
        if self.options.personal:
            lora += self._local_params()
            for p in self._local_params():
                p.requires_grad_(True)
        head = list(head_params(self.client).values())
        cfg = self.client.config
        groups = [g for g in ({"params": lora}, {"params": head, "lr": cfg.head_lr or cfg.lr}) if g["params"]]
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def _steps(self, meta: dict) -> int:
        """The round's local steps: a fixed count, or epochs over this client's data."""
        epochs = float(meta.get("local_epochs") or 0.0)
        if epochs > 0:
            return max(1, math.ceil(epochs * len(self.train)))
        return int(meta["local_steps"])

    def _round_batches(self, round_index: int):
        """The round's batches, a function of the seed and the round alone (so a
        resumed federation replays the same data), cycling through epochs."""
        seed = self.client.config.seed
        epoch = 0
        while True:
            if hasattr(self.train, "epoch"):
                yield from self.train.epoch(stable_seed(seed, f"{round_index}:{epoch}"))
            else:  # a plain list of batches: rotate it by round
                n = len(self.train)
                yield from (self.train[(round_index * 7 + epoch * n + i) % n] for i in range(n))
            epoch += 1

    def _tail_norms(self) -> torch.Tensor:
        """HetLoRA's rank regulariser over the client-side LoRA (without lambda)."""
        from server.strategies.hetlora import rank_penalty

        gamma = self.hetlora[1]
        return sum(rank_penalty(layer.lora_A["default"].weight, layer.lora_B["default"].weight, self.rank, gamma)
                   for layer in lora_layers(self.client.model).values())

    def _prune(self, before: float) -> None:
        """HetLoRA self-pruning: drop the tail if local training shrank it. Zeroed
        tails of both factors get zero gradients, so they stay dropped."""
        from server.strategies.hetlora import pruned_rank

        with torch.no_grad():
            after = float(self._tail_norms())
            rank = pruned_rank(self.rank, self.hetlora[1], before, after)
            if rank < self.rank:
                for layer in lora_layers(self.client.model).values():
                    layer.lora_A["default"].weight[rank:].zero_()
                    layer.lora_B["default"].weight[:, rank:].zero_()
                log.info("HetLoRA: rank %d -> %d", self.rank, rank)
                self.rank = rank

    def _upload(self, round_index: int) -> None:
        factors = get_factors(self.client.model, modules=self._trained_modules())
        tensors = {f"A:{m}": a[:self.rank].contiguous() for m, (a, _) in factors.items()}
        tensors.update({f"B:{m}": b[:, :self.rank].contiguous() for m, (_, b) in factors.items()})
        tensors.update({f"X:{n}": p.detach().clone() for n, p in head_params(self.client).items()})
        self._request("upload", meta={"round": round_index, "num_samples": self.num_samples,
                                      "rank": self.rank}, tensors=tensors)

    def run(self) -> list[RoundRecord]:
        """Take part until the server says the federation is done."""
        self.join()
        waited = time.monotonic()
        conn = self.client.conn
        while True:
            reply = self._request("round")
            status = reply.meta["status"]
            if status == "wait":
                if time.monotonic() - waited > self.options.max_wait:
                    raise TimeoutError(f"no round for this client in {self.options.max_wait:.0f}s")
                time.sleep(self.options.poll)
                continue
            trainable = self._apply(reply)
            if status == "done":
                if self.options.evaluate and self.test is not None:
                    if self.options.personal:  # the global model alone
                        self._active(["default"])
                    self.final_accuracy = self.client.evaluate(self.test)
                    if self.options.personal:
                        self._both_adapters()
                if self.options.personal and self.options.personal_test is not None:
                    self.personal_accuracy = self.evaluate_personal()
                return self.records
            round_index = int(reply.meta["round"])
            accuracy = None
            if self.options.evaluate and self.test is not None:
                if self.options.personal:
                    self._active(["default"])
                accuracy = self.client.evaluate(self.test)
                if self.options.personal:
                    self._both_adapters()
            sent, received = conn.bytes_sent, conn.bytes_received
            self.client.optimizer = self._optimizer(trainable)
            batches = self._round_batches(round_index)
            penalty = None
            if self.hetlora is not None:
                with torch.no_grad():
                    before = float(self._tail_norms())
                penalty = lambda: self.hetlora[0] * self._tail_norms()  # noqa: E731
            losses = [self.client.train_step(next(batches), penalty) for _ in range(self._steps(reply.meta))]
            if self.hetlora is not None:
                self._prune(before)
            self._upload(round_index)
            self.records.append(RoundRecord(round_index, accuracy, sum(losses) / len(losses),
                                            conn.bytes_sent - sent, conn.bytes_received - received))
            log.info("round %d: loss %.3f", round_index, self.records[-1].loss)
            waited = time.monotonic()
