"""HetLoRA's client half (docs/algorithms.md#hetlora): the rank regulariser
added to the local loss, and self-pruning at the end of a round.

The server sends only the options (``hetlora_lambda``, ``hetlora_gamma``) in a
round's download; the math runs here, on the client that trains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

OPTION_LAMBDA, OPTION_GAMMA = "hetlora_lambda", "hetlora_gamma"


@dataclass(frozen=True)
class HetLoRAOptions:
    """The regulariser's weight lambda (>= 0) and decay gamma (in (0, 1))."""

    lam: float
    gamma: float

    def __post_init__(self):
        if not self.lam >= 0.0:
            raise ValueError(f"hetlora: lambda must be non-negative, got {self.lam}")
        if not 0.0 < self.gamma < 1.0:
            raise ValueError(f"hetlora: gamma must lie in (0, 1), got {self.gamma}")

    @classmethod
    def from_options(cls, options: dict) -> "HetLoRAOptions | None":
        """The options of a round's download, or None when the method is not HetLoRA."""
        if OPTION_LAMBDA not in options and OPTION_GAMMA not in options:
            return None
        try:
            return cls(float(options[OPTION_LAMBDA]), float(options[OPTION_GAMMA]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"the server sent unusable HetLoRA options {options!r}: {exc}") from None


def tail_start(rank: int, gamma: float) -> int:
    """floor(gamma * rank): the first rank slot of the tail that the penalty shrinks.

    A tiny tolerance keeps floating error from flooring an exact product one
    too low (0.29 * 100 is 28.999...), and the tail always keeps at least one
    slot."""
    if not 0.0 < float(gamma) < 1.0:
        raise ValueError(f"hetlora: gamma must lie in (0, 1), got {gamma}")
    if rank < 1:
        raise ValueError(f"hetlora: rank must be at least 1, got {rank}")
    return min(int(math.floor(float(gamma) * rank + 1e-9)), rank - 1)


def rank_penalty(A: torch.Tensor, B: torch.Tensor, rank: int, gamma: float) -> torch.Tensor:
    """HetLoRA's rank regulariser ||B[:, t:r]||_F * ||A[t:r, :]||_F with t = floor(gamma r).

    Differentiable in A and B (only their tail slots get a gradient); the
    client adds ``lambda * rank_penalty(...)`` to its loss. At B = 0 the
    gradient is zero, not NaN (torch takes the zero subgradient of the norm).
    """
    if A.dim() != 2 or B.dim() != 2:
        raise ValueError(f"hetlora: expected A r x d_in and B d_out x r, got {tuple(A.shape)} and {tuple(B.shape)}")
    if rank > A.shape[0] or rank > B.shape[1]:
        raise ValueError(f"hetlora: rank {rank} exceeds the factors' rank (A {tuple(A.shape)}, B {tuple(B.shape)})")
    t = tail_start(rank, gamma)
    return torch.linalg.matrix_norm(B[:, t:rank]) * torch.linalg.matrix_norm(A[t:rank, :])


def pruned_rank(rank: int, gamma: float, norm_before: float, norm_after: float) -> int:
    """The client's rank after a round of self-pruning.

    ``norm_before`` / ``norm_after`` are ``rank_penalty`` (without lambda) at the
    start and at the end of local training. If the tail-norm product shrank,
    the tail is dropped: floor(gamma * rank), never below 1; otherwise the rank
    stays. It never grows."""
    if float(norm_after) < float(norm_before):
        return max(1, tail_start(rank, gamma))
    return rank


class RankRegulariser:
    """HetLoRA on one client's LoRA layers for one round: ``penalty()`` for the
    loss, then ``prune()`` once local training is over."""

    def __init__(self, layers: dict, options: HetLoRAOptions, rank: int, adapter: str = "default"):
        self.layers = layers  # module name -> peft LoRA layer
        self.options = options
        self.rank = rank
        self.adapter = adapter
        with torch.no_grad():
            self.before = float(self.tail_norms())

    def tail_norms(self) -> torch.Tensor:
        """The regulariser over every layer, without lambda."""
        a = self.adapter
        return sum(rank_penalty(layer.lora_A[a].weight, layer.lora_B[a].weight, self.rank, self.options.gamma)
                   for layer in self.layers.values())

    def penalty(self) -> torch.Tensor:
        """lambda times the regulariser: what the client adds to its loss."""
        return self.options.lam * self.tail_norms()

    def prune(self) -> int:
        """Self-pruning: drop the tail if local training shrank it; returns the
        rank after the round. Zeroed tails of both factors get zero gradients,
        so they stay dropped."""
        with torch.no_grad():
            rank = pruned_rank(self.rank, self.options.gamma, self.before, float(self.tail_norms()))
            if rank < self.rank:
                for layer in self.layers.values():
                    layer.lora_A[self.adapter].weight[rank:].zero_()
                    layer.lora_B[self.adapter].weight[:, rank:].zero_()
        return rank
