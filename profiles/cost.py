"""Predicted peak memory, bytes on the wire and step time of a client's plan.

A plan says where the model is cut (the client keeps blocks ``[0, k1)`` and
``[L - k2, L)``), the LoRA rank, which blocks' LoRA trains, the batch and the
sequence length. The client then holds (``edge/client.py``):

- the runtime: interpreter and libraries (``profiles/runtime.py``, measured);
- its frozen weights in their dtype: embeddings, its blocks, and in a U-shaped
  split the final norm, pooler and head; with quantized weights (``weights``
  "8bit" or "4bit") its blocks' linear layers in bitsandbytes' layout, the
  inputs 8-bit layers keep for backward, and one dequantized layer alive for
  a moment (``profiles/quantized.py``), and the token embedding quantized
  too where it is a frozen lookup (``embedding_quantized``); and where loading
  peaks above training (quantized weights: one layer in full precision as
  read, beside every layer already quantized, or the whole token embedding as
  read, first), the difference (``loading``);
- LoRA factors (fp32) on every one of its blocks, and a trained
  classification head twice (peft's ``modules_to_save`` keeps the original
  beside the trained copy);
- gradients and AdamW's two moments for what trains;
- what autograd saves for backward (``profiles/activations.py``): in the
  bottom segment only from the lowest trainable block upwards (below it nothing
  requires grad), in the top segment always (the client returns the gradient
  at the cut), and the head's;
- the forward's temporaries that the C heap keeps resident after they are
  freed (glibc; fitted, see ``RETAINED``);
- the batch, the hidden state it sends and the one it receives, and the
  gradients alive while one block runs backward.

Server-side blocks cost the client nothing but what crosses the wire; whether
they train changes nothing on the client (the client sends the gradient at
the cut whatever the server does with it).

Everything here is arithmetic on a ``ModelShape`` except the runtime baseline,
measured once per process: the planner calls ``predict_memory`` many times.
Checked against measured client peaks by ``bench/cost_model.py`` and
``tests/test_cost_model.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgpack
import torch

from split.codecs import RAW, CodecSpec, encoded_nbytes, parse_codec
from split.records import SERVER_SECONDS

from . import activations as act
from . import quantized as quant
from .runtime import runtime_baseline
from .shape import ModelShape

__all__ = ["ModelShape", "Plan", "MemoryEstimate", "StepTime", "predict_memory", "block_memory", "step_bytes",
           "step_flops", "predict_step_time", "client_blocks"]

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FP32 = 4
ADAM_STATES = 2  # exp_avg and exp_avg_sq per trained parameter
INT64 = 8
# Forward temporaries that stay resident as heap holes (activations.retained_per_token):
# all of the first block's gradients flow through, and this share of every such
# block's. Fitted on 15 measured client peaks (MiniLM and a 12-block GPT-2, batch
# 2 to 64, sequence 64 to 512, 1 to 5 blocks on the gradient path) that are not
# among bench/cost_model.py's plans.
RETAINED_FIRST = 1.0
RETAINED = 0.4
MESSAGES_PER_STEP = 2  # forward and backward, each a request and its reply
CLIENT_ID = "client-0123abcd"  # a client's default id: "client-" + 8 hex digits


@dataclass(frozen=True)
class Plan:
    """One client's choices. ``trainable``: block indices whose LoRA trains
    (client or server blocks). ``dtype``: the client's frozen weights and compute;
    ``server_dtype``: what the server's replies carry. ``codec_up`` /
    ``codec_down``: the wire codecs (``split.codecs``, as their text) of the
    hidden states and gradients the client sends and of the server's replies;
    stored in their canonical text. ``weights``: how the
    client's blocks hold their linear weights: "8bit" or "4bit" (bitsandbytes,
    ``--quantize``), or unquantized in ``dtype`` ("float32", the default, stands
    for that whatever ``dtype`` is; after construction ``weights`` names it)."""

    k1: int
    k2: int
    rank: int
    batch: int
    seq_len: int
    trainable: frozenset[int] = field(default_factory=frozenset)
    dtype: str = "float32"
    server_dtype: str = "float32"
    codec_up: str = "fp32"
    codec_down: str = "fp32"
    weights: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "trainable", frozenset(self.trainable))
        for name in ("codec_up", "codec_down"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ValueError(f"plan: {name} must be a codec's text such as fp32 or int8, got {value!r}")
            try:
                object.__setattr__(self, name, parse_codec(value).text)
            except ValueError as exc:
                raise ValueError(f"plan: {name}: {exc}") from None
        for name in ("k1", "rank", "batch", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"plan: {name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.k2, int) or self.k2 < 0:
            raise ValueError(f"plan: k2 must be an integer >= 0, got {self.k2!r}")
        if any(not isinstance(b, int) or b < 0 for b in self.trainable):
            raise ValueError(f"plan: trainable must hold block indices >= 0, got {sorted(self.trainable)}")
        for name in ("dtype", "server_dtype"):
            if getattr(self, name) not in DTYPE_BYTES:
                raise ValueError(f"plan: {name} must be one of {', '.join(DTYPE_BYTES)}, got {getattr(self, name)!r}")
        if self.weights not in quant.WEIGHTS:
            raise ValueError(f"plan: weights must be one of {', '.join(quant.WEIGHTS)}, got {self.weights!r}")
        if self.weights not in quant.QUANTIZED:
            if self.weights != "float32" and self.weights != self.dtype:
                raise ValueError(f"plan: unquantized weights are held in the plan's dtype ({self.dtype}), "
                                 f"not {self.weights}")
            object.__setattr__(self, "weights", self.dtype)

    @property
    def quantized(self) -> bool:
        """Whether the client's blocks hold their linear weights in 8 or 4 bits."""
        return self.weights in quant.QUANTIZED


