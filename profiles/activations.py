"""What autograd keeps for backward, and what the forward allocates, in a
fedsplit client's blocks and head.

Pure functions of a ``ModelShape`` and the batch: element counts, no tensors.
Each count is a pair (elements in the compute dtype, fp32 elements): with
half-precision frozen weights some tensors stay fp32 (LoRA, the head, and on
the CPU the SDPA math path and RMSNorm, which compute in fp32).

The counts follow the ops of each architecture as transformers runs them, with
the frozen weights of a LoRA model: a frozen linear saves no activation (its
input gradient needs only its weight), so what a block keeps is its norms'
inputs, the attention kernel's tensors, the MLP activation's input(s), dropout
masks, and, where its LoRA trains, each LoRA input (``x``, and ``A x`` of width r).

Attention: with attention dropout on (training), PyTorch's CPU SDPA takes its
math path, which keeps q, k, v and three heads x S x S tensors (softmax, dropout
mask, dropout output), in fp32 whatever the input's precision; without, its
flash kernel keeps q, k, v (keys and values repeated to every head when a
padding mask is passed), the output, the log-sum-exp and the additive mask.
fedsplit pads each batch to its longest sample, so the mask is counted.

``tests/test_cost_model.py`` checks these counts against the tensors autograd
saves and the tensors the forward allocates, on tiny models of each
architecture in fp32 and bf16.
"""

from __future__ import annotations

from .shape import ModelShape

FP32 = 4
Count = tuple[int, int]  # (compute-dtype elements, fp32 elements)


def _add(*counts: Count) -> Count:
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def _math_attention(shape: ModelShape) -> bool:
    return shape.attention_dropout > 0.0


def _norm_kept(shape: ModelShape, half: bool) -> Count:
    """Per token, what a pre-norm keeps: its input and per-token statistics.
    RMSNorm computes in fp32: under half precision it keeps an fp32 copy."""
    d = shape.hidden
    if shape.architecture == "gpt2":
        return d + 2, 0
    return (0, d + 1) if half else (d + 1, 0)


def _attention_kept(shape: ModelShape, seq_len: int) -> Count:
    d, h, aw = shape.hidden, shape.heads, shape.attention_width
    if _math_attention(shape):
        return 0, 3 * aw + 3 * h * seq_len  # fp32 on the CPU whatever the input
    if shape.architecture == "gpt2":
        # q, k, v are views of the fused projection's output (3 d), plus contiguous
        # copies of two of them and the output; the mask; log-sum-exp in fp32.
        return 6 * d + seq_len, h
    # q, k and v (repeated to every head) and the output; the mask; log-sum-exp in fp32.
    return 4 * aw + seq_len, h


def block_per_token(shape: ModelShape, seq_len: int, lowest: bool, half: bool = False) -> Count:
    """What one block keeps per token when gradients flow through it, its own
    LoRA inputs aside. ``lowest``: nothing below it requires grad, so its input
    norm keeps nothing (pre-norm blocks) and an encoder's q is not kept (the
    keys need no gradient). ``half``: frozen weights in fp16/bf16."""
    d, m = shape.hidden, shape.intermediate
    attention = _attention_kept(shape, seq_len)
    masks = 2 * d if shape.hidden_dropout > 0.0 else 0
    arch = shape.architecture
    if arch == "encoder":
        # post-LN: attention, dropout mask, LayerNorm input (+ mean, rstd), GELU
        # input, dropout mask, LayerNorm input (+ mean, rstd).
        if lowest and _math_attention(shape):
            attention = _add(attention, (0, -shape.attention_width))
        return _add(attention, (masks + 2 * (d + 2) + m, 0))
    pre = (0, 0) if lowest else _norm_kept(shape, half)
    if arch == "gpt2":
        # pre-LN; gelu_new keeps four m-wide tensors (pow, tanh and two products).
        return _add(pre, attention, (masks + 4 * m, 0), _norm_kept(shape, half))
    if arch == "gated":
        # pre-RMSNorm; SwiGLU keeps the gate's input, the activation and the up projection.
        return _add(pre, attention, (masks + 3 * m, 0), _norm_kept(shape, half))
    raise ValueError(f"unknown architecture {arch!r}")


def lora_per_token(shape: ModelShape, rank: int, half: bool = False) -> int:
    """fp32 elements per token a block's trained LoRA keeps: its input and each
    ``A x``. In fp32 the targets that read the same tensor share it; under half
    precision each target keeps its own fp32 copy of its input."""
    if half:
        inputs = sum(d_in for _, _, d_in in shape.lora_targets)
    else:
        inputs = sum({d_in for _, _, d_in in shape.lora_targets})
    return inputs + rank * len(shape.lora_targets)


def rotary_bytes(shape: ModelShape, seq_len: int, elem: int = FP32) -> int:
    """Bytes of the rotary embedding's cos and sin (in the compute dtype), kept
    once per forward by the first block gradients flow through (shared by every block)."""
    return 2 * seq_len * shape.head_dim * elem if shape.rotary else 0


def head_bytes(shape: ModelShape, batch: int, seq_len: int, elem: int, half: bool = False) -> int:
    """Bytes the final norm, pooler, head and loss keep (U-shaped split: on the
    client). A trained head computes in fp32: its input is an fp32 copy."""
    d, tokens = shape.hidden, batch * seq_len
    if shape.task == "causal-lm":
        # The logits, upcast to fp32 for the loss, and log-softmax's output.
        norm, norm32 = _norm_kept(shape, half)
        return tokens * (norm * elem + norm32 * FP32) + 2 * tokens * shape.vocab * FP32
    if shape.architecture == "encoder":
        # Pooler on the first token: tanh output and dropout mask, then the classifier's fp32 input.
        per_sample = d * (2 if shape.hidden_dropout > 0.0 else 1)
        return batch * per_sample * elem + batch * d * FP32 + batch * shape.num_labels * FP32 * 2
    # Decoders score every token, then pick each sequence's last one.
    norm, norm32 = _norm_kept(shape, half)
    return (tokens * (norm * elem + norm32 * FP32) + tokens * d * FP32
            + tokens * shape.num_labels * FP32 + batch * shape.num_labels * FP32 * 2)


