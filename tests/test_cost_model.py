"""The cost model (profiles/cost.py) against reality: what autograd saves and
allocates in a client's blocks, the bytes a real client sends, the peak memory
of real client processes; and the model's own laws (monotonicity, additivity)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from profiles import activations as act
from profiles.cost import ModelShape, Plan, block_memory, predict_memory, step_bytes
from split.families import block_of
from split.lora import LoraSpec, attach_lora, lora_layers, set_trainable
from split.partition import CLIENT, Cut, build_segment

RUNTIME = 300 << 20  # a fixed runtime for the pure tests: no subprocess


class _Cut(nn.Module):
    """Stands for the server in a client segment: the top segment gets a fresh
    leaf that requires grad, as the client's RemoteBlock returns one."""

    def forward(self, hidden, *args, **kwargs):
        return hidden.detach().requires_grad_() * 1.0


class _Allocations(TorchDispatchMode):
    """Bytes of every fresh tensor each block's forward allocates."""

    def __init__(self, where):
        super().__init__()
        self.where, self.bytes = where, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if torch.is_tensor(t)}
        for t in tree_flatten(out)[0]:
            if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in inputs:
                self.bytes[self.where[0]] = self.bytes.get(self.where[0], 0) + t.untyped_storage().nbytes()
        return out


