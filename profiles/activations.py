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
        # input, dropout mask, LayerNorm input (+ mean, rstd). In the lowest
        # block the keys need no gradient, so the math path does not keep q.
        if lowest and _math_attention(shape):
            attn -= shape.attention_width
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


def rotary_bytes(shape: ModelShape, seq_len: int) -> int:
    """Bytes of the rotary embedding's cos and sin, kept once per forward by the
    first block gradients flow through (shared by every block)."""
    return 2 * seq_len * shape.head_dim * FP32 if shape.rotary else 0


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


def block_allocated_per_token(shape: ModelShape, seq_len: int, rank: int) -> tuple[int, int]:
    """(compute-dtype elements, fp32 elements) per token of every tensor one
    block's forward allocates while gradients flow through it and its LoRA
    trains: what it keeps and its temporaries (LoRA's products and sums, the
    attention's scaled and repeated inputs, masks, the MLP's pieces)."""
    d, m, h, aw, kv = shape.hidden, shape.intermediate, shape.heads, shape.attention_width, shape.kv_width
    S = seq_len
    lora = sum(rank + d_out for _, d_out, _ in shape.lora_targets)  # A x and B A x
    lora += sum(2 * d_out for _, d_out, _ in shape.lora_targets)  # scaled, then added to the base output
    dropout = 4 * d if shape.hidden_dropout > 0.0 else 0  # two masks and the two products
    arch = shape.architecture
    if _math_attention(shape):
        # scaled q and k, contiguous copies, q k^T, the masked scores, softmax, the
        # dropout mask and product, p v and the transposed output.
        attention, attention32 = 7 * aw + 5 * h * S, S
    elif arch == "gpt2":
        attention, attention32 = 3 * aw, h + S  # keys and values concatenated, the output
    else:
        attention, attention32 = aw, h + S  # the output
    if arch == "encoder":
        # q, k, v, the output projection and the MLP's two matrices; two residual
        # sums; two LayerNorms (and their mean, rstd); GELU.
        other = 3 * aw + 2 * d + m + 2 * d + 2 * d + m
        return other + lora + attention + dropout, attention32 + 4
    if arch == "gpt2":
        # the fused q/k/v projection, the output projection, the MLP's two
        # matrices; two residual sums; two LayerNorms; gelu_new's eight m-wide pieces.
        other = 3 * d + d + m + d + 2 * d + 2 * d + 8 * m
        return other + lora + attention + dropout, attention32 + 4
    if arch == "gated":
        # Counted op by op on Llama: RMSNorm twice (square, scale, weight), the
        # q/k/v/o projections, rotary embedding of q and k (products,
        # rotate-half, concatenations, sums), keys and values repeated to every
        # head, residual sums, gate/up/down, SiLU and its product; in fp32 the
        # norms' per-token mean, epsilon sum and rsqrt.
        other = 10 * d + (15 * aw + 17 * kv) // 2 + 4 * m
        return other + lora + attention + dropout, attention32 + 6
    raise ValueError(f"unknown architecture {arch!r}")


def retained_per_token(shape: ModelShape, rank: int) -> int:
    """Compute-dtype elements per token of a block's forward temporaries that
    stay resident after they are freed. glibc serves tensors under its mmap
    threshold (raised up to 32 MiB as tensors are freed) from the heap, where a
    temporary freed between kept tensors leaves a hole that later, differently
    sized tensors do not fill. Measured: runs of the same tokens per batch and
    different sequence lengths retain the same, so the (heads x S) attention
    tensors are left out: the temporaries are counted at S = 0."""
    allocated, allocated32 = block_allocated_per_token(shape, 0, rank)
    kept, kept32 = block_per_token(shape, 0, lowest=False)
    return allocated + allocated32 - kept - kept32 - lora_per_token(shape, rank)


def backward_transient_per_token(shape: ModelShape, seq_len: int) -> int:
    """Compute-dtype elements per token alive beyond the saved ones while one
    block runs backward: the gradients flowing through it (attention
    probabilities and their input under the math path, the MLP's, the hidden
    state's)."""
    d, m, h = shape.hidden, shape.intermediate, shape.heads
    attention = 2 * h * seq_len if _math_attention(shape) else 4 * shape.attention_width
    return attention + 2 * m + 4 * d
