"""How a federation's LoRA factors and head cross the wire each round.

The server picks one codec for downloads (its round offers) and one for
uploads (``fedsplit server --adapter-down/--adapter-up``) and announces both
in the federation settings:

- ``fp32``: lossless, the default;
- ``fp16``: every factor and head tensor travels in fp16; the receiver
  computes in fp32 with what it decoded;
- ``topk:density=D``: FLASC-style sparsity. A download carries each tensor's
  largest D of entries (the rest are zeros; the client trains the dense LoRA
  from there). An upload carries, per tensor, the top D of the client's update
  ``local - received`` plus the residual its earlier uploads left out (error
  feedback); the server adds the update back onto what that client received,
  so the strategy sees whole factors.

This module holds the pure parts both sides share: the codec names a
federation takes and the slicing of a received tensor to an upload's rank.
docs/adapter-compression.md has the rules and their reasons.
"""

from __future__ import annotations

import torch

from .codecs import CodecSpec, parse_codec

ADAPTER_CODECS = ("fp32", "fp16", "topk")
MAX_SPEC_TEXT = 64  # a spec's text from the network: "topk:density=0.0625" is 19 characters
USAGE = "fp32, fp16 or topk:density=D with 0 < D <= 1"


def parse_adapter_codec(text: str, what: str = "adapter codec") -> CodecSpec:
    """The spec of ``text`` when a federation's adapters may travel in it;
    ValueError naming ``what`` (a flag, a settings field) and the choices."""
    if not isinstance(text, str) or len(text) > MAX_SPEC_TEXT:
        raise ValueError(f"{what} must be {USAGE}, as a string of at most {MAX_SPEC_TEXT} characters")
    try:
        spec = parse_codec(text)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}; adapters take {USAGE}") from None
    if spec.name not in ADAPTER_CODECS:
        raise ValueError(f"{what}: adapters travel as {USAGE}, not {spec.text} (that codec is for hidden states "
                         "and gradients: --codec-up/--codec-down)")
    if spec.name == "topk" and spec.params != (("density", spec.param("density")),):
        raise ValueError(f"{what}: adapters take topk:density=D only ({spec.text}); their uploads always keep "
                         "an error-feedback residual")
    return spec


def delta_coded(spec: CodecSpec) -> bool:
    """Whether uploads in ``spec`` carry the update against what the client
    received (top-k) rather than the whole tensors."""
    return spec.name == "topk"


def rank_slice(received: torch.Tensor, shape: tuple[int, ...], kind: str) -> torch.Tensor:
    """The part of a received tensor that an upload of ``shape`` updates: the
    first rows of an A (rank x d_in), the first columns of a B (d_out x rank),
    all of a head tensor. A client may upload a smaller rank than it received
    (HetLoRA prunes), never a larger one or another width; ValueError then."""
    shape = tuple(shape)
    have = tuple(received.shape)
    if kind == "A" and len(shape) == 2 and len(have) == 2 and shape[1] == have[1] and shape[0] <= have[0]:
        return received[:shape[0]]
    if kind == "B" and len(shape) == 2 and len(have) == 2 and shape[0] == have[0] and shape[1] <= have[1]:
        return received[:, :shape[1]]
    if kind == "head" and shape == have:
        return received
    raise ValueError(f"an update of shape {list(shape)} does not fit the received {kind} of shape {list(have)}")


def update(local: torch.Tensor, received: torch.Tensor, kind: str) -> torch.Tensor:
    """What a round changed of a tensor: ``local`` minus the received part it grew from."""
    return local - rank_slice(received, tuple(local.shape), kind)


def rebuild(received: torch.Tensor, delta: torch.Tensor, kind: str) -> torch.Tensor:
    """The client's tensor as the server reconstructs it: received part plus the decoded update."""
    return rank_slice(received, tuple(delta.shape), kind) + delta