@dataclass(frozen=True)
class MemoryEstimate:
    """A predicted client peak: ``total`` bytes and its parts."""

    total: int
    parts: dict[str, int]


@dataclass(frozen=True)
class StepTime:
    """Predicted seconds of one training step."""

    compute: float
    network: float
    total: float


# ---------------------------------------------------------------- the plan's layout


def client_blocks(shape: ModelShape, plan: Plan) -> tuple[range, range]:
    """(bottom, top) block ranges the client holds; ValueError if the cut leaves the server nothing."""
    L = shape.num_layers
    if plan.k1 + plan.k2 >= L:
        raise ValueError(f"plan cut {plan.k1},{plan.k2} leaves no block for the server of a {L}-block model")
    bad = sorted(b for b in plan.trainable if b >= L)
    if bad:
        raise ValueError(f"plan: trainable blocks {bad} do not exist in a {L}-block model")
    return range(0, plan.k1), range(L - plan.k2, L)


def _lowest_trained(bottom: range, trainable: frozenset[int]) -> int | None:
    trained = [b for b in bottom if b in trainable]
    return min(trained) if trained else None


def _elem(plan: Plan) -> int:
    return DTYPE_BYTES[plan.dtype]


def _half(plan: Plan) -> bool:
    return plan.dtype != "float32"


def _block_activation_bytes(shape: ModelShape, plan: Plan, lowest: bool) -> int:
    """Bytes one block keeps for backward, its own LoRA inputs aside."""
    elems, fp32 = act.block_per_token(shape, plan.seq_len, lowest, _half(plan))
    return plan.batch * plan.seq_len * (elems * _elem(plan) + fp32 * FP32)


def _lora_activation_bytes(shape: ModelShape, plan: Plan) -> int:
    return plan.batch * plan.seq_len * act.lora_per_token(shape, plan.rank, _half(plan)) * FP32


def _lora_training_bytes(shape: ModelShape, plan: Plan) -> int:
    """Gradient and AdamW moments of one block's LoRA."""
    return shape.lora_params(plan.rank) * FP32 * (1 + ADAM_STATES)


