"""Folding a standard-orientation update (d_out x d_in) into a layer's own weight.

Strategies return ``base_deltas`` as d_out x d_in. ``nn.Linear`` stores its
weight that way; GPT-2's ``Conv1D`` stores it transposed (d_in x d_out), which
PEFT marks with ``fan_in_fan_out=True``. Adding the delta without honouring
that flag is the fedex-lora bug (fedlora-algorithms.md, section 7): it adds Rᵀ
to square nn.Linear weights, which fits the shape and is silently wrong.
"""

from __future__ import annotations

import torch


def native_delta(delta: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """``delta`` (d_out x d_in) in the layer's own orientation: transposed for
    Conv1D-style weights stored in x out (PEFT's ``fan_in_fan_out``), as is for
    ``nn.Linear``."""
    return delta.T if fan_in_fan_out else delta


def fold_into(weight: torch.Tensor, delta: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """Add ``delta`` (d_out x d_in) to ``weight`` in place, in the weight's own
    orientation, dtype and device; returns ``weight``. ``delta`` is not changed."""
    native = native_delta(delta, fan_in_fan_out)
    if tuple(native.shape) != tuple(weight.shape):
        raise ValueError(
            f"cannot fold a delta of shape {tuple(delta.shape)} (d_out x d_in) into a weight of shape "
            f"{tuple(weight.shape)} with fan_in_fan_out={fan_in_fan_out}")
    with torch.no_grad():
        weight.add_(native.to(dtype=weight.dtype, device=weight.device))
    return weight
