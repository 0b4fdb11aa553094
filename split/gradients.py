"""Squared gradients per block: the Fisher score of layer allocation.

The diagonal of the empirical Fisher information of a parameter is the mean
of its squared gradient; summed over a block's LoRA parameters it says how
much the loss moves with that block (docs/algorithms.md#allocation). Both
sides measure it for the blocks they train: the client for its own blocks
during its round, the server for its blocks during that client's backward
steps; only the blocks that train have gradients to measure.
"""

from __future__ import annotations

import torch

from .families import block_of
from .lora import lora_layers


def lora_blocks(model, adapter: str = "default", modules=None) -> dict[int, int]:
    """``id`` of each LoRA parameter of ``modules`` (None: all) that lies in a
    block -> that block."""
    out = {}
    for name, layer in lora_layers(model, adapter).items():
        block = block_of(name)
        if block is not None and (modules is None or name in modules):
            for p in (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight):
                out[id(p)] = block
    return out


class BlockGradients:
    """Sums of squared gradients per block over a round's steps."""

    def __init__(self, blocks: dict[int, int]):
        self.blocks = blocks  # id(parameter) -> block
        self.sums: dict[int, float] = {}
        self.steps = 0

    def add(self, param: torch.Tensor, grad: torch.Tensor | None) -> None:
        """Count one gradient of ``param`` (ignored outside the blocks or when None)."""
        block = self.blocks.get(id(param))
        if block is not None and grad is not None:
            self.sums[block] = self.sums.get(block, 0.0) + float(grad.detach().float().pow(2).sum())

    def step(self) -> None:
        """Close one training step."""
        self.steps += 1

    def record(self, params, grads) -> None:
        """One step's gradients of ``params``, in order."""
        for p, g in zip(params, grads):
            self.add(p, g)
        self.step()

    def scores(self) -> dict[int, float]:
        """Per block, the sum of its squared gradients per step (empty before any step)."""
        if not self.steps:
            return {}
        return {b: s / self.steps for b, s in sorted(self.sums.items())}

    def hook(self, params) -> list:
        """Count every gradient autograd computes for ``params`` (their
        backward hooks); returns the handles to remove."""
        return [p.register_hook(lambda g, p=p: self.add(p, g)) for p in params if id(p) in self.blocks]