def _forward_accounting(folder, dropout: bool, trained: set[int], batch=2, seq_len=16):
    """Per block of a client segment cut at 2,1 of a tiny 4-block model: (bytes
    autograd saves, bytes the forward allocates) over one padded training batch."""
    seg = build_segment(folder, CLIENT, Cut(2, 1), dropout=dropout, num_labels=3)
    seg.blocks()[2] = _Cut()
    model = attach_lora(seg.model, LoraSpec(8, 16.0), seg.family, "classification", 0,
                        modules_to_save=seg.family.trained_heads("classification"))
    set_trainable(model, "both", modules={m for m in lora_layers(model) if block_of(m) in trained})
    model.train()
    where, saved, keep = ["embeddings"], {}, []
    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            keep.append(t)  # alive until backward in a real step: no address is reused meanwhile
            saved[where[0]] = saved.get(where[0], 0) + t.untyped_storage().nbytes()
        return t

    for i, block in enumerate(seg.blocks()):
        block.register_forward_pre_hook(lambda m, a, i=i: where.__setitem__(0, i))
    ids = torch.randint(3, 90, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    mask[1, seq_len // 2:] = 0  # padded, as fedsplit's batches are
    allocations = _Allocations(where)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), allocations:
        model(input_ids=ids.masked_fill(mask == 0, 0), attention_mask=mask, labels=torch.zeros(batch).long())
    return seg.config, saved, allocations.bytes


@pytest.mark.parametrize("family,dropout", [("bert", True), ("bert", False), ("gpt2", True), ("gpt2", False),
                                            ("llama", False), ("qwen2", False), ("mistral", False)])
def test_block_formulas_match_autograd(tiny_models, family, dropout):
    """What a block keeps for backward and what its forward allocates, counted
    on a real forward, equal the formulas: an inner block (gradients flow
    through it, its LoRA trains), the lowest trained one, and one below it."""
    B, S, rank = 2, 16, 8
    config, saved, allocated = _forward_accounting(tiny_models(family), dropout, trained={1, 3}, batch=B, seq_len=S)
    shape = ModelShape.from_config(config, num_labels=3)
    tokens = B * S
    kept, kept32 = act.block_per_token(shape, S, lowest=True)
    lora = act.lora_per_token(shape, rank)
    assert 0 not in saved  # below the lowest trained block nothing is kept
    assert saved[1] == tokens * 4 * (kept + kept32 + lora) + act.rotary_bytes(shape, S)
    # Block 3 (top segment) is an inner block; its count also holds the head's.
    inner, inner32 = act.block_per_token(shape, S, lowest=False)
    head = act.head_bytes(shape, B, S, 4)
    assert saved[3] == pytest.approx(tokens * 4 * (inner + inner32 + lora) + head, rel=0.01, abs=64)
    alloc, alloc32 = act.block_allocated_per_token(shape, S, rank)
    assert allocated[1] == pytest.approx(tokens * 4 * (alloc + alloc32), abs=64)  # + a few scalars


# ---------------------------------------------------------------- the model's laws


@pytest.fixture(scope="module")
def minilm_shape():
    from split.partition import load_config, resolve_model_path

    return ModelShape.from_config(load_config(resolve_model_path(None), "classification", 2, True))


@pytest.fixture(scope="module")
def gpt2_shape():
    from transformers import GPT2Config

    return ModelShape.from_config(GPT2Config(n_layer=12, num_labels=2, pad_token_id=50256))


def _total(shape, plan) -> int:
    return predict_memory(shape, plan, runtime=RUNTIME).total


@pytest.mark.parametrize("which", ["minilm_shape", "gpt2_shape"])
def test_more_of_anything_needs_more_memory(request, which):
    shape = request.getfixturevalue(which)
    L = shape.num_layers
    plan = Plan(k1=2, k2=1, rank=8, batch=8, seq_len=64, trainable=frozenset({1, L - 1}))
    base = _total(shape, plan)
    for bigger in (dict(rank=16), dict(batch=16), dict(seq_len=128), dict(k1=3), dict(k2=2),
                   dict(trainable=frozenset({0, 1, L - 1})), dict(dtype="float32")):
        grown = Plan(**{**plan.__dict__, **bigger})
        if grown == plan:
            continue
        assert _total(shape, grown) > base, bigger
    # Fewer, higher trainable blocks: less memory.
    assert _total(shape, Plan(**{**plan.__dict__, "trainable": frozenset({L - 1})})) < base
    assert _total(shape, Plan(**{**plan.__dict__, "trainable": frozenset({0, 1, L - 1})})) > \
        _total(shape, Plan(**{**plan.__dict__, "trainable": frozenset({1, L - 1})}))
    # Half-precision frozen weights: less memory.
    assert _total(shape, Plan(**{**plan.__dict__, "dtype": "bfloat16"})) < base
    # A server block that trains costs the client nothing.
    assert _total(shape, Plan(**{**plan.__dict__, "trainable": plan.trainable | {2}})) == base


@pytest.mark.parametrize("which", ["minilm_shape", "gpt2_shape"])
def test_block_memory_adds_up(request, which):
    """predict_memory(plan) = predict_memory(no block trains) + the blocks'
    block_memory, when the trained bottom blocks run up to the cut."""
    shape = request.getfixturevalue(which)
    L = shape.num_layers
    for k1, k2, trained in [(3, 2, {1, 2, L - 1}), (2, 1, {0, 1, L - 1, 4}), (1, 1, {0}), (2, 2, {L - 2, L - 1}),
                            (3, 1, set())]:
        plan = Plan(k1, k2, 8, 8, 64, frozenset(trained))
        frozen = Plan(k1, k2, 8, 8, 64, frozenset())
        parts = sum(block_memory(shape, plan, b) for b in trained)
        assert _total(shape, plan) == _total(shape, frozen) + parts, (k1, k2, trained)
    plan = Plan(3, 1, 8, 8, 64, frozenset({0, 1, 2}))
    assert block_memory(shape, plan, 4) == 0  # a server block
    assert block_memory(shape, plan, 0) > block_memory(shape, plan, L - 1) > 0


def test_plan_refuses_nonsense(minilm_shape):
    with pytest.raises(ValueError, match="rank"):
        Plan(1, 1, 0, 8, 64)
    with pytest.raises(ValueError, match="dtype"):
        Plan(1, 1, 8, 8, 64, dtype="int8")
    with pytest.raises(ValueError, match="no block for the server"):
        predict_memory(minilm_shape, Plan(3, 3, 8, 8, 64), runtime=RUNTIME)
    with pytest.raises(ValueError, match="do not exist"):
        predict_memory(minilm_shape, Plan(1, 1, 8, 8, 64, frozenset({9})), runtime=RUNTIME)


# ---------------------------------------------------------------- bytes on the wire


@pytest.mark.parametrize("family,cut", [("bert", "1,1"), ("llama", "2,1"), ("gpt2", "1,0")])
def test_step_bytes_equal_what_a_client_counts(tiny_models, family, cut):
    from conftest import VOCAB, random_batch, threaded_server
    from edge.client import ClientConfig, SplitClient
    from split.partition import load_config

    folder = tiny_models(family)
    c = Cut.parse(cut)
    plan = Plan(c.front, c.back, rank=4, batch=6, seq_len=12)
    shape = ModelShape.from_config(load_config(folder, "classification", 3, True), num_labels=3)
    predicted_up, predicted_down = step_bytes(shape, plan)
    with threaded_server(folder, cut, num_labels=3) as (endpoint, _):
        client = SplitClient(ClientConfig(server=endpoint, model=str(folder), num_labels=3, lora=LoraSpec(4, 8.0),
                                          cut=c, timeout=60))
        try:
            client.train_step(random_batch(0, VOCAB, batch=6, max_len=12))
            up, down = client.conn.bytes_sent, client.conn.bytes_received
            client.train_step(random_batch(1, VOCAB, batch=6, max_len=12))
            up, down = client.conn.bytes_sent - up, client.conn.bytes_received - down
        finally:
            client.close()
    assert predicted_up == pytest.approx(up, rel=0.03)
    assert predicted_down == pytest.approx(down, rel=0.03)
