"""Quantized frozen weights (split/quant.py): a quantized client segment
computes close to the float one, forward and backward, and trains only LoRA
and the head; it holds the bytes the cost model says; a loopback run with
4-bit client weights trains and saves a standard adapter; what cannot work is
refused with an error that says what to do."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, LlamaConfig

from conftest import VOCAB, minilm_path, random_batch, save_tiny, threaded_server
from profiles.cost import ModelShape, Plan, predict_memory
from profiles.planfile import PlanFileError, client_plan
from profiles.planner import PlanningError, plan_clients
from profiles.quantized import (block_linear_params, int8_inputs_per_token, quantized_embedding_bytes,
                                quantized_linear_bytes)
from profiles.schema import builtin_profiles
from split import quant
from split.lora import LoraSpec, attach_lora, fold_delta, lora_layers
from split.partition import CLIENT, Cut, build_segment, load_config
from split.protocol import FederationSettings
from split.quant import QuantizeError, check_runs, quantizer_for, tensor_bytes

CPU = torch.device("cpu")
# Tiny models 64 wide: bitsandbytes' CPU kernel needs 4-bit layers' input widths in multiples of 64.
WIDE = {"llama": dict(hidden_size=64, intermediate_size=128, head_dim=16), "gpt2": dict(n_embd=64),
        "bert": dict(hidden_size=64, intermediate_size=128)}


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory):
    """family -> folder of a tiny classification model 64 wide (built on first use)."""
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = save_tiny(family, tmp_path_factory.mktemp(f"{family}-64"), **WIDE[family])
        return cache[family]

    return get
# Relative error of a quantized client segment against the float one (two
# blocks of a tiny random model, LoRA on): 8 bits about 1e-2, 4 bits about 1e-1.
BOUND = {"8bit": 3e-2, "4bit": 2.5e-1}


def segment(folder, mode: str, dtype=torch.float32, cut: Cut = Cut(1, 1)):
    """A client segment of ``folder`` with its blocks quantized to ``mode``."""
    quantizer = quantizer_for(mode, CPU, dtype)
    seg = build_segment(folder, CLIENT, cut, num_labels=3, dropout=False, dtype=dtype, on_loaded=quantizer)
    if quantizer is not None:
        quantizer.finish(seg.model)
    return seg, quantizer


def with_lora(seg):
    """LoRA (rank 4) on the segment, B drawn from a seeded generator so LoRA counts in the output."""
    heads = seg.family.trained_heads("classification")
    model = attach_lora(seg.model, LoraSpec(4, 8.0), seg.family, "classification", 0, modules_to_save=heads)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, layer in sorted(lora_layers(model).items()):
            b = layer.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
    return model


def top_output_and_grads(seg, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The top client block's output and the gradient of every LoRA factor (flattened, in name order)."""
    out = {}

    def keep(module, args, output):
        out["h"] = output[0] if isinstance(output, tuple) else output

    handle = seg.blocks()[seg.num_layers - 1].register_forward_hook(keep)
    model.train()
    model.zero_grad(set_to_none=True)
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    handle.remove()
    h = out["h"].float()
    # A fixed random projection: a LayerNorm output's mean square is constant, its projection is not.
    (h * torch.randn(h.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    grads = [p.grad.flatten() for n, p in sorted(model.named_parameters()) if "lora_" in n and p.grad is not None]
    return out["h"].detach().float(), torch.cat(grads)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_quantized_segment_computes_close_to_float_and_trains_only_lora_and_head(wide_models, family):
    folder = wide_models(family)
    batch = random_batch(0, VOCAB)
    ref_seg, _ = segment(folder, "none")
    h_ref, g_ref = top_output_and_grads(ref_seg, with_lora(ref_seg), batch)
    # Every linear layer of the client's blocks (GPT-2's Conv1D included), nothing else.
    linears = sum(len(ModelShape.from_config(ref_seg.config, 3).block_linears[b]) for b in (0, 3))
    for mode in ("8bit", "4bit"):
        seg, quantizer = segment(folder, mode)
        model = with_lora(seg)
        assert quantizer.count == linears
        assert sum(quant.is_quantized(m) for m in model.modules()) == linears
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n or ".modules_to_save." in n for n in trainable)
        h, g = top_output_and_grads(seg, model, batch)
        assert 0 < rel(h, h_ref) < BOUND[mode], mode  # not the checkpoint's weights: close, never exact
        assert rel(g, g_ref) < BOUND[mode], mode
        # An evaluation forward between training steps (a client evaluates every
        # round) leaves the training path as it was: the same gradients again.
        model.eval()
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        h_again, g_again = top_output_and_grads(seg, model, batch)
        assert torch.equal(h_again, h) and torch.allclose(g_again, g, rtol=1e-5, atol=1e-7), mode


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_quantized_bytes_are_what_the_cost_model_counts(wide_models, family):
    """The tensors a quantized side holds (scales and codebooks included) are
    smaller than the float ones by exactly what profiles/quantized.py counts
    for the blocks' linear layers and the token embedding, and
    predict_memory's weights (with the head) are those bytes."""
    folder = wide_models(family)
    shape = ModelShape.from_config(load_config(folder, "classification", 3, True), 3)
    blocks = (0, shape.num_layers - 1)
    ref = segment(folder, "none")[0].model
    ref_bytes = tensor_bytes(ref)
    buffers = sum(b.numel() * b.element_size() for b in ref.buffers())  # rotary tables: no weights
    for mode in ("none", "8bit", "4bit"):
        held = tensor_bytes(segment(folder, mode)[0].model)
        if mode != "none":
            linears = [lin for b in blocks for lin in shape.block_linears[b]]
            rows, width = shape.token_embedding
            assert shape.embedding_lookup and not shape.tied_head
            expected = ref_bytes - 4 * block_linear_params(tuple(linears)) + sum(
                quantized_linear_bytes(o, i, mode) for o, i in linears) - 4 * rows * width + quantized_embedding_bytes(
                rows, width, mode)
            assert held == expected < ref_bytes
        parts = predict_memory(shape, Plan(1, 1, 4, 2, 8, frozenset({0}), weights=mode.replace("none", "float32")),
                               runtime=0).parts
        assert parts["weights"] + parts["head"] // 2 == held - buffers


def test_eight_bit_inputs_kept_for_backward_match_the_count(wide_models, monkeypatch):
    """bitsandbytes' 8-bit training matmul keeps its input for backward; the
    tensors it keeps that nothing else keeps are what the cost model adds per
    block: a trained lowest block, an untrained inner block, a trained top block."""
    import bitsandbytes.autograd._functions as functions

    seg, _ = segment(wide_models("llama"), "8bit", cut=Cut(2, 1))
    model = with_lora(seg)
    trained = {0, 3}
    for name, layer in lora_layers(model).items():
        on = int(name.split(".layers.")[1].split(".")[0]) in trained
        layer.lora_A["default"].weight.requires_grad_(on)
        layer.lora_B["default"].weight.requires_grad_(on)
    kept, where, saved = {}, [None], set()
    forward = functions.MatMul8bitFp.forward

    def spy(ctx, A, *args):
        kept.setdefault(where[0], []).append(A)
        return forward(ctx, A, *args)

    monkeypatch.setattr(functions.MatMul8bitFp, "forward", staticmethod(spy))
    for i, block in enumerate(seg.blocks()):
        block.register_forward_pre_hook(lambda m, a, i=i: where.__setitem__(0, i))
    batch = random_batch(0, VOCAB)

    def pack(t):
        saved.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.train()
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    tokens = batch["input_ids"].numel()
    shape = ModelShape.from_config(seg.config, 3)

    def extra(block: int) -> int:
        """fp32 elements per token kept only by the block's 8-bit layers (a recorded input requires grad)."""
        only = {a.untyped_storage().data_ptr(): a.untyped_storage().nbytes() for a in kept[block]
                if a.requires_grad and a.untyped_storage().data_ptr() not in saved}
        return sum(only.values()) // (4 * tokens)

    d, m = shape.hidden, shape.intermediate
    assert extra(0) == int8_inputs_per_token(d, m, lowest=True, lora_trained=True, half=False)
    assert extra(1) == int8_inputs_per_token(d, m, lowest=False, lora_trained=False, half=False) == 2 * d + m
    assert extra(3) == int8_inputs_per_token(d, m, lowest=False, lora_trained=True, half=False) == d + m


def test_a_loopback_run_with_four_bit_client_weights_trains_and_saves_a_standard_adapter(tmp_path, capsys):
    """`fedsplit client --quantize 4bit` through a server whose backbone is in
    8 bits: the loss on a fixed batch goes down, and the saved adapter (GPT-2:
    Conv1D layers, so fan_in_fan_out) loads with PeftModel.from_pretrained on
    the unquantized model, holding exactly the LoRA tensors both sides trained."""
    from edge.client import ClientConfig, SplitClient
    from split.cli import main

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    tok.save_pretrained(tmp_path / "gpt2")
    gpt2 = save_tiny("gpt2", tmp_path / "gpt2", vocab_size=len(tok), **WIDE["gpt2"])
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"{w} is here today", "label": "abc"[i % 3]}) + "\n"
                            for i, w in enumerate(["red", "blue", "green", "apple", "pear", "plum"] * 4)))
    with threaded_server(gpt2, "1,1", dropout=False, quantize="8bit") as (endpoint, server):
        hosted = sum(len(ModelShape.from_config(server.segment.config, 3).block_linears[b]) for b in (1, 2))
        assert sum(quant.is_quantized(m) for m in server.segment.model.modules()) == hosted
        out = tmp_path / "adapter"
        assert main(["client", "--server", endpoint, "--model", str(gpt2), "--data", str(data), "--steps", "2",
                     "--no-progress", "--no-dropout", "--quantize", "4bit", "--out", str(out), "--id", "q"]) == 0
        capsys.readouterr()
        config = ClientConfig(server=endpoint, model=str(gpt2), num_labels=3, lora=LoraSpec(4, 8.0), lr=2e-2,
                              dropout=False, quantize="4bit", client_id="q2")
        with SplitClient(config) as client:
            batch = random_batch(0, 200)
            before = client.loss(batch)
            for _ in range(6):
                client.train_step(batch)
            assert client.loss(batch) < before
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["fan_in_fan_out"] is True  # the unquantized base model's Conv1D orientation
    base = AutoModelForSequenceClassification.from_pretrained(gpt2)
    loaded = PeftModel.from_pretrained(base, out)
    from safetensors.torch import load_file

    saved = load_file(str(out / "adapter_model.safetensors"))
    state = {k.replace(".default", ""): v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert {k for k in saved if "lora_" in k} == set(state)
    assert all(torch.equal(saved[k], state[k]) for k in state)
    assert any(bool(v.abs().sum()) for k, v in saved.items() if "lora_B" in k)  # it trained


# ---------------------------------------------------------------- refusals


def test_missing_or_broken_bitsandbytes_is_a_clear_error(monkeypatch):
    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(quant.importlib, "import_module", missing)
    with pytest.raises(QuantizeError, match=r"needs bitsandbytes, which is not installed: pip install "
                                            r"'fedsplit\[quant\]'.*or run with --quantize none"):
        check_runs("4bit", CPU)

    def broken(name):
        raise OSError("libbitsandbytes_cpu.so: cannot open shared object file")

    monkeypatch.setattr(quant.importlib, "import_module", broken)
    with pytest.raises(QuantizeError, match="installed but does not import .*OSError.*reinstall it"):
        check_runs("8bit", CPU)
    check_runs("none", CPU)  # nothing to import without quantization


def test_bitsandbytes_that_cannot_run_on_the_device_is_a_clear_error(monkeypatch):
    with pytest.raises(QuantizeError, match="runs on cpu or cuda devices; this side computes on mps"):
        check_runs("4bit", torch.device("mps"))
    monkeypatch.setattr(quant, "_native_library_missing", lambda bnb: True)
    with pytest.raises(QuantizeError, match="has no CUDA library for this torch.*pip install -U bitsandbytes"):
        check_runs("4bit", torch.device("cuda"))

    def failing(mode, device, dtype):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setattr(quant, "_probe", failing)
    with pytest.raises(QuantizeError, match="cannot run 8bit layers on cpu .*no kernel image.*--quantize none"):
        check_runs("8bit", CPU)
    monkeypatch.setattr(quant, "_probe", lambda mode, device, dtype: 3.0)
    with pytest.raises(QuantizeError, match="relative error of 3"):
        check_runs("4bit", CPU)


def test_four_bit_widths_the_kernels_compute_wrongly_are_refused(monkeypatch):
    """Each 4-bit layer width is checked on the device against the NF4 format
    itself before a layer is quantized; where bitsandbytes' dequantization
    differs (its CPU kernel does for widths that are multiples of 16 but not
    of 64), the model is refused for 4 bits."""
    bnb = quant.load_bitsandbytes()
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    reference = quant.nf4_reference(packed, state)
    assert torch.equal(bnb.functional.dequantize_4bit(packed, state).reshape(-1), reference)
    assert rel(reference, weight.reshape(-1)) < 0.12  # NF4's own error on normal weights
    dequantize = bnb.functional.dequantize_4bit
    monkeypatch.setattr(bnb.functional, "dequantize_4bit", lambda p, s: dequantize(p, s) * 1.5)
    with pytest.raises(QuantizeError, match="computes 4-bit layers 320 inputs wide .*down_proj.* wrongly on cpu.*"
                                            "multiples of 64. Use --quantize 8bit"):
        quant.check_nf4_width(320, CPU, "model.layers.0.mlp.down_proj")


def test_bad_values_are_refused(capsys):
    from edge.client import ClientConfig
    from split.cli import main

    with pytest.raises(QuantizeError, match="--quantize '3bit': use one of none, 8bit, 4bit"):
        quant.check_mode("3bit")
    with pytest.raises(QuantizeError, match="use one of none, 8bit, 4bit"):
        ClientConfig(quantize="int4")
    for command in ("client", "server", "demo"):
        with pytest.raises(SystemExit):
            main([command, "--quantize", "2bit"])
        assert "invalid choice: '2bit'" in capsys.readouterr().err
    # A CUDA device asked for on a machine without one fails before bitsandbytes is tried.
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA device"):
            ClientConfig(device="cuda", quantize="4bit")


def test_updates_to_quantized_frozen_weights_are_refused(wide_models):
    from server.rounds import FederationConfig
    from server.service import ServerConfig

    seg, _ = segment(wide_models("llama"), "4bit")
    model = attach_lora(seg.model, LoraSpec(4, 8.0), seg.family, "classification", 0)
    module = next(iter(lora_layers(model)))
    with pytest.raises(QuantizeError, match="update to the frozen weight of .*q_proj.*--quantize none"):
        fold_delta(model, module, torch.zeros(64, 64))
    for fed, what in ((FederationConfig(strategy="flora"), "--strategy flora folds"),
                      (FederationConfig(strategy="fedex"), "--strategy fedex folds"),
                      (FederationConfig(init="svd"), "--init svd"),
                      (FederationConfig(reinit_every=2), "--reinit-every")):
        assert fed.settings().frozen_updates
        with pytest.raises(QuantizeError, match=f"--quantize 8bit with {what}"):
            ServerConfig(quantize="8bit", federation=fed)
        with pytest.raises(QuantizeError, match="federation .* updates frozen weights"):
            quant.check_federation(FederationSettings.from_meta(fed.settings().to_meta(), "join reply"))
    plain = FederationConfig(strategy="flexlora").settings()
    assert not plain.frozen_updates
    quant.check_federation(plain)
    with pytest.raises(Exception, match="'frozen_updates' must be true or false"):
        FederationSettings.from_meta({**plain.to_meta(), "frozen_updates": "yes"}, "join reply")


# ---------------------------------------------------------------- cost model and planner


LLAMA_7B_BLOCKS = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=3, num_attention_heads=32,
                              num_key_value_heads=32, vocab_size=32000, num_labels=2, pad_token_id=0)