def _int8_input_bytes(shape: ModelShape, plan: Plan, lowest: bool, trained: bool) -> int:
    """Bytes the 8-bit layers of one block on the gradient path keep for backward (0 unless 8-bit)."""
    if plan.weights != "8bit":
        return 0
    per_token = quant.int8_inputs_per_token(shape.hidden, shape.intermediate, lowest, trained, _half(plan))
    return plan.batch * plan.seq_len * per_token * _elem(plan)


def _activations(shape: ModelShape, plan: Plan) -> int:
    bottom, top = client_blocks(shape, plan)
    total = 0
    lowest = _lowest_trained(bottom, plan.trainable)
    if lowest is not None:
        for b in range(lowest, plan.k1):
            total += _block_activation_bytes(shape, plan, lowest=b == lowest)
            total += _int8_input_bytes(shape, plan, b == lowest, b in plan.trainable)
    for b in top:
        total += _block_activation_bytes(shape, plan, lowest=False)
        total += _int8_input_bytes(shape, plan, False, b in plan.trainable)
    total += sum(_lora_activation_bytes(shape, plan) for b in (*bottom, *top) if b in plan.trainable)
    if lowest is not None or plan.k2:
        total += act.rotary_bytes(shape, plan.seq_len, _elem(plan))
    if plan.k2:
        total += act.head_bytes(shape, plan.batch, plan.seq_len, _elem(plan), _half(plan))
    return total


def _retained_block(shape: ModelShape, plan: Plan, share: float) -> int:
    """``share`` of the bytes of one block's forward temporaries over the batch."""
    per_token = act.retained_bytes_per_token(shape, plan.rank, _elem(plan), _half(plan))
    return round(share * plan.batch * plan.seq_len * per_token)


def _retained(shape: ModelShape, plan: Plan) -> int:
    """Bytes of forward temporaries left resident by the blocks gradients flow through."""
    bottom, top = client_blocks(shape, plan)
    lowest = _lowest_trained(bottom, plan.trainable)
    blocks = len(top) + (plan.k1 - lowest if lowest is not None else 0)
    if not blocks:
        return 0
    return _retained_block(shape, plan, RETAINED_FIRST) + blocks * _retained_block(shape, plan, RETAINED)


def _backprops(shape: ModelShape, plan: Plan) -> bool:
    bottom, _ = client_blocks(shape, plan)
    return plan.k2 > 0 or _lowest_trained(bottom, plan.trainable) is not None


def _transient(shape: ModelShape, plan: Plan) -> int:
    """Bytes alive beyond the kept ones at the backward's worst moment: inside
    one block, or, for a language-model head on the client, the logits' gradient."""
    if not _backprops(shape, plan):
        return 0
    tokens = plan.batch * plan.seq_len
    block = tokens * act.backward_transient_bytes_per_token(shape, plan.seq_len, _elem(plan), _half(plan))
    if plan.quantized:
        bottom, top = client_blocks(shape, plan)
        block += max(quant.dequantized_bytes(_linears(shape, b), _elem(plan)) for b in (*bottom, *top))
    head = tokens * shape.vocab * FP32 if plan.k2 and shape.task == "causal-lm" else 0
    return max(block, head)


def _linears(shape: ModelShape, block: int) -> tuple[tuple[int, int], ...]:
    """(d_out, d_in) of block ``block``'s linear layers; a shape without them cannot price quantized weights."""
    if not shape.block_linears:
        raise ValueError("this model shape lists no linear layers per block (ModelShape.block_linears): build it "
                         "with ModelShape.from_config to price quantized weights")
    return shape.block_linears[block]


def embedding_quantized(shape: ModelShape, plan: Plan) -> bool:
    """Whether the plan's client holds its token embedding quantized: with
    quantized weights, where it is a plain lookup not tied to a head the
    client computes (``split/quant_embedding.py``)."""
    return (plan.quantized and shape.embedding_lookup and shape.token_embedding[0] > 0
            and not (shape.tied_head and plan.k2 > 0))


