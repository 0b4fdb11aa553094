"""Tensor codecs: how a tensor's values become the bytes of one wire frame.

A codec is named in each tensor's header entry, so lossy codecs plug in beside
the lossless one without changing the message format.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

# Dtypes a header may name; anything else is refused before any byte is read.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class RawCodec:
    """Lossless: the tensor's own bytes, little-endian, row-major (fp32 hidden
    states travel as fp32)."""

    name: str = "raw"

    def nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        numel = 1
        for d in shape:
            numel *= d
        return numel * torch.empty((), dtype=dtype).element_size()

    def encode(self, tensor: torch.Tensor) -> memoryview:
        """The tensor's bytes: a zero-copy view of a contiguous CPU tensor; a
        tensor on an accelerator is copied to the CPU first."""
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        return memoryview(flat.view(torch.uint8).numpy())

    def decode(self, buffer, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor holding the received bytes, copied into torch's own memory:
        a frame's buffer is read-only and may be unaligned, and matrix kernels
        round differently on unaligned input, which would break bit-exactness."""
        if len(buffer) == 0:
            return torch.empty(shape, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only buffer: copied at once
            return torch.frombuffer(buffer, dtype=dtype).reshape(shape).clone()


CODECS = {"raw": RawCodec()}


def get_codec(name: str):
    """The codec called ``name`` (KeyError lists the known ones)."""
    try:
        return CODECS[name]
    except KeyError:
        raise KeyError(f"unknown codec {name!r}; known: {sorted(CODECS)}") from None
