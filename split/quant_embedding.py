"""The token embedding in 8 or 4 bits with bitsandbytes (``--quantize``).

A large vocabulary makes the token embedding a big share of a client's
frozen weights (Llama-2's 32,000 x 4,096 is 500 MiB in float32). Where it is
a frozen lookup, ``--quantize`` holds it in bitsandbytes' embedding layouts:

- ``8bit``: ``Embedding8bit``, one int8 per weight and one float32 absmax
  per row (a row is one token's vector), as the 8-bit linear layers' rows;
- ``4bit``: ``Embedding4bit`` in NF4, blocks of 64 weights (the linear
  layers' blocksize). Its block scales stay float32: bitsandbytes' embedding
  looks up each token's block scales by row, which the linear layers' double
  quantization (scales of the scales in blocks of 256) would misalign. A
  lookup dequantizes only the rows it reads, which needs a width that is a
  multiple of 64; other widths are refused for 4 bits (bitsandbytes would
  dequantize the whole table at every lookup, and its CPU kernel computes
  those widths wrongly).

What stays in full precision, and why:

- a token embedding tied to a language-model head that this side computes
  (``tie_word_embeddings``, e.g. GPT-2 or a small Qwen2 as a causal LM with
  the client holding the head): the head multiplies every hidden state by the
  whole table, and QLoRA keeps the output layer in full precision; a client
  that does not hold the head (a two-part split) quantizes the embedding;
- a token embedding module that computes more than a lookup (a subclass of
  ``nn.Embedding`` with its own forward, e.g. a scaled embedding);
- position and token-type embeddings: a few hundred rows at most.

Each lookup's output is the dequantized rows in the segment's dtype.
``check_embedding_width`` compares bitsandbytes' lookup with the format's own
dequantization (``split.quant.nf4_reference``) on the side's device before
an embedding of that width is quantized.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from . import quant

EMBEDDING_DOUBLE_QUANT = False  # bitsandbytes' embedding looks up float32 block scales by row


def token_embedding_path(model: nn.Module) -> str | None:
    """Path of ``model``'s token embedding (``get_input_embeddings``), or None
    when this side holds none (the server)."""
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    for path, module in model.named_modules():
        if module is embedding:
            return path
    return None


def tied_partners(model: nn.Module, weight: str) -> list[str]:
    """Parameters ``model`` ties to the tensor ``weight`` (transformers'
    ``_tied_weights_keys``, honoured only under ``tie_word_embeddings``)
    that this side holds."""
    config = getattr(model, "config", None)
    if config is None or not getattr(config.get_text_config(), "tie_word_embeddings", False):
        return []
    tied = dict(getattr(model, "_tied_weights_keys", None) or {})
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    partners = [t for t, s in tied.items() if s == weight] + [s for t, s in tied.items() if t == weight]
    return sorted(p for p in partners if p != weight and p in names)


def keep_reason(model: nn.Module, path: str) -> str | None:
    """Why the token embedding at ``path`` stays in full precision, or None
    when it is a frozen lookup to quantize (module docstring)."""
    module = model.get_submodule(path)
    if type(module) is not nn.Embedding:
        return f"its module ({type(module).__name__}) computes more than a lookup"
    partners = tied_partners(model, f"{path}.weight")
    if partners:
        heads = ", ".join(p.rpartition(".")[0] for p in partners)
        return (f"it is tied to the language-model head {heads} that this side computes in full precision "
                "(a two-part split, with the head on the server, quantizes it)")
    return None


def check_embedding_width(width: int, mode: str, device: torch.device, what: str) -> None:
    """Refuse a ``mode`` embedding ``width`` wide where bitsandbytes' lookup on
    ``device`` differs from the format's dequantization of the same rows."""
    if mode == "4bit" and width % quant.NF4_BLOCK:
        raise quant.QuantizeError(
            f"--quantize 4bit: the token embedding {what} is {width} wide, not a multiple of {quant.NF4_BLOCK}: "
            "bitsandbytes' 4-bit embedding would dequantize the whole table at every lookup (and its CPU kernel "
            "computes such widths wrongly). Use --quantize 8bit or --quantize none for this model")
    key = ("embedding", mode, width, str(device))
    if key in quant._CHECKED_WIDTHS:
        return
    rows = 8
    weight = torch.randn(rows, width, generator=torch.Generator().manual_seed(width))
    dense = nn.Embedding(rows, width, _weight=weight)
    layer = quantize_embedding(dense, mode, device, torch.float32)
    ids = torch.tensor([[5, 0, 7], [2, 2, 1]], device=device)
    expected = reference_lookup(layer, ids)
    got = layer(ids).float()
    if not torch.allclose(got, expected, rtol=1e-3, atol=1e-5):
        raise quant.QuantizeError(
            f"--quantize {mode}: bitsandbytes {getattr(quant.load_bitsandbytes(), '__version__', '?')} looks up "
            f"{mode} embedding rows {width} wide ({what}) wrongly on {device}. Use --quantize none for this model")
    quant._CHECKED_WIDTHS.add(key)