def _weight_bytes(shape: ModelShape, plan: Plan, frozen: int, blocks: list[int]) -> int:
    """Bytes of the frozen weights: ``frozen`` parameters in the plan's dtype,
    the blocks' linear weights in their quantized layout when quantized."""
    total = frozen * _elem(plan)
    if embedding_quantized(shape, plan):
        rows, width = shape.token_embedding
        total += quant.quantized_embedding_bytes(rows, width, plan.weights) - rows * width * _elem(plan)
    if plan.quantized:
        for b in blocks:
            linears = _linears(shape, b)
            total += quant.block_quantized_bytes(linears, plan.weights)
            total -= quant.block_linear_params(linears) * _elem(plan)
    return total


# ---------------------------------------------------------------- memory


def predict_memory(shape: ModelShape, plan: Plan, *, runtime: int | None = None) -> MemoryEstimate:
    """The client's predicted peak resident memory for ``plan``. ``runtime``:
    the runtime's own bytes (None: measured on this machine, once per process)."""
    bottom, top = client_blocks(shape, plan)
    elem = _elem(plan)
    blocks = list(bottom) + list(top)
    u_shaped = plan.k2 > 0
    frozen = shape.embedding_params + sum(shape.block_params[b] for b in blocks)
    head = 0
    if u_shaped:
        frozen += shape.norm_params + shape.pooler_params
        if shape.head_trained:
            head = 2 * shape.head_params * FP32  # frozen original and trained copy, both fp32
        else:
            frozen += shape.head_params
    trained_head = shape.head_params * FP32 if u_shaped and shape.head_trained else 0
    trained_blocks = [b for b in blocks if b in plan.trainable]
    tokens = plan.batch * plan.seq_len
    parts = {
        "runtime": runtime_baseline() if runtime is None else runtime,
        "weights": _weight_bytes(shape, plan, frozen, blocks),
        "head": head,
        "lora": len(blocks) * shape.lora_params(plan.rank) * FP32,
        "optimizer": ADAM_STATES * (trained_head + sum(shape.lora_params(plan.rank) * FP32 for _ in trained_blocks)),
        "gradients": trained_head + sum(shape.lora_params(plan.rank) * FP32 for _ in trained_blocks),
        "activations": _activations(shape, plan),
        "retained": _retained(shape, plan),
        # The batch (ids, mask, labels), the hidden state sent and the one received
        # (in the server's dtype, then cast to the client's).
        "io": tokens * 3 * INT64 + tokens * shape.hidden * (
            elem + DTYPE_BYTES[plan.server_dtype] + (elem if plan.server_dtype != plan.dtype else 0)),
        "transient": _transient(shape, plan),
    }
    parts["loading"] = max(0, _loading(shape, plan, parts) - sum(parts.values()))
    return MemoryEstimate(total=sum(parts.values()), parts=parts)


def _loading(shape: ModelShape, plan: Plan, parts: dict[str, int]) -> int:
    """The peak while a client with quantized weights loads: its runtime and
    frozen weights, and the largest linear layer as the checkpoint stores it
    (and cast to the plan's dtype), read before it is quantized (0 unquantized:
    what loads is kept, so training peaks higher)."""
    if not plan.quantized:
        return 0
    bottom, top = client_blocks(shape, plan)
    largest = max(quant.dequantized_bytes(_linears(shape, b), 1) for b in (*bottom, *top))
    stored = DTYPE_BYTES[shape.checkpoint_dtype]
    per_element = stored + (_elem(plan) if shape.checkpoint_dtype != plan.dtype else 0)
    blocks = parts["runtime"] + parts["weights"] + parts["head"] + largest * per_element
    if not embedding_quantized(shape, plan):
        return blocks
    # The token embedding loads first (before every block): read whole, then quantized.
    rows, width = shape.token_embedding
    embedding = parts["runtime"] + rows * width * per_element + quant.quantized_embedding_bytes(
        rows, width, plan.weights)
    return max(blocks, embedding)


