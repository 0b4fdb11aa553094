"""What quantized frozen weights (``split/quant.py``) cost a client: bytes
held, bytes kept for backward, bytes alive for a moment.

Pure functions of layer shapes and a ``ModelShape``. The figures follow
bitsandbytes' layouts and its CPU autograd functions, as fedsplit uses them:

- 8 bits (``Linear8bitLt``): one int8 per weight and one float32 absmax per
  output row. Its training matmul keeps its input for backward, which a
  frozen ``nn.Linear`` does not: per token, the MLP's input (d) and the down
  projection's input (the MLP width m), and where the q/k/v input is not
  already kept by a trained LoRA (in float32; a half-precision LoRA keeps its
  own float32 copy) that input too (d). The attention output the output
  projection reads is kept by attention already.
- 4 bits (``Linear4bit``, NF4, double quantization): half a byte per weight,
  one uint8 scale per block of 64 weights, one float32 scale per 256 of those
  and the two codebooks (256 float32 and 16 float32 values) and an offset.
  Its matmul keeps nothing but the packed weight.
- The token embedding, where ``--quantize`` holds it quantized (a frozen
  lookup: not tied to a head the client computes): int8 rows with a float32
  absmax per row, or NF4 with float32 block scales (bitsandbytes' embedding
  has no double quantization). It is read whole, as the checkpoint stores
  it, before it is quantized: the first moment of the loading peak.
- Both dequantize a layer's weight into the compute dtype for every matrix
  product, forward and backward: the largest layer's dequantized copy is alive
  for a moment beside the gradients of the block running backward.

``tests/test_quant.py`` checks the bytes against the tensors bitsandbytes
holds, and ``bench/client_memory.py`` the whole prediction against measured
client peaks.
"""

from __future__ import annotations

import math

from split.quant import DOUBLE_QUANT, NF4_BLOCK

UNQUANTIZED = ("float32", "bfloat16", "float16")
QUANTIZED = ("8bit", "4bit")
WEIGHTS = ("float32", "bfloat16", "8bit", "4bit")  # a plan's choices (float16 follows --dtype float16)
FP32 = 4
NESTED_BLOCK = 256  # NF4 block scales per float32 scale of theirs (double quantization)
NF4_CODE = 16  # values of the NF4 codebook (float32)
INT8_CODE = 256  # values of the 8-bit codebook of the block scales (float32)


def quantized_linear_bytes(d_out: int, d_in: int, weights: str) -> int:
    """Bytes bitsandbytes holds for one d_out x d_in weight in ``weights``
    ("8bit" or "4bit"), scales and codebooks included (no bias)."""
    n = d_out * d_in
    if weights == "8bit":
        return n + FP32 * d_out
    if weights == "4bit":
        blocks = math.ceil(n / NF4_BLOCK)
        if not DOUBLE_QUANT:
            return math.ceil(n / 2) + FP32 * blocks + FP32 * NF4_CODE
        nested = math.ceil(blocks / NESTED_BLOCK)
        return math.ceil(n / 2) + blocks + FP32 * nested + FP32 * INT8_CODE + FP32 * NF4_CODE + FP32
    raise ValueError(f"weights {weights!r} are not quantized: use one of {', '.join(QUANTIZED)}")


def quantized_embedding_bytes(rows: int, width: int, weights: str) -> int:
    """Bytes bitsandbytes holds for a rows x width token embedding in
    ``weights`` ("8bit" or "4bit"; ``split/quant_embedding.py``): int8 rows and
    a float32 absmax per row, or NF4 with float32 block scales (no double
    quantization) and the 16-value codebook."""
    n = rows * width
    if weights == "8bit":
        return n + FP32 * rows
    if weights == "4bit":
        return math.ceil(n / 2) + FP32 * math.ceil(n / NF4_BLOCK) + FP32 * NF4_CODE
    raise ValueError(f"weights {weights!r} are not quantized: use one of {', '.join(QUANTIZED)}")


def block_linear_params(linears: tuple[tuple[int, int], ...]) -> int:
    """Weights (elements) of a block's linear layers, biases aside."""
    return sum(d_out * d_in for d_out, d_in in linears)


def block_quantized_bytes(linears: tuple[tuple[int, int], ...], weights: str) -> int:
    """Bytes of a block's linear weights quantized to ``weights``."""
    return sum(quantized_linear_bytes(d_out, d_in, weights) for d_out, d_in in linears)


def int8_inputs_per_token(hidden: int, intermediate: int, lowest: bool, lora_trained: bool, half: bool) -> int:
    """Compute-dtype elements per token that a block's 8-bit layers keep for
    backward beyond what the block keeps anyway, when gradients flow through
    it (module docstring). ``lowest``: nothing below requires grad, so the
    q/k/v input records nothing."""
    kept = hidden + intermediate
    if not lowest and (half or not lora_trained):
        kept += hidden
    return kept


def dequantized_bytes(linears: tuple[tuple[int, int], ...], elem: int) -> int:
    """Bytes of the largest of ``linears`` dequantized into the compute dtype."""
    return max((d_out * d_in for d_out, d_in in linears), default=0) * elem