def reference_lookup(layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of a quantized embedding ``layer``, dequantized from its
    bytes by the format alone (float32): int8 x row absmax / 127, or NF4 via
    ``split.quant.nf4_reference``."""
    weight = layer.weight
    rows, width = layer.num_embeddings, layer.embedding_dim
    if hasattr(weight, "SCB"):
        table = weight.data.float() * (weight.SCB.float().unsqueeze(1) / 127.0)
    else:
        table = quant.nf4_reference(weight.data, weight.quant_state).reshape(rows, width)
    return table.to(ids.device)[ids]


@functools.cache
def _classes():
    """bitsandbytes' embeddings, able to appear in a state dict (peft reads
    the whole state dict when it saves an adapter; bitsandbytes' own refuse)."""
    bnb = quant.load_bitsandbytes()

    class Embedding8bit(bnb.nn.Embedding8bit):
        """``bitsandbytes.nn.Embedding8bit`` whose state dict holds its int8 rows and their absmax scales."""

        def _save_to_state_dict(self, destination, prefix, keep_vars):
            nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)
            scb = self.weight.SCB
            destination[prefix + "SCB"] = scb if keep_vars else scb.detach()

    class Embedding4bit(bnb.nn.Embedding4bit):
        """``bitsandbytes.nn.Embedding4bit`` whose state dict holds its packed weights and quantization state."""

        def _save_to_state_dict(self, destination, prefix, keep_vars):
            nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)
            for k, v in self.weight.quant_state.as_dict(packed=True).items():
                destination[prefix + "weight." + k] = v if keep_vars else v.detach()

    return Embedding8bit, Embedding4bit


def quantize_embedding(module: nn.Embedding, mode: str, device: torch.device,
                       compute_dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes embedding looking up what ``module`` looks up, its
    table quantized on ``device`` a few rows at a time; frozen. Its output is
    in ``compute_dtype``."""
    bnb = quant.load_bitsandbytes()
    device = torch.device(device)
    weight = module.weight.detach()
    rows, width = weight.shape
    eight, four = _classes()
    if mode == "8bit":
        layer = eight(rows, width, device="meta", dtype=compute_dtype)
        layer.weight = quant._int8_params(bnb, weight, device)
    elif mode == "4bit":
        layer = four(rows, width, dtype=compute_dtype, quant_type="nf4", device="meta")
        layer.weight = quant._nf4_params(bnb, weight.to(compute_dtype), device, layer,
                                         double_quant=EMBEDDING_DOUBLE_QUANT)
    else:
        raise quant.QuantizeError(f"quantize_embedding: mode must be 8bit or 4bit, got {mode!r}")
    layer.padding_idx = module.padding_idx
    return layer


def is_quantized_embedding(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 8- or 4-bit embedding."""
    import sys

    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, (bnb.nn.Embedding8bit, bnb.nn.Embedding4bit))
