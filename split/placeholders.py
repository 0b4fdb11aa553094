"""What stands in, on one side of the split, for the modules the other side owns.

Both sides run the transformers model's own forward; these placeholders make
the foreign part of it a no-op: a block the side does not run passes its input
through, an embedding on the server yields zeros (the client's hidden state
enters at the first block the server runs), and a head held by the other side
refuses to be called.
"""

from __future__ import annotations

import torch
from torch import nn


class Passthrough(nn.Module):
    """Stands for a block this side does not run: returns its input unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class ZeroEmbedding(nn.Module):
    """Stands for an embedding on the server: zeros of shape (*ids, width), in
    the segment's dtype and on the ids' device, whatever the call signature
    (GPT-2 positions take ids, OPT's take the mask and an offset, BERT's
    embeddings take keywords)."""

    def __init__(self, width: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.width = width
        # An empty buffer follows the module through .to(dtype / device).
        self.register_buffer("like", torch.empty(0, dtype=dtype), persistent=False)

    def forward(self, *args, **kwargs):
        ids = _first_tensor(args, kwargs)
        shape = ids.shape[:-1] if ids.is_floating_point() else ids.shape
        return torch.zeros(*shape, self.width, dtype=self.like.dtype, device=ids.device)


def _first_tensor(args, kwargs) -> torch.Tensor:
    """The tensor an embedding call is shaped by: ``input_ids`` or the first tensor given."""
    if isinstance(kwargs.get("input_ids"), torch.Tensor):
        return kwargs["input_ids"]
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise RuntimeError("an embedding placeholder was called without a tensor to take its shape from")


class Injected(ZeroEmbedding):
    """Stands for the token embedding on the server. The hidden state received
    from the client enters at the input of the first block the server runs
    (``enter_block``, a forward pre-hook on each hosted block), so whatever a
    model does between its embedding and its blocks (scaling, added positions,
    projections, normalisation) is done once, on the client."""

    def __init__(self, width: int, dtype: torch.dtype = torch.float32):
        super().__init__(width, dtype)
        self.value: torch.Tensor | None = None
        self.armed = False

    def forward(self, *args, **kwargs):
        # Called once at the start of every forward: the next block takes the value.
        self.armed = True
        return super().forward(*args, **kwargs)

    def enter_block(self, module, args, kwargs):
        """Forward pre-hook: replace the first running block's hidden-state input."""
        if not self.armed:
            return None
        self.armed = False
        if self.value is None:
            raise RuntimeError("no hidden state was injected before the server forward")
        if args:
            return (self.value, *args[1:]), kwargs
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": self.value}
        raise RuntimeError(f"{type(module).__name__} was called without a hidden-state argument to replace")


class Absent(nn.Module):
    """Stands for a head this side does not hold; calling it is a bug."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{self.what} is held by the other side of the split")
