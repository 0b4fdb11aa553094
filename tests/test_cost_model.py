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
from profiles.cost import ModelShape, Plan, block_memory, predict_memory, predict_step_time, step_bytes, step_flops
from split.devices import place
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


def _forward_accounting(folder, dropout: bool, trained: set[int], batch=2, seq_len=16, dtype=torch.float32):
    """Per block of a client segment cut at 2,1 of a tiny 4-block model: (bytes
    autograd saves, bytes the forward allocates) over one padded training batch."""
    seg = build_segment(folder, CLIENT, Cut(2, 1), dropout=dropout, num_labels=3, dtype=dtype)
    seg.blocks()[2] = _Cut()
    heads = seg.family.trained_heads("classification")
    place(seg.model, torch.device("cpu"), heads)  # the trained head in fp32, as a client holds it
    model = attach_lora(seg.model, LoraSpec(8, 16.0), seg.family, "classification", 0, modules_to_save=heads)
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


@pytest.mark.parametrize("family,dropout,dtype", [
    ("bert", True, "float32"), ("bert", False, "float32"), ("gpt2", True, "float32"), ("gpt2", False, "float32"),
    ("llama", False, "float32"), ("qwen2", False, "float32"), ("mistral", False, "float32"),
    ("bert", True, "bfloat16"), ("gpt2", True, "bfloat16"), ("llama", False, "bfloat16"),
    ("roberta", True, "float32"), ("electra", True, "float32")])
def test_block_formulas_match_autograd(tiny_models, family, dropout, dtype):
    """What a block keeps for backward and what its forward allocates, counted
    on a real forward, equal the formulas: an inner block (gradients flow
    through it, its LoRA trains), the lowest trained one, and one below it."""
    B, S, rank = 2, 16, 8
    config, saved, allocated = _forward_accounting(tiny_models(family), dropout, trained={1, 3}, batch=B,
                                                   seq_len=S, dtype=getattr(torch, dtype))
    shape = ModelShape.from_config(config, num_labels=3)
    half, elem = dtype != "float32", 4 if dtype == "float32" else 2
    tokens = B * S

    def nbytes(count):
        return tokens * (count[0] * elem + count[1] * 4)

    lora = (0, act.lora_per_token(shape, rank, half))
    assert 0 not in saved  # below the lowest trained block nothing is kept
    lowest = act.block_per_token(shape, S, lowest=True, half=half)
    assert saved[1] == nbytes(lowest) + nbytes(lora) + act.rotary_bytes(shape, S, elem)
    # Block 3 (top segment) is an inner block; its count also holds the head's.
    inner = act.block_per_token(shape, S, lowest=False, half=half)
    head = act.head_bytes(shape, B, S, elem, half)
    assert saved[3] == pytest.approx(nbytes(inner) + nbytes(lora) + head, rel=0.02, abs=64)
    assert allocated[1] == pytest.approx(nbytes(act.block_allocated_per_token(shape, S, rank, half)), abs=64)


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


def test_model_types_without_a_checked_formula_are_refused():
    from conftest import tiny_config

    with pytest.raises(ValueError, match="no checked activation formula for model type 'qwen3'.*covers bert"):
        ModelShape.from_config(tiny_config("qwen3"))


def test_plan_refuses_nonsense(minilm_shape):
    with pytest.raises(ValueError, match="rank"):
        Plan(1, 1, 0, 8, 64)
    with pytest.raises(ValueError, match="dtype"):
        Plan(1, 1, 8, 8, 64, dtype="int8")
    with pytest.raises(ValueError, match="no block for the server"):
        predict_memory(minilm_shape, Plan(3, 3, 8, 8, 64), runtime=RUNTIME)
    with pytest.raises(ValueError, match="do not exist"):
        predict_memory(minilm_shape, Plan(1, 1, 8, 8, 64, frozenset({9})), runtime=RUNTIME)


# ---------------------------------------------------------------- time


class _Link(nn.Module):
    """Stands for the server and keeps the graph whole, as the client's
    RemoteBlock does: the bottom segment runs backward when it trains."""

    def forward(self, hidden, *args, **kwargs):
        return (hidden if hidden.requires_grad else hidden.detach().requires_grad_()) * 1.0


@pytest.mark.parametrize("family", ["bert", "gpt2"])
@pytest.mark.parametrize("trained", [{0, 1, 3}, {1, 3}, {3}])
def test_step_flops_match_counted_flops(tmp_path, family, trained):
    """step_flops equals the matrix-product FLOPs torch counts over one client
    step (forward and backward), within 5%. Attention dropout keeps SDPA on its
    math path, whose products the counter sees."""
    from torch.utils.flop_counter import FlopCounterMode

    from conftest import save_tiny

    wide = dict(n_embd=64) if family == "gpt2" else dict(hidden_size=64, intermediate_size=256)
    seg = build_segment(save_tiny(family, tmp_path / family, **wide), CLIENT, Cut(2, 1), dropout=True, num_labels=3)
    seg.blocks()[2] = _Link()
    heads = seg.family.trained_heads("classification")
    place(seg.model, torch.device("cpu"), heads)
    model = attach_lora(seg.model, LoraSpec(8, 16.0), seg.family, "classification", 0, modules_to_save=heads)
    set_trainable(model, "both", modules={m for m in lora_layers(model) if block_of(m) in trained})
    B, S = 4, 32
    with FlopCounterMode(display=False) as counter:
        out = model(input_ids=torch.randint(3, 90, (B, S)), attention_mask=torch.ones(B, S, dtype=torch.long),
                    labels=torch.zeros(B, dtype=torch.long))
        out.loss.backward()
    shape = ModelShape.from_config(seg.config, num_labels=3)
    assert step_flops(shape, Plan(2, 1, 8, B, S, frozenset(trained))) == \
        pytest.approx(counter.get_total_flops(), rel=0.05)