def _lora_allocated(shape: ModelShape, rank: int, half: bool) -> Count:
    """Per token, what the LoRA of one block allocates: A x and B A x, scaled,
    added to the base output (fp32); under half precision also each target's
    fp32 copy of its input and the sum cast back."""
    fp32 = sum(rank + 3 * d_out for _, d_out, _ in shape.lora_targets)
    if not half:
        return 0, fp32
    return (sum(d_out for _, d_out, _ in shape.lora_targets),
            fp32 + sum(d_in for _, _, d_in in shape.lora_targets))


def _attention_allocated(shape: ModelShape, seq_len: int, half: bool) -> Count:
    """Per token, what attention allocates around and inside SDPA."""
    h, aw, S = shape.heads, shape.attention_width, seq_len
    mask = S  # the additive mask, built per block in the compute dtype
    if _math_attention(shape):
        # SDPA's math path: scaled q and k, contiguous copies, q k^T, the masked
        # scores, softmax, the dropout mask and product, p v: in fp32 (inputs
        # upcast, the probabilities and output cast back, under half precision).
        inner = (4 if shape.architecture == "gpt2" else 6) * aw + 5 * h * S
        # Outside it: the output transposed back (and GPT-2's concatenated keys and values).
        outside = (3 if shape.architecture == "gpt2" else 1) * aw
        if half:
            return outside + aw + h * S + mask, inner + 3 * aw
        return outside + inner + mask, 0
    if shape.architecture == "gpt2":
        return 3 * aw + mask, h  # keys and values concatenated, the output; log-sum-exp
    return aw + mask, h  # the output; log-sum-exp


def block_allocated_per_token(shape: ModelShape, seq_len: int, rank: int, half: bool = False) -> Count:
    """What one block's forward allocates per token while gradients flow
    through it and its LoRA trains: what it keeps and its temporaries."""
    d, m, aw, kv = shape.hidden, shape.intermediate, shape.attention_width, shape.kv_width
    lora = _lora_allocated(shape, rank, half)
    attention = _attention_allocated(shape, seq_len, half)
    dropout = (4 * d if shape.hidden_dropout > 0.0 else 0, 0)  # two masks and the two products
    arch = shape.architecture
    if arch == "encoder":
        # q, k, v, the output projection and the MLP's two matrices; two residual
        # sums; two LayerNorms (and their mean, rstd); GELU.
        other = (3 * aw + 2 * d + m + 2 * d + 2 * (d + 2) + m, 0)
        return _add(other, lora, attention, dropout)
    if arch == "gpt2":
        # the fused q/k/v projection, the output projection, the MLP's two
        # matrices; two residual sums; two LayerNorms; gelu_new's eight m-wide pieces.
        other = (3 * d + d + m + d + 2 * d + 2 * (d + 2) + 8 * m, 0)
        return _add(other, lora, attention, dropout)
    if arch == "gated":
        # Counted op by op on Llama: the q/k/v/o projections, rotary embedding of
        # q and k (products, rotate-half, concatenations, sums), keys and values
        # repeated to every head, residual sums, gate/up/down, SiLU and its
        # product; RMSNorm twice (square, mean, epsilon, rsqrt, scale, weight;
        # in fp32 under half precision, with a copy in and one out).
        other = (4 * d + (15 * aw + 17 * kv) // 2 + 4 * m, 0)
        norms = (2 * 2 * d, 2 * (3 * d + 3)) if half else (2 * (3 * d + 3), 0)
        return _add(other, norms, lora, attention, dropout)
    raise ValueError(f"unknown architecture {arch!r}")


def retained_bytes_per_token(shape: ModelShape, rank: int, elem: int, half: bool = False) -> int:
    """Bytes per token of a block's forward temporaries (what it allocates and
    does not keep). glibc serves tensors under its mmap threshold (raised up to
    32 MiB as tensors are freed) from the heap, where a temporary freed between
    kept tensors leaves a hole that later, differently sized tensors do not
    fill; ``profiles.cost`` counts a share of these as resident. Measured: runs
    of the same tokens per batch and different sequence lengths retain the
    same, so the (heads x S) attention tensors are left out: the temporaries
    are counted at S = 0."""
    allocated = block_allocated_per_token(shape, 0, rank, half)
    kept = _add(block_per_token(shape, 0, lowest=False, half=half), (0, lora_per_token(shape, rank, half)))
    return (allocated[0] - kept[0]) * elem + (allocated[1] - kept[1]) * FP32


def backward_transient_bytes_per_token(shape: ModelShape, seq_len: int, elem: int, half: bool = False) -> int:
    """Bytes per token alive beyond the kept ones while one block runs
    backward: the gradients flowing through it (the attention probabilities'
    and their input's under the math path, in fp32 there; the MLP's; the
    hidden state's)."""
    d, m, h = shape.hidden, shape.intermediate, shape.heads
    if _math_attention(shape):
        attention = 2 * h * seq_len * (FP32 if half else elem)
    else:
        attention = 4 * shape.attention_width * elem
    return attention + (2 * m + 4 * d) * elem
