"""The client's two segments as standalone torch modules, ready for ONNX export.

A client model (``split.partition``, LoRA merged) holds the embeddings, the
first K1 blocks, the last K2 blocks, the final norm and the head; the server's
blocks are placeholders. Both segments still run the transformers model's own
forward, so masks, positions and pooling are the library's:

- the front makes every block from K1 on a passthrough and the final norm an
  identity: its output is the hidden state entering block K1, exactly what the
  client sends the server;
- the back makes every block before L - K2 a passthrough and its embeddings
  placeholders whose sum is the hidden state it is given: the server's output
  enters block L - K2. It still takes the token ids, because a decoder's
  classification head finds each sequence's last token by its padding.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from split.families import Family, get_module, set_module
from split.partition import Cut
from split.placeholders import Passthrough, ZeroEmbedding


class Given(nn.Module):
    """Stands for the token embedding in the back segment: returns the hidden
    state the segment was called with (``BackSegment`` sets it per call)."""

    def __init__(self):
        super().__init__()
        self.value: torch.Tensor | None = None

    def forward(self, *args, **kwargs):
        if self.value is None:
            raise RuntimeError("the back segment's embedding was called outside BackSegment.forward")
        return self.value


class FrontSegment(nn.Module):
    """Token ids (+ mask, + positions for rotary families) -> the hidden state at the cut."""

    def __init__(self, base: nn.Module, rotary: bool):
        super().__init__()
        self.base = base
        self.rotary = rotary

    def input_names(self) -> tuple[str, ...]:
        return ("input_ids", "attention_mask", "position_ids") if self.rotary else ("input_ids", "attention_mask")

    def forward(self, input_ids, attention_mask, position_ids=None):
        extra = {"position_ids": position_ids} if self.rotary else {}
        return self.base(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state


class BackSegment(nn.Module):
    """The server's hidden state (+ mask, ids, positions) -> the head's logits."""

    def __init__(self, model: nn.Module, given: Given, rotary: bool):
        super().__init__()
        self.model = model
        self.given = given
        self.rotary = rotary

    def input_names(self) -> tuple[str, ...]:
        names = ("hidden", "attention_mask", "input_ids")
        return (*names, "position_ids") if self.rotary else names

    def forward(self, hidden, attention_mask, input_ids, position_ids=None):
        extra = {"position_ids": position_ids} if self.rotary else {}
        self.given.value = hidden
        try:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits
        finally:
            self.given.value = None


def share_clone(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree that shares its parameters and
    buffers: swapping modules in the copy leaves ``model`` whole, and no weight
    is held twice."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def front_segment(model: nn.Module, family: Family, cut: Cut, num_layers: int) -> FrontSegment:
    """The front of a client model (``model``: the task model, LoRA merged)."""
    clone = share_clone(model)
    base = get_module(clone, family.prefix)
    blocks = get_module(base, family.blocks)
    for i in range(cut.front, num_layers):
        blocks[i] = Passthrough()
    if family.norm:
        set_module(base, family.norm, nn.Identity())
    for part in family.base_head:
        if _has(base, part):
            set_module(base, part, None)
    return FrontSegment(base, family.rotary).eval()


def back_segment(model: nn.Module, family: Family, cut: Cut, num_layers: int, width: int) -> BackSegment:
    """The back of a client model (``model``: the task model, LoRA merged)."""
    clone = share_clone(model)
    base = get_module(clone, family.prefix)
    blocks = get_module(base, family.blocks)
    for i in range(num_layers - cut.back):
        blocks[i] = Passthrough()
    given = Given()
    set_module(base, family.embeddings[0], given)
    for emb in family.embeddings[1:]:
        set_module(base, emb, ZeroEmbedding(width))
    for extra in family.embed_extras:
        if _has(base, extra):
            set_module(base, extra, nn.Identity())
    return BackSegment(clone, given, family.rotary).eval()


def _has(root: nn.Module, path: str) -> bool:
    try:
        return get_module(root, path) is not None
    except (AttributeError, IndexError):
        return False


def sample_inputs(segment: FrontSegment | BackSegment, batch: int, length: int, vocab: int, width: int,
                  pad_id: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs for ``segment`` in its ``input_names`` order: random ids, a
    right-padded mask (the last row shorter), positions 0..length-1 and, for
    the back, a random hidden state."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1 and length > 1:
        mask[-1, length // 2 + 1:] = 0
    ids = torch.randint(min(3, vocab - 1), vocab, (batch, length), generator=gen).masked_fill(mask == 0, pad_id)
    values = {"input_ids": ids, "attention_mask": mask,
              "position_ids": torch.arange(length).expand(batch, length).contiguous(),
              "hidden": torch.randn(batch, length, width, generator=gen)}
    return tuple(values[name] for name in segment.input_names())

