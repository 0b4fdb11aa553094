"""The token embedding in 8 or 4 bits (split/quant_embedding.py): bitsandbytes'
lookups are the format's own dequantization of the rows read, within the
format's error of the float table; the embedding is quantized as soon as it
loads, before any block; a head tied to it on the client keeps it float32,
and the client says so; widths the 4-bit lookup cannot serve are refused."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from conftest import VOCAB, save_tiny
from split import quant, quant_embedding
from split.partition import CLIENT, Cut, build_segment
from split.quant import QuantizeError, quantizer_for
from split.quant_embedding import is_quantized_embedding, quantize_embedding, reference_lookup

CPU = torch.device("cpu")
# Relative error of a quantized table of standard normal rows against the float one.
BOUND = {"8bit": 1e-2, "4bit": 0.12}
WIDE = {"llama": dict(hidden_size=64, intermediate_size=128, head_dim=16), "gpt2": dict(n_embd=64),
        "bert": dict(hidden_size=64, intermediate_size=128)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(family, task) -> folder of a tiny model 64 wide (built on first use)."""
    cache = {}

    def get(family: str, task: str = "classification"):
        if (family, task) not in cache:
            cache[family, task] = save_tiny(family, tmp_path_factory.mktemp(f"{family}-{task}"), task, **WIDE[family])
        return cache[family, task]

    return get


def segment(folder, mode: str, task: str = "classification", cut: Cut = Cut(1, 1)):
    quantizer = quantizer_for(mode, CPU, torch.float32)
    seg = build_segment(folder, CLIENT, cut, task=task, num_labels=3, dropout=False, on_loaded=quantizer)
    if quantizer is not None:
        quantizer.finish(seg.model)
    return seg, quantizer


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
@pytest.mark.parametrize("width", [64, 384])  # a tiny model's and MiniLM's widths
def test_lookups_are_the_formats_dequantization_within_its_error(mode, width):
    rows = 300
    dense = nn.Embedding(rows, width, _weight=torch.randn(rows, width, generator=torch.Generator().manual_seed(0)))
    layer = quantize_embedding(dense, mode, CPU, torch.float32)
    assert is_quantized_embedding(layer) and not any(p.requires_grad for p in layer.parameters())
    ids = torch.randint(0, rows, (4, 17), generator=torch.Generator().manual_seed(1))
    out = layer(ids)
    assert out.dtype == torch.float32 and out.shape == (4, 17, width)
    torch.testing.assert_close(out, reference_lookup(layer, ids), rtol=1e-6, atol=1e-6)
    assert 0 < rel(out, dense(ids).detach()) < BOUND[mode]
    # The whole table, held in its quantized layout: 1 byte or half a byte a weight, and the scales.
    held = quant.tensor_bytes(layer)
    assert held < rows * width * (1.1 if mode == "8bit" else 0.6)
    # A state dict (peft reads one to save an adapter) holds the quantized bytes.
    state = layer.state_dict()
    assert state["weight"].dtype in (torch.int8, torch.uint8)


def test_four_bit_widths_the_lookup_cannot_serve_are_refused(monkeypatch):
    with pytest.raises(QuantizeError, match=r"token embedding model.embed_tokens is 96 wide, not a multiple of 64.*"
                                            r"--quantize 8bit or --quantize none"):
        quant_embedding.check_embedding_width(96, "4bit", CPU, "model.embed_tokens")
    quant_embedding.check_embedding_width(96, "8bit", CPU, "model.embed_tokens")  # int8 rows: any width
    # A lookup that differs from the format's dequantization (checked per width and device) is refused.
    monkeypatch.setattr(quant, "_CHECKED_WIDTHS", set())
    monkeypatch.setattr(quant_embedding, "reference_lookup", lambda layer, ids: torch.zeros(*ids.shape, 128))
    with pytest.raises(QuantizeError, match="looks up 4bit embedding rows 128 wide .*wte.* wrongly on cpu"):
        quant_embedding.check_embedding_width(128, "4bit", CPU, "transformer.wte")


@pytest.mark.parametrize("family", ["llama", "bert", "gpt2"])
def test_a_client_segment_quantizes_its_token_embedding_as_it_loads(models, family, monkeypatch):
    """The token embedding is quantized by the on_loaded hook the moment its
    tensor is in, while every block's weight is still unread; its lookups stay
    within the format's error of the float embedding's."""
    folder = models(family)
    ref = segment(folder, "none")[0].model.get_input_embeddings()
    ids = torch.randint(3, VOCAB, (3, 11), generator=torch.Generator().manual_seed(0))
    seen = []
    real_step = quant.Quantizer._embedding_step

    def step(self, model):
        """Record, when this call quantizes the embedding, whether every block tensor was still unread."""
        before = is_quantized_embedding(model.get_input_embeddings())
        blocks = [p for n, p in model.named_parameters() if any(f".{b}." in n for b in ("layers", "layer", "h"))]
        unread = all(p.device.type == "meta" for p in blocks)
        real_step(self, model)
        if not before and is_quantized_embedding(model.get_input_embeddings()):
            seen.append(unread)

    monkeypatch.setattr(quant.Quantizer, "_embedding_step", step)
    for mode in ("8bit", "4bit"):
        seen.clear()
        seg, quantizer = segment(folder, mode)
        emb = seg.model.get_input_embeddings()
        assert is_quantized_embedding(emb), mode
        assert seen == [True], mode  # once, before any block tensor was read
        assert quantizer.embedding[3] is None
        out = emb(ids)
        assert 0 < rel(out, ref(ids).detach()) < BOUND[mode], mode
        assert any("the token embedding" in line and f"({VOCAB} x 64) in" in line for line in quantizer.describe())


def test_a_tied_language_model_head_keeps_the_embedding_float_and_the_client_says_so(models, caplog):
    """GPT-2 as a causal LM ties its head to the token embedding: a client that
    computes the head keeps the table float32 (one tensor, head and lookup)
    and says why; a two-part client, whose head is on the server, quantizes it."""
    folder = models("gpt2", "causal-lm")
    with caplog.at_level(logging.INFO, logger="split.quant"):
        seg, quantizer = segment(folder, "4bit", task="causal-lm", cut=Cut(1, 1))
    wte = seg.model.get_input_embeddings()
    assert type(wte) is nn.Embedding and wte.weight.dtype == torch.float32
    assert seg.model.lm_head.weight is wte.weight
    assert quantizer.count > 0  # the blocks are quantized all the same
    assert "transformer.wte (96 x 64) stays float32: it is tied to the language-model head lm_head" in caplog.text
    seg, quantizer = segment(folder, "4bit", task="causal-lm", cut=Cut(1, 0))
    assert is_quantized_embedding(seg.model.get_input_embeddings())
    assert quantizer.embedding[3] is None


def test_an_embedding_that_computes_more_than_a_lookup_stays_float(models):
    class Scaled(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 2.0

    seg, _ = segment(models("llama"), "none")
    model = seg.model
    model.model.embed_tokens = Scaled(VOCAB, 64)
    assert "computes more than a lookup" in quant_embedding.keep_reason(model, "model.embed_tokens")