@pytest.fixture(scope="module")
def llama_shape():
    return ModelShape.from_config(LLAMA_7B_BLOCKS, num_labels=2)


def test_plan_weights(llama_shape):
    base = dict(k1=1, k2=1, rank=8, batch=2, seq_len=64, trainable=frozenset({0, 2}))
    assert Plan(**base, dtype="bfloat16").weights == "bfloat16"  # unquantized weights are held in the dtype
    with pytest.raises(ValueError, match="weights must be one of"):
        Plan(**base, weights="3bit")
    with pytest.raises(ValueError, match="held in the plan's dtype"):
        Plan(**base, weights="bfloat16")
    fp32, q8, q4 = (predict_memory(llama_shape, Plan(**base, weights=w), runtime=0) for w in ("float32", "8bit", "4bit"))
    linear = sum(block_linear_params(llama_shape.block_linears[b]) for b in (0, 2))
    assert fp32.parts["weights"] - q4.parts["weights"] > 3.4 * linear  # 4 bytes -> about half a byte each
    assert fp32.parts["weights"] - q8.parts["weights"] > 2.9 * linear
    assert q8.parts["activations"] > fp32.parts["activations"]  # the inputs 8-bit layers keep
    assert q4.parts["transient"] == fp32.parts["transient"] + 11008 * 4096 * 4  # one dequantized MLP matrix


