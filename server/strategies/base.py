"""The interface every aggregation strategy implements.

A strategy is pure: it receives the uploads of one round (LoRA factors keyed by
whole-model module name, each client's rank, block set and sample count) and its
own state, and returns the new state, what each client downloads next, and any
change to the frozen weights. It does no I/O and never touches a model.

Conventions (../shared/reference/fedlora-algorithms.md):

- A is ``lora_A`` (r x d_in), B is ``lora_B`` (d_out x r), the update is
  ``s * B @ A`` with ``s = alpha / r``.
- ``base_deltas`` are in the standard orientation (d_out x d_in); folding them
  into a layer's own weight (Conv1D stores in x out) is the caller's job.
- Module names are whole-model names without the peft prefix, e.g.
  ``bert.encoder.layer.3.attention.self.query``; a module's block index is
  ``block_of(name)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch


TRAIN_BOTH, TRAIN_A, TRAIN_B = "both", "A", "B"


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
    layers: frozenset[int] | None = None  # None: every block the client's LoRA covers
    num_samples: int = 1


@dataclass
class Upload:
    """One client's contribution to a round."""

    client: str
    factors: dict[str, Factors]  # only the modules it trained
    num_samples: int
    rank: int
    layers: frozenset[int] | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # non-LoRA trainables (a head)


@dataclass
class Download:
    """What one client starts a round from.

    ``A`` / ``B`` hold the factors to load, at the client's rank; a module or a
    factor that is absent keeps the client's own value (FedSA-LoRA's local B).
    ``fresh`` re-initialises the client's LoRA (A random from the round's seed,
    B = 0) before anything is loaded (FLoRA). ``options`` carries client-side
    training settings of the method (HetLoRA's rank regulariser).
    """

    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    rank: int
    alpha: float
    trainable: str = TRAIN_BOTH  # which factors the client trains: "both", "A" or "B"
    fresh: bool = False
    options: dict = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class RoundResult:
    """Output of one aggregation: the new state and any update to fold into
    the frozen weights (module -> d_out x d_in)."""

    state: dict
    base_deltas: dict[str, torch.Tensor] = field(default_factory=dict)


class StrategyError(ValueError):
    """A strategy cannot handle what it was given (the message names one that can)."""


def weights(uploads: list[Upload]) -> list[float]:
    """Sample-count weights p_k = n_k / sum n_j."""
    total = sum(u.num_samples for u in uploads)
    if total <= 0:
        raise StrategyError("uploads carry no samples: every num_samples is 0")
    return [u.num_samples / total for u in uploads]




def average_extra(uploads: list[Upload]) -> dict[str, torch.Tensor]:
    """Sample-weighted mean of the non-LoRA trainables (a classification head)."""
    names = set().union(*(u.extra for u in uploads)) if uploads else set()
    out = {}
    for name in names:
        have = [u for u in uploads if name in u.extra]
        w = weights(have)
        out[name] = sum(wk * u.extra[name] for wk, u in zip(w, have))
    return out


class Strategy(ABC):
    """One aggregation method."""

    name: str = ""
    heterogeneous_ranks: bool = False  # clients may train different ranks
    layer_subsets: bool = False  # clients may train different block sets

    def check(self, clients: list[ClientInfo]) -> None:
        """Refuse client sets the method does not define, naming methods that do."""
        if not self.heterogeneous_ranks and len({c.rank for c in clients}) > 1:
            raise StrategyError(
                f"{self.name} needs one LoRA rank for every client (got ranks "
                f"{sorted({c.rank for c in clients})}); use hetlora, flexlora, flora or rbla for mixed ranks")
        if not self.layer_subsets and any(c.layers is not None for c in clients):
            raise StrategyError(
                f"{self.name} needs every client to train every block; use layermean (FedRA, Fed-piLot), "
                "hetlora, rbla or fedinc for clients with layer subsets")

    @abstractmethod
    def init_state(self, initial: dict[str, Factors], clients: list[ClientInfo]) -> dict:
        """The state before round 0, from the initial global LoRA (at the largest rank)."""

    @abstractmethod
    def download(self, state: dict, client: ClientInfo, round_index: int) -> Download:
        """What ``client`` starts round ``round_index`` from."""

    @abstractmethod
    def aggregate(self, state: dict, uploads: list[Upload], round_index: int) -> RoundResult:
        """Combine one round's uploads."""
