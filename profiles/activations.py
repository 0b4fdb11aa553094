"""What autograd keeps for backward in a fedsplit client's blocks and head.

Pure functions of a ``ModelShape`` and the batch: bytes, no tensors. The counts
follow the ops of each architecture as transformers runs them, with the frozen
weights of a LoRA model: a frozen linear saves no activation (its input
gradient needs only its weight), so what a block keeps is its norms' inputs,
the attention kernel's tensors, the MLP activation's input(s), dropout masks,
and, where its LoRA trains, each LoRA input (``x``, and ``A x`` of width r).

Attention: with attention dropout on (training), PyTorch's CPU SDPA takes its
math path, which keeps q, k, v and three heads x S x S tensors (softmax, dropout
mask, dropout output); without, its flash kernel keeps q, k, v (keys and values
repeated to every head when a padding mask is passed), the output, the
log-sum-exp and the additive mask. fedsplit pads each batch to its longest
sample, so the mask is counted.

``tests/test_cost_model.py`` checks these counts against the tensors autograd
saves on tiny models of each architecture.
"""

from __future__ import annotations

from .shape import ModelShape

FP32 = 4


def _math_attention(shape: ModelShape) -> bool:
    return shape.attention_dropout > 0.0


def norm_input(shape: ModelShape) -> int:
    """Elements per token a pre-norm keeps (its input and per-token statistics)."""
    return shape.hidden + (2 if shape.architecture == "gpt2" else 1)


def attention_per_token(shape: ModelShape, seq_len: int) -> tuple[int, int]:
    """(elements in the compute dtype, fp32 elements) the attention kernel keeps per token."""
    d, h, aw = shape.hidden, shape.heads, shape.attention_width
    if _math_attention(shape):
        return 3 * aw + 3 * h * seq_len, 0
    if shape.architecture == "gpt2":
        # q, k, v are views of the fused projection's output (3 d), plus contiguous
        # copies of two of them and the output.
        return 6 * d, h + seq_len
    # q, k and v (repeated to every head) and the output; log-sum-exp and mask in fp32.
    return 4 * aw, h + seq_len


def block_per_token(shape: ModelShape, seq_len: int, lowest: bool) -> tuple[int, int]:
    """(compute-dtype elements, fp32 elements) one block keeps per token when
    gradients flow through it, its own LoRA inputs aside. ``lowest``: nothing
    below it requires grad, so its input norm keeps nothing (pre-norm blocks)."""
    d, m = shape.hidden, shape.intermediate
    attn, attn32 = attention_per_token(shape, seq_len)
    masks = 2 * d if shape.hidden_dropout > 0.0 else 0
    arch = shape.architecture
    if arch == "encoder":
        # post-LN: attention, dropout mask, LayerNorm input (+ mean, rstd), GELU
        # input, dropout mask, LayerNorm input (+ mean, rstd).
        return attn + masks + 2 * d + m, attn32 + 4
    pre = 0 if lowest else norm_input(shape)
    if arch == "gpt2":
        # pre-LN; gelu_new keeps four m-wide tensors (pow, tanh and two products).
        return pre + attn + masks + (d + 2) + 4 * m, attn32
    if arch == "gated":
        # pre-RMSNorm; SwiGLU keeps the gate's input, the activation and the up projection.
        return pre + attn + masks + (d + 1) + 3 * m, attn32
    raise ValueError(f"unknown architecture {arch!r}")


def lora_per_token(shape: ModelShape, rank: int) -> int:
    """fp32 elements per token a block's trained LoRA keeps: its input (shared by
    the targets that read the same tensor) and each ``A x``."""
    inputs = {d_in for _, _, d_in in shape.lora_targets}
    return sum(inputs) + rank * len(shape.lora_targets)


def head_bytes(shape: ModelShape, batch: int, seq_len: int, elem: int) -> int:
    """Bytes the final norm, pooler, head and loss keep (U-shaped split: on the client)."""
    d, tokens = shape.hidden, batch * seq_len
    if shape.task == "causal-lm":
        # The logits, upcast to fp32 for the loss, and log-softmax's output.
        return norm_input(shape) * tokens * elem + 2 * tokens * shape.vocab * FP32
    if shape.architecture == "encoder":
        # Pooler on the first token: tanh output, dropout mask, the classifier's input.
        per_sample = d * (3 if shape.hidden_dropout > 0.0 else 2)
        return batch * per_sample * elem + batch * shape.num_labels * FP32 * 2
    # Decoders score every token, then pick each sequence's last one.
    return (norm_input(shape) * tokens * elem + tokens * d * FP32
            + tokens * shape.num_labels * FP32 + batch * shape.num_labels * FP32 * 2)


def backward_transient_per_token(shape: ModelShape, seq_len: int) -> int:
    """Compute-dtype elements per token alive beyond the saved ones while one
    block runs backward: the gradients flowing through it (attention
    probabilities and their input under the math path, the MLP's, the hidden
    state's)."""
    d, m, h = shape.hidden, shape.intermediate, shape.heads
    attention = 2 * h * seq_len if _math_attention(shape) else 4 * shape.attention_width
    return attention + 2 * m + 4 * d
