"""The contract every aggregation strategy implements.

A strategy is pure: it receives the uploads of one round (LoRA factors keyed by
whole-model module name, each client's rank, block set and sample count) and its
own state, and returns the new state, what each client downloads next, the
global model, and any change to the frozen weights. It does no I/O and never
touches a model. Each method's rule is in docs/algorithms.md.

Conventions:

- A is ``lora_A`` (r x d_in), B is ``lora_B`` (d_out x r), the update is
  ``s * B @ A`` with ``s = alpha / r``.
- ``base_deltas`` are in the standard orientation (d_out x d_in); folding them
  into a layer's own weight (Conv1D stores in x out) is the caller's job.
- Module names are whole-model names without the peft prefix, e.g.
  ``bert.encoder.layer.3.attention.self.query``; a module's block index is
  ``split.families.block_of(name)``.
- The head is the non-LoRA trainables the clients share (a new classification
  head), by plain parameter name.

A subclass with a ``name`` registers itself: the registry, the CLI's
``--strategy`` choices and the lists of methods that accept mixed ranks or
block subsets all derive from the class attributes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch

TRAIN_BOTH, TRAIN_A, TRAIN_B = "both", "A", "B"

REGISTRY: dict[str, type["Strategy"]] = {}


@dataclass(frozen=True)
class Factors:
    """One module's LoRA pair at its rank."""

    A: torch.Tensor  # r x d_in
    B: torch.Tensor  # d_out x r
    alpha: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The update this pair adds to the frozen weight: s * B @ A (d_out x d_in)."""
        return self.scale * (self.B @ self.A)


@dataclass
class ClientInfo:
    """What the coordinator knows of a client when it plans a round."""

    client: str
    rank: int
    alpha: float
    blocks: frozenset[int] | None = None  # blocks whose LoRA the client trains; None: all
    num_samples: int = 1


@dataclass
class Upload:
    """One client's contribution to a round."""

    client: str
    factors: dict[str, Factors]  # only the modules it trained
    num_samples: int
    rank: int
    blocks: frozenset[int] | None = None
    head: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Download:
    """What one client starts a round from.

    ``A`` / ``B`` hold the factors to load, at the client's rank; a module or a
    factor that is absent keeps the client's own value (FedSA-LoRA's local B).
    ``fresh`` re-initialises the client's LoRA (A random from the round's seed,
    B = 0) before anything is loaded (FLoRA). ``options`` carries the client
    half of a method's settings (HetLoRA's rank regulariser); the client runs
    that half itself.
    """

    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    rank: int
    alpha: float
    trainable: str = TRAIN_BOTH  # which factors the client trains: "both", "A" or "B"
    fresh: bool = False
    options: dict = field(default_factory=dict)
    head: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class GlobalModel:
    """The global LoRA as one whole-model adapter at ``rank``: factors of every
    module the strategy keeps a global value for, and the shared head. A factor
    a method keeps on the clients (FedSA-LoRA's B) is absent; the adapter
    written from it holds zeros there."""

    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    rank: int
    alpha: float
    head: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class RoundResult:
    """Output of one aggregation: the new state and any update to fold into
    the frozen weights (module -> d_out x d_in)."""

    state: dict
    base_deltas: dict[str, torch.Tensor] = field(default_factory=dict)


class StrategyError(ValueError):
    """A strategy cannot handle what it was given (the message names one that can)."""


def methods_with(capability: str) -> list[str]:
    """Registered method names whose class sets ``capability`` (an attribute
    such as ``heterogeneous_ranks`` or ``block_subsets``), sorted."""
    return sorted(name for name, cls in REGISTRY.items() if getattr(cls, capability))


class Strategy(ABC):
    """One aggregation method.

    Every strategy takes ``seed`` (the coordinator passes the run's ``--seed``);
    methods that draw nothing keep it only for a uniform constructor.
    """

    name: ClassVar[str] = ""
    heterogeneous_ranks: ClassVar[bool] = False  # clients may train different ranks
    block_subsets: ClassVar[bool] = False  # clients may train different block sets
    mixed_alphas: ClassVar[bool] = False  # clients may train with different alphas (each upload keeps its own scale)
    frozen_updates: ClassVar[bool] = False  # aggregate may return base_deltas (folded into the frozen weights)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
                raise TypeError(f"two strategies are called {cls.name!r}")
            REGISTRY[cls.name] = cls

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def check(self, clients: list[ClientInfo]) -> None:
        """Refuse client sets the method does not define, naming methods that do."""
        if not self.heterogeneous_ranks and len({c.rank for c in clients}) > 1:
            raise StrategyError(
                f"{self.name} needs one LoRA rank for every client (got ranks "
                f"{sorted({c.rank for c in clients})}); use {', '.join(methods_with('heterogeneous_ranks'))} "
                "for mixed ranks")
        if not self.block_subsets and any(c.blocks is not None for c in clients):
            self.refuse_block_subsets("every client must train every block")

    def refuse_block_subsets(self, what: str) -> None:
        """Raise the error for a block subset this method cannot take."""
        raise StrategyError(f"{self.name}: {what}; use {', '.join(methods_with('block_subsets'))} "
                            "(FedRA, Fed-piLot layer allocation) for clients that train block subsets")

    @abstractmethod
    def init_state(self, initial: dict[str, Factors], clients: list[ClientInfo]) -> dict:
        """The state before round 0, from the initial global LoRA (at the largest rank)."""

    @abstractmethod
    def download(self, state: dict, client: ClientInfo, round_index: int) -> Download:
        """What ``client`` starts round ``round_index`` from."""

    @abstractmethod
    def aggregate(self, state: dict, uploads: list[Upload], round_index: int) -> RoundResult:
        """Combine one round's uploads."""

    @abstractmethod
    def export(self, state: dict) -> GlobalModel:
        """The global model the state stands for, for checkpoints: the LoRA a
        client holding every block at the run's largest rank would use, with
        zeros where a method keeps a factor on the clients."""