def test_step_time_is_compute_plus_link_plus_round_trips(minilm_shape):
    from types import SimpleNamespace

    plan = Plan(1, 1, 8, 8, 64, frozenset({0, 5}))
    device = SimpleNamespace(gflops=lambda dtype: 50.0, uplink_mbps=20.0, downlink_mbps=100.0, rtt_ms=40.0)
    t = predict_step_time(minilm_shape, plan, device)
    assert t.compute == pytest.approx(step_flops(minilm_shape, plan) / 50e9)
    up, down = step_bytes(minilm_shape, plan)
    assert t.network == pytest.approx(up * 8 / 20e6 + down * 8 / 100e6 + 2 * 0.040)
    assert predict_step_time(minilm_shape, plan, device, server_seconds=0.5).total == pytest.approx(t.total + 0.5)
    slower = SimpleNamespace(gflops=lambda dtype: 25.0 if dtype == "float32" else 100.0, uplink_mbps=10.0,
                             downlink_mbps=100.0, rtt_ms=40.0)
    assert predict_step_time(minilm_shape, plan, slower).compute == pytest.approx(2 * t.compute)
    assert predict_step_time(minilm_shape, Plan(**{**plan.__dict__, "dtype": "float16"}), slower).compute < t.compute
    # Training lower blocks costs backward compute; a server block costs the client none.
    assert step_flops(minilm_shape, Plan(3, 1, 8, 8, 64, frozenset({0}))) > \
        step_flops(minilm_shape, Plan(3, 1, 8, 8, 64, frozenset({2}))) > \
        step_flops(minilm_shape, Plan(3, 1, 8, 8, 64, frozenset({5}))) == \
        step_flops(minilm_shape, Plan(3, 1, 8, 8, 64, frozenset({3, 5})))


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


# ---------------------------------------------------------------- real clients


def _wide(family: str, folder):
    """A 4-block model 256 wide with a small vocabulary: its activations are a
    real share of a client's peak, its weights are not."""
    from conftest import save_tiny

    if family == "gpt2":
        return save_tiny(family, folder, n_embd=256, n_inner=1024, n_head=4, vocab_size=1000, n_positions=256)
    return save_tiny(family, folder, hidden_size=256, intermediate_size=1024, num_attention_heads=4,
                     vocab_size=1000, max_position_embeddings=256)


REAL_PLANS = [("bert", Plan(2, 1, 8, 24, 128, frozenset({0, 1, 3}))),
              ("bert", Plan(1, 1, 16, 32, 112, frozenset({3}))),  # only the top segment trains
              ("gpt2", Plan(1, 2, 8, 12, 96, frozenset({0, 2, 3})))]


def test_predicted_peak_matches_real_clients(tmp_path):
    """Real client processes, each training two steps through a server: the
    predicted peak is within 20% of the measured one (VmHWM of the client
    process). The clients run at once, each against its model's server."""
    from concurrent.futures import ThreadPoolExecutor

    from conftest import threaded_server
    from edge.measured import measure_plan
    from profiles.runtime import runtime_baseline
    from split.partition import load_config

    folders = {family: _wide(family, tmp_path / family) for family in ("bert", "gpt2")}
    shapes = {f: ModelShape.from_config(load_config(folder, "classification", 3, True), num_labels=3)
              for f, folder in folders.items()}
    with threaded_server(folders["bert"], "1,1", num_labels=3) as (bert, _), \
            threaded_server(folders["gpt2"], "1,1", num_labels=3) as (gpt2, _), ThreadPoolExecutor(4) as pool:
        endpoints = {"bert": bert, "gpt2": gpt2}
        runtime = pool.submit(runtime_baseline, 1)
        runs = [pool.submit(measure_plan, endpoints[f], str(folders[f]), plan, steps=2, threads=1, num_labels=3)
                for f, plan in REAL_PLANS]
        measured = [run.result()["peak_rss"] for run in runs]
        runtime = runtime.result()
    for (family, plan), peak in zip(REAL_PLANS, measured):
        predicted = predict_memory(shapes[family], plan, runtime=runtime).total
        assert peak - runtime > 0.25 * peak  # the plan's own part is a real share
        assert predicted == pytest.approx(peak, rel=0.20), (family, plan, predicted / 2**20, peak / 2**20)


def test_shape_of_a_language_model_head():
    """A head tied to the token embedding costs nothing more; an untied one its
    vocabulary x width; the caller's config is left as it was."""
    from transformers import GPT2Config, LlamaConfig

    tied = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=500)
    assert ModelShape.from_config(tied, task="causal-lm").head_params == 0
    untied = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         vocab_size=500, tie_word_embeddings=False)
    assert ModelShape.from_config(untied, task="causal-lm").head_params == 500 * 64
    labels = untied.num_labels
    assert ModelShape.from_config(untied, num_labels=7).head_params == 7 * 64
    assert untied.num_labels == labels