def test_planner_quantizes_where_memory_is_short_and_bitsandbytes_works(llama_shape, monkeypatch):
    from dataclasses import replace

    monkeypatch.setattr("profiles.cost.runtime_baseline", lambda: 400 << 20)  # a fixed runtime: no subprocess
    pi5 = builtin_profiles()["pi5"]  # bitsandbytes = true
    small = replace(pi5, name="small board", memory_gb=2.0)
    no_bnb = replace(small, name="no bitsandbytes", bitsandbytes=False)
    big = replace(pi5, name="big board", memory_gb=64.0)
    choices = ("float32", "8bit", "4bit")
    plans = {p.device: p for p in plan_clients(llama_shape, [small, big], seq_len=64, weights=choices)}
    assert plans["big board"].weights == "float32" and plans["big board"].quantize == "none"
    assert plans["small board"].weights in ("8bit", "4bit")
    assert plans["small board"].predicted_peak_bytes <= 2.0 * (1 << 30) * 0.85
    assert plans["small board"].plan().weights == plans["small board"].weights
    # The default keeps every device unquantized, and one that needs bitsandbytes but lacks it cannot fit.
    with pytest.raises(PlanningError, match="cannot fit even the smallest plan"):
        plan_clients(llama_shape, [small], seq_len=64)
    with pytest.raises(PlanningError, match="'no bitsandbytes'.*float32 weights"):
        plan_clients(llama_shape, [no_bnb], seq_len=64, weights=choices)
    with pytest.raises(PlanningError, match="bitsandbytes does not work there.*add float32"):
        plan_clients(llama_shape, [no_bnb], seq_len=64, weights=("4bit",))


def test_plan_entries_carry_their_weights(llama_shape, monkeypatch):
    from dataclasses import asdict

    monkeypatch.setattr("profiles.cost.runtime_baseline", lambda: 400 << 20)
    from edge.planned import planned_options

    pi5 = builtin_profiles()["pi5"]
    plan = plan_clients(llama_shape, [pi5], seq_len=64, weights=("4bit",))[0]
    entry = {k: v for k, v in asdict(plan).items() if k != "device"}
    assert client_plan(plan.device, entry, "plan") == plan
    assert planned_options(plan, 3).quantize == "4bit"
    old = {k: v for k, v in entry.items() if k != "weights"}  # a plan written before weights existed
    assert client_plan(plan.device, old, "plan").weights == "float32"
    with pytest.raises(PlanFileError, match="field 'weights' must be the entry's dtype"):
        client_plan(plan.device, {**entry, "weights": "bfloat16"}, "plan")
    assert math.isfinite(plan.predicted_step_s)