def block_memory(shape: ModelShape, plan: Plan, block: int) -> int:
    """Client bytes of making ``block``'s LoRA train under ``plan``: its
    gradients and AdamW moments and the activations it makes the client keep
    (0 for a server block: its LoRA lives on the server). Client LoRA factors
    themselves are held for every client block, trained or not.

    Additive: ``predict_memory(plan)`` equals ``predict_memory(plan without
    trainable blocks) + sum(block_memory(b) for b in plan.trainable)`` whenever
    the trained bottom blocks run up to the cut (``{j, ..., k1 - 1}``) and the
    split is U-shaped. A lower bottom block makes every bottom block above it
    keep its activations, so a trained block below an untrained one costs more
    than its share (``predict_memory`` counts that exactly)."""
    bottom, top = client_blocks(shape, plan)
    if block in top:
        # A trained LoRA keeps the q/k/v input an 8-bit layer would otherwise keep.
        int8 = _int8_input_bytes(shape, plan, False, True) - _int8_input_bytes(shape, plan, False, False)
        return _lora_training_bytes(shape, plan) + _lora_activation_bytes(shape, plan) + int8
    if block not in bottom:
        return 0
    own = _block_activation_bytes(shape, plan, lowest=True) + _int8_input_bytes(shape, plan, True, True)
    # The next block's input norm keeps this block's output once gradients flow through it.
    above = 0
    if block + 1 < plan.k1:
        above = _block_activation_bytes(shape, plan, lowest=False) - _block_activation_bytes(shape, plan, lowest=True)
        above += _int8_input_bytes(shape, plan, False, True) - _int8_input_bytes(shape, plan, True, True)
    retained = _retained_block(shape, plan, RETAINED)
    return _lora_training_bytes(shape, plan) + _lora_activation_bytes(shape, plan) + own + above + retained


# ---------------------------------------------------------------- the wire


def _header(op: str, meta: dict, tensors: list[tuple[str, str, tuple[int, ...], CodecSpec, int]]) -> int:
    """Bytes of a message's msgpack header (``split.wire.encode``'s layout)."""
    entries = []
    for name, dtype, dims, spec, nbytes in tensors:
        entry = {"name": name, "dtype": dtype, "shape": list(dims), "codec": spec.wire_name, "nbytes": nbytes}
        if spec.params:
            entry["params"] = dict(spec.params)
        entries.append(entry)
    header = {"v": 1, "op": op, "client": CLIENT_ID, "step": 1000, "meta": meta, "tensors": entries}
    return len(msgpack.packb(header, use_bin_type=True))


def _message(op: str, meta: dict, tensors: list[tuple[str, str, tuple[int, ...], CodecSpec]]) -> int:
    """Bytes of a message whose tensors (name, dtype, shape, codec) travel in their codecs."""
    sized = [(name, dtype, dims, spec, encoded_nbytes(dims, _TORCH_DTYPES[dtype], spec))
             for name, dtype, dims, spec in tensors]
    return _header(op, meta, sized) + sum(s[4] for s in sized)


_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "uint8": torch.uint8, "int64": torch.int64}
_REQUEST_META = {"rid": 1000, "token": "0" * 32}
_REPLY_META = {SERVER_SECONDS: 0.5}  # the server's compute time, a float64 in every forward and backward reply


def step_bytes(shape: ModelShape, plan: Plan) -> tuple[int, int]:
    """(bytes up, bytes down) of one training step: the forward and backward
    requests and their replies, headers included, as ``Connection`` counts them.
    The hidden states and gradients at the cut travel in the plan's codecs
    (``codec_up`` from the client, ``codec_down`` from the server)."""
    client_blocks(shape, plan)
    B, S, d = plan.batch, plan.seq_len, shape.hidden
    hidden = (B, S, d)
    up, down = parse_codec(plan.codec_up), parse_codec(plan.codec_down)
    forward = [("hidden", plan.dtype, hidden, up), ("attention_mask", "uint8", (B, S), RAW)]
    if shape.rotary:
        forward.append(("position_ids", "int64", (1, S), RAW))
    if plan.k2 == 0:
        # Two-part split: the labels go up, the logits and the loss come back, the loss's gradient goes up.
        labels = (B, S) if shape.task == "causal-lm" else (B,)
        forward.append(("labels", "int64", labels, RAW))
        logits = (B, S, shape.vocab) if shape.task == "causal-lm" else (B, shape.num_labels)
        forward_reply = [("logits", "float32", logits, RAW), ("loss", "float32", (1,), RAW)]
        backward = [("grad", "float32", (), RAW)]
    else:
        forward_reply = [("hidden", plan.server_dtype, hidden, down)]
        backward = [("grad", plan.dtype, hidden, up)]
    sent = (_message("forward", {"train": True, **_REQUEST_META}, forward)
            + _message("backward", _REQUEST_META, backward))
    received = (_message("ok", _REPLY_META, forward_reply)
                + _message("ok", _REPLY_META, [("grad", plan.server_dtype, hidden, down)]))
    return sent, received


# ---------------------------------------------------------------- time


def _block_forward_flops(shape: ModelShape, plan: Plan, block: int) -> float:
    """Forward FLOPs of one block over the batch: its matrices, attention, LoRA."""
    tokens = plan.batch * plan.seq_len
    matrices = 2 * shape.block_params[block]
    attention = 4 * plan.seq_len * shape.attention_width  # q k^T and p v, per token
    lora = 2 * shape.lora_params(plan.rank)
    return tokens * (matrices + attention + lora)


def _head_flops(shape: ModelShape, plan: Plan) -> float:
    B, S, d = plan.batch, plan.seq_len, shape.hidden
    if shape.task == "causal-lm":
        return 2 * B * S * d * shape.vocab
    if shape.architecture == "encoder":
        return 2 * B * (shape.pooler_params + shape.head_params)
    return 2 * B * S * d * shape.num_labels


def step_flops(shape: ModelShape, plan: Plan) -> float:
    """Client FLOPs of one training step: forward through every client block
    and the head; backward through the head and top blocks (always: the client
    returns the gradient at the cut) and through the bottom blocks from the
    lowest trained one up. A frozen matrix's backward computes its input's
    gradient only (as much as its forward); attention's backward is twice its
    forward; a trained LoRA adds its weight gradients."""
    bottom, top = client_blocks(shape, plan)
    blocks = list(bottom) + list(top)
    forward = sum(_block_forward_flops(shape, plan, b) for b in blocks)
    backward_blocks = list(top)
    lowest = _lowest_trained(bottom, plan.trainable)
    if lowest is not None:
        backward_blocks += list(range(lowest, plan.k1))
    tokens = plan.batch * plan.seq_len
    backward = 0.0
    for b in backward_blocks:
        backward += tokens * (2 * shape.block_params[b] + 8 * plan.seq_len * shape.attention_width
                              + 2 * shape.lora_params(plan.rank))
    if lowest is not None:
        # Nothing below the lowest trained block needs a gradient: its q/k/v
        # projections and LoRA A factors compute no input gradient.
        skipped = shape.hidden * (shape.attention_width + 2 * shape.kv_width)
        skipped += sum(plan.rank * d_in for _, _, d_in in shape.lora_targets)
        backward -= tokens * 2 * skipped
    backward += sum(tokens * 2 * shape.lora_params(plan.rank) for b in blocks if b in plan.trainable)
    head = 0.0
    if plan.k2:
        head = 2 * _head_flops(shape, plan)  # forward and the input gradient (plus a small weight gradient)
    return forward + backward + head


def predict_step_time(shape: ModelShape, plan: Plan, profile, server_seconds: float = 0.0) -> StepTime:
    """Seconds of one training step on the device ``profile`` (anything with
    ``gflops(dtype)``, ``uplink_mbps``, ``downlink_mbps`` and ``rtt_ms``): client
    FLOPs over its throughput, bytes over its link, one round trip per message
    pair (forward, backward), plus ``server_seconds`` of server compute."""
    compute = step_flops(shape, plan) / (profile.gflops(plan.dtype) * 1e9)
    up, down = step_bytes(shape, plan)
    network = (up * 8 / (profile.uplink_mbps * 1e6) + down * 8 / (profile.downlink_mbps * 1e6)
               + MESSAGES_PER_STEP * profile.rtt_ms / 1e3)
    return StepTime(compute=compute, network=network, total=compute + network + server_seconds)
