"""Frozen weights in 8 or 4 bits with bitsandbytes, QLoRA-style.

``--quantize 8bit`` holds every linear layer of a side's blocks as a
bitsandbytes ``Linear8bitLt`` (LLM.int8(): int8 weights with one float32
absmax scale per output row; outlier threshold 6.0), ``--quantize 4bit`` as a
``Linear4bit`` in NF4 (4-bit NormalFloat in blocks of 64 weights, the blocks'
absmax scales themselves quantized to 8 bits: QLoRA's double quantization),
computing in the segment's dtype (float32, or the ``--dtype`` asked for).
The client quantizes its front and back blocks and, where it is a frozen
lookup, its token embedding (``split/quant_embedding.py``: bitsandbytes'
``Embedding8bit``/``Embedding4bit``); the server its backbone blocks. What
stays in full precision, and why:

- a token embedding tied to a language-model head the client computes, or
  one that computes more than a lookup (``split/quant_embedding.py``), and
  position and token-type embeddings (a few hundred rows);
- norms, biases, the pooler and the task head: small, and a trained head must
  be full precision for its optimizer;
- LoRA factors: float32, as everywhere in fedsplit.

Each linear layer (and the token embedding) is quantized as soon as the
checkpoint reader has loaded its tensors (``Quantizer`` is ``build_segment``'s ``on_loaded`` hook), a few
rows at a time, so a side never holds all its blocks in full precision at
once: while loading, it holds the quantized layers, one layer in full
precision and a few megabytes of quantization temporaries. GPT-2's ``Conv1D`` (weights stored in x out)
becomes a bitsandbytes linear layer of the transposed weight; peft then
attaches its bitsandbytes LoRA layers (``peft.tuners.lora.bnb``) to them, so
the adapter is the same standard adapter as on the unquantized model (its
``fan_in_fan_out`` stays the family's: it describes the base model a saved
adapter is loaded on).

bitsandbytes' CPU kernel dequantizes 4-bit layers whose input width is a
multiple of 16 but not of 64 otherwise than the NF4 format says (0.50: up to
40% relative error); every layer width is checked against the format on the
side's device before it is quantized (``check_nf4_width``), and such a model is
refused for 4 bits there. Real models' widths are multiples of 64.

Quantized frozen weights are not the checkpoint's weights: outputs differ from
an unquantized run's by the quantization error (about 1e-2 relative for
8 bits, 1e-1 for 4 bits on random weights), so nothing quantized is
bit-exact with an unquantized run. Updates to frozen weights (FLoRA's and
FedEx-LoRA's folded deltas, FeDeRA's SVD initialisation, FedLoRU's merges)
are refused on a quantized side: requantizing ``W + dW`` rounds away every
change smaller than half a quantization step, which a LoRA update almost
always is, so the update would be silently lost.
"""

from __future__ import annotations

import importlib
import logging
import math
import sys

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .families import family_for, get_module, join, set_module

log = logging.getLogger(__name__)

MODES = ("none", "8bit", "4bit")
INT8_THRESHOLD = 6.0  # LLM.int8()'s outlier threshold (bitsandbytes' and transformers' default)
NF4_BLOCK = 64  # weights per NF4 block, each with its own absmax scale
DOUBLE_QUANT = True  # the block scales in 8 bits (QLoRA's double quantization)
CHUNK_ELEMENTS = 1 << 18  # weights quantized at a time: small temporaries leave few heap holes behind
DEVICE_KINDS = ("cpu", "cuda")
INSTALL = "pip install 'fedsplit[quant]' (bitsandbytes >= 0.48)"


class QuantizeError(ValueError):
    """Quantized weights cannot be used as asked (the text says why and what to do)."""


def check_mode(mode: str) -> str:
    """``mode`` if it is one of ``MODES``, else a QuantizeError naming them."""
    if mode not in MODES:
        raise QuantizeError(f"--quantize {mode!r}: use one of {', '.join(MODES)}")
    return mode


def load_bitsandbytes():
    """The bitsandbytes module, imported; a QuantizeError naming the fix when
    it is missing or does not import."""
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError as exc:
        if getattr(exc, "name", None) == "bitsandbytes":
            raise QuantizeError(f"--quantize needs bitsandbytes, which is not installed: {INSTALL}, "
                                "or run with --quantize none") from None
        raise QuantizeError(f"bitsandbytes is installed but does not import ({type(exc).__name__}: {exc}); "
                            f"reinstall it ({INSTALL}) or run with --quantize none") from None
    except Exception as exc:  # noqa: BLE001 - a broken install fails in many ways; each means the same here
        raise QuantizeError(f"bitsandbytes is installed but does not import ({type(exc).__name__}: "
                            f"{_first_line(exc)}); reinstall it ({INSTALL}) or run with --quantize none") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def _native_library_missing(bnb) -> bool:
    """Whether bitsandbytes loaded a stand-in for its native library (no build for this torch's CUDA)."""
    ext = sys.modules.get("bitsandbytes.cextension")
    mock = getattr(ext, "ErrorHandlerMockBNBNativeLibrary", None)
    return mock is not None and isinstance(getattr(ext, "lib", None), mock)


def check_runs(mode: str, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
    """Refuse (QuantizeError naming what to do) unless bitsandbytes runs
    ``mode`` layers on ``device``: it must import, and a small quantized layer
    there must compute what its float twin computes, forward and backward,
    within the mode's error."""
    check_mode(mode)
    if mode == "none":
        return
    bnb = load_bitsandbytes()
    version = getattr(bnb, "__version__", "?")
    device = torch.device(device)
    if device.type not in DEVICE_KINDS:
        raise QuantizeError(f"--quantize {mode} runs on {' or '.join(DEVICE_KINDS)} devices; this side computes on "
                            f"{device.type}: use --device cpu, or --quantize none")
    if device.type == "cuda" and _native_library_missing(bnb):
        raise QuantizeError(
            f"bitsandbytes {version} has no CUDA library for this torch (CUDA {torch.version.cuda}): install a "
            f"bitsandbytes build for it (pip install -U bitsandbytes), or use --device cpu or --quantize none")
    try:
        error = _probe(mode, device, dtype)
    except Exception as exc:  # noqa: BLE001 - whatever fails here would fail in training
        fix = "install a bitsandbytes build for this CUDA version, " if device.type == "cuda" else ""
        raise QuantizeError(f"bitsandbytes {version} cannot run {mode} layers on {device} ({type(exc).__name__}: "
                            f"{_first_line(exc)}); {fix}use another --device, or --quantize none") from None
    if not error <= PROBE_TOLERANCE[mode]:
        raise QuantizeError(f"bitsandbytes {version} computes {mode} layers on {device} with a relative error of "
                            f"{error:.3g} (expected at most {PROBE_TOLERANCE[mode]}); use --quantize none")


# A 64 x 64 layer of standard normal weights: what each mode's error stays under.
PROBE_TOLERANCE = {"8bit": 0.05, "4bit": 0.25}


def _probe(mode: str, device: torch.device, dtype: torch.dtype) -> float:
    """Relative error of a small quantized layer's output and input gradient against its float twin."""
    gen = torch.Generator().manual_seed(0)
    dense = nn.Linear(64, 64).to(dtype)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(64, 64, generator=gen))
    x = torch.randn(4, 64, generator=gen).to(device, dtype)
    quantized = quantize_linear(dense, mode, device, dtype)
    errors = []
    for layer in (dense.to(device), quantized):
        x_ = x.clone().requires_grad_()
        out = layer(x_)
        out.float().square().sum().backward()
        errors.append((out.detach().float(), x_.grad.float()))
    (ref_out, ref_grad), (out, grad) = errors
    return max(float((out - ref_out).norm() / ref_out.norm()), float((grad - ref_grad).norm() / ref_grad.norm()))


def nf4_reference(packed: torch.Tensor, state) -> torch.Tensor:
    """The weights (flat, float32) that NF4 ``packed`` bytes and their
    bitsandbytes quant ``state`` stand for, computed here from the format
    alone: two 4-bit codes a byte (high nibble first) into the 16-value
    codebook, times each block's absmax (itself 8-bit quantized, plus an
    offset, under double quantization)."""
    bnb = load_bitsandbytes()
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=-1).reshape(-1)
    absmax = state.absmax
    if state.nested:
        absmax = bnb.functional.dequantize_blockwise(absmax, state.state2) + state.offset
    n = math.prod(state.shape)
    scale = absmax.float().repeat_interleave(state.blocksize)[:n]
    return state.code.float()[codes[:n].long()] * scale


_CHECKED_WIDTHS: set[tuple[int, str]] = set()


def check_nf4_width(d_in: int, device: torch.device, what: str) -> None:
    """Refuse 4-bit layers ``d_in`` inputs wide where bitsandbytes' kernels on
    ``device`` dequantize them otherwise than the format says (its CPU kernel
    does for widths that are multiples of 16 but not of 64)."""
    key = (d_in, str(device))
    if key in _CHECKED_WIDTHS:
        return
    bnb = load_bitsandbytes()
    weight = torch.randn(NF4_BLOCK, d_in, generator=torch.Generator().manual_seed(d_in)).to(device)
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=NF4_BLOCK, quant_type="nf4",
                                                 compress_statistics=DOUBLE_QUANT)
    kernel = bnb.functional.dequantize_4bit(packed, state).float().reshape(-1)
    if not torch.allclose(kernel, nf4_reference(packed, state), rtol=1e-3, atol=1e-5):
        raise QuantizeError(
            f"--quantize 4bit: bitsandbytes {getattr(bnb, '__version__', '?')} computes 4-bit layers {d_in} inputs "
            f"wide ({what}) wrongly on {device}: its kernels there need input widths that are multiples of "
            f"{NF4_BLOCK}. Use --quantize 8bit or --quantize none for this model")
    _CHECKED_WIDTHS.add(key)


def _row_chunks(rows: int, width: int, align: int = 1):
    """(start, stop) row ranges of about ``CHUNK_ELEMENTS`` elements each,
    every chunk but the last a whole number of ``align``-element blocks."""
    step = max(1, CHUNK_ELEMENTS // max(width, 1))
    unit = align // math.gcd(width, align)  # rows per whole number of blocks
    step = max(unit, step // unit * unit)
    return [(i, min(i + step, rows)) for i in range(0, rows, step)]


def _int8_params(bnb, weight: torch.Tensor, device: torch.device):
    """``weight`` (d_out x d_in) as bitsandbytes 8-bit parameters on ``device``:
    int8 rows and their float32 absmax scales, quantized a few rows at a time
    (the rows are independent), so the temporaries stay small."""
    d_out, d_in = weight.shape
    cb = torch.empty(d_out, d_in, dtype=torch.int8, device=device)
    scb = torch.empty(d_out, dtype=torch.float32, device=device)
    for start, stop in _row_chunks(d_out, d_in):
        chunk = weight[start:stop].to(device=device, dtype=torch.float16)
        cb[start:stop], scb[start:stop], _ = bnb.functional.int8_vectorwise_quant(chunk)
    return bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)


def _nf4_params(bnb, weight: torch.Tensor, device: torch.device, layer: nn.Module,
                double_quant: bool = DOUBLE_QUANT):
    """``weight`` (d_out x d_in) as bitsandbytes NF4 parameters on ``device``,
    as ``bitsandbytes.functional.quantize_4bit`` makes them (blocks of
    ``NF4_BLOCK`` in row-major order, the block scales double-quantized
    unless ``double_quant`` is false), but
    quantized a few rows at a time: its temporaries are several times the
    tensor it quantizes, which for a whole layer would set the side's peak."""
    d_out, d_in = weight.shape
    n = d_out * d_in
    packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=device)
    absmax = torch.empty(math.ceil(n / NF4_BLOCK), dtype=torch.float32, device=device)
    for start, stop in _row_chunks(d_out, d_in, align=NF4_BLOCK):
        chunk = weight[start:stop].to(device).contiguous()
        out, state = bnb.functional.quantize_4bit(chunk, blocksize=NF4_BLOCK, quant_type="nf4",
                                                  compress_statistics=False)
        first = start * d_in
        packed[first // 2:first // 2 + out.shape[0]] = out
        absmax[first // NF4_BLOCK:first // NF4_BLOCK + state.absmax.numel()] = state.absmax
    code = bnb.functional.get_4bit_type("nf4", device=device)
    shape = torch.Size((d_out, d_in))
    if double_quant:
        offset = absmax.mean()
        scales, state2 = bnb.functional.quantize_blockwise(absmax - offset, blocksize=256)
        state = bnb.functional.QuantState(absmax=scales, shape=shape, dtype=weight.dtype, blocksize=NF4_BLOCK,
                                          code=code, quant_type="nf4", offset=offset, state2=state2)
    else:
        state = bnb.functional.QuantState(absmax=absmax, shape=shape, dtype=weight.dtype, blocksize=NF4_BLOCK,
                                          code=code, quant_type="nf4")
    return bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=NF4_BLOCK,
                             compress_statistics=double_quant, quant_type="nf4", module=layer, bnb_quantized=True)


def quantize_linear(module: nn.Module, mode: str, device: torch.device, compute_dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes layer computing what ``module`` (an ``nn.Linear``, or a
    GPT-2 ``Conv1D`` with its weight stored in x out) computes, its weight
    quantized on ``device``; frozen (nothing in it trains)."""
    bnb = load_bitsandbytes()
    device = torch.device(device)
    if isinstance(module, Conv1D):
        weight = module.weight.detach().t()  # (in, out) -> nn.Linear's (out, in), a view: chunks are copied
    elif isinstance(module, nn.Linear):
        weight = module.weight.detach()
    else:
        raise TypeError(f"only nn.Linear and Conv1D layers are quantized, got {type(module).__name__}")
    d_out, d_in = weight.shape
    bias = module.bias
    has_bias = bias is not None
    if mode == "8bit":
        layer = bnb.nn.Linear8bitLt(d_in, d_out, bias=has_bias, has_fp16_weights=False,
                                    threshold=INT8_THRESHOLD, device="meta")
        layer.weight = _int8_params(bnb, weight, device)
    elif mode == "4bit":
        layer = bnb.nn.Linear4bit(d_in, d_out, bias=has_bias, compute_dtype=compute_dtype,
                                  compress_statistics=DOUBLE_QUANT, quant_type="nf4", device="meta")
        layer.weight = _nf4_params(bnb, weight, device, layer)
        # On CPUs with AVX512-BF16, bitsandbytes repacks the weight for inference
        # at the first forward without gradients, into a layout whose matmul has
        # no backward; a client evaluates between training steps, so it must not.
        layer.support_avx512bf16_for_cpu = False
    else:
        raise QuantizeError(f"quantize_linear: mode must be 8bit or 4bit, got {mode!r}")
    if has_bias:
        layer.bias = nn.Parameter(bias.detach().to(device), requires_grad=False)
    return layer


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 8- or 4-bit linear layer."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:  # nothing can be quantized before bitsandbytes is imported
        return False
    return isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))


def quantized_mode(model: nn.Module) -> str:
    """``"8bit"``, ``"4bit"`` or ``"none"``: how ``model``'s frozen linear layers are held."""
    if getattr(model, "is_loaded_in_4bit", False):
        return "4bit"
    return "8bit" if getattr(model, "is_loaded_in_8bit", False) else "none"


class Quantizer:
    """Quantizes the linear layers of a segment's blocks as their tensors load.

    An instance is ``split.partition.build_segment``'s ``on_loaded`` hook:
    called with the model and each parameter's name once its tensor is in, it
    swaps the layer owning it (a block's linear layer, or the token embedding)
    for its quantized twin as soon as the layer has no tensor left to load.
    ``finish`` then quantizes anything the hook did not
    see and marks the model for peft, whose LoRA layers for bitsandbytes are
    chosen by these marks. Construction checks that bitsandbytes runs here."""

    def __init__(self, mode: str, device: torch.device, compute_dtype: torch.dtype = torch.float32):
        if check_mode(mode) == "none":
            raise QuantizeError("Quantizer: mode 'none' quantizes nothing; build no Quantizer")
        self.mode, self.device, self.compute_dtype = mode, torch.device(device), compute_dtype
        check_runs(mode, self.device, compute_dtype)
        self.count = 0
        self._blocks: str | None = None
        self._embedding: str | None = None  # the token embedding's path ("" where this side holds none)
        # (path, rows, width, why it stays in full precision or None) once the token embedding is loaded
        self.embedding: tuple[str, int, int, str | None] | None = None

    def _blocks_path(self, model: nn.Module) -> str:
        if self._blocks is None:
            fam = family_for(model.config)
            self._blocks = join(fam.prefix, fam.blocks)
        return self._blocks

    def _target(self, model: nn.Module, path: str) -> nn.Module | None:
        """The layer at ``path`` if it is a linear layer inside a block, not yet quantized."""
        if not path.startswith(self._blocks_path(model) + "."):
            return None
        module = get_module(model, path)
        if is_quantized(module) or not isinstance(module, (nn.Linear, Conv1D)):
            return None
        return module

    def _embedding_path(self, model: nn.Module) -> str | None:
        if self._embedding is None:
            from .quant_embedding import token_embedding_path

            self._embedding = token_embedding_path(model) or ""
        return self._embedding or None

    def _embedding_step(self, model: nn.Module) -> None:
        """Quantize the loaded token embedding, or note why it stays in full
        precision (``split.quant_embedding``)."""
        from .quant_embedding import check_embedding_width, is_quantized_embedding, keep_reason, quantize_embedding

        path = self._embedding_path(model)
        module = model.get_submodule(path)
        if self.embedding is not None or is_quantized_embedding(module):
            return
        weight = getattr(module, "weight", None)
        if weight is None or weight.device.type == "meta":
            return
        rows, width = weight.shape
        reason = keep_reason(model, path)
        if reason is None:
            check_embedding_width(width, self.mode, self.device, path)
            set_module(model, path, quantize_embedding(module, self.mode, self.device, self.compute_dtype))
        self.embedding = (path, rows, width, reason)

    def describe(self) -> list[str]:
        """What this side holds quantized and what it keeps in full precision, and why (one line each)."""
        held = {"8bit": "8 bits (int8, a float32 absmax per row)",
                "4bit": f"4 bits (NF4, blocks of {NF4_BLOCK})"}[self.mode]
        lines = [f"--quantize {self.mode}: {self.count} linear layers of this side's blocks in {held}"
                 + (", block scales in 8 bits" if self.mode == "4bit" and DOUBLE_QUANT else "")]
        if self.embedding is not None:
            path, rows, width, reason = self.embedding
            if reason is None:
                scales = ", block scales float32" if self.mode == "4bit" else ""
                lines.append(f"--quantize {self.mode}: the token embedding {path} ({rows} x {width}) in {held}{scales}")
            else:
                lines.append(f"--quantize {self.mode}: the token embedding {path} ({rows} x {width}) stays "
                             f"{self.compute_dtype_name}: {reason}")
        lines.append(f"--quantize {self.mode}: in {self.compute_dtype_name}: position and token-type embeddings "
                     "(small), norms, biases, the head, LoRA factors (float32)")
        return lines

    @property
    def compute_dtype_name(self) -> str:
        return str(self.compute_dtype).removeprefix("torch.")

    def _swap(self, model: nn.Module, path: str, module: nn.Module) -> None:
        if self.mode == "4bit":
            d_in = module.weight.shape[0] if isinstance(module, Conv1D) else module.in_features
            check_nf4_width(d_in, self.device, path)
        set_module(model, path, quantize_linear(module, self.mode, self.device, self.compute_dtype))
        self.count += 1

    def __call__(self, model: nn.Module, name: str) -> None:
        path = name.rpartition(".")[0]
        if self._embedding_path(model) == path:
            self._embedding_step(model)
            return
        module = self._target(model, path)
        if module is None or any(p.device.type == "meta" for p in module.parameters(recurse=False)):
            return  # not a block's linear layer, or its bias is still to come
        self._swap(model, path, module)

    def finish(self, model: nn.Module) -> nn.Module:
        """Quantize what is left of the blocks' loaded linear layers and mark
        ``model`` for peft; returns it. A side without a linear layer to
        quantize is refused."""
        if self._embedding_path(model) is not None:
            self._embedding_step(model)
        for path, module in list(model.named_modules()):
            target = self._target(model, path) if path else None
            if target is not None and all(p.device.type != "meta" for p in target.parameters(recurse=False)):
                self._swap(model, path, target)
        if not self.count:
            raise QuantizeError(f"--quantize {self.mode}: this side's blocks hold no linear layer to quantize")
        # peft picks its bitsandbytes LoRA layers by these flags (peft.tuners.lora.model).
        model.is_loaded_in_8bit = self.mode == "8bit"
        model.is_loaded_in_4bit = self.mode == "4bit"
        for line in self.describe():
            log.info("%s", line)
        return model


def quantizer_for(mode: str, device: torch.device, compute_dtype: torch.dtype) -> Quantizer | None:
    """A ``Quantizer`` for ``mode`` (checked to run on ``device``), or None for ``"none"``."""
    return None if check_mode(mode) == "none" else Quantizer(mode, device, compute_dtype)


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of every tensor ``model`` holds: parameters and buffers (each
    storage once) and bitsandbytes' quantization state (scales, codebooks)."""
    seen: set[int] = set()
    total = 0

    def add(t) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for t in (*model.parameters(), *model.buffers()):
        add(t)
        add(getattr(t, "SCB", None))  # Int8Params: the rows' absmax scales
        state = getattr(t, "quant_state", None)  # Params4bit: block scales, their scales, the codebook
        while state is not None:
            for part in (state.absmax, state.code, getattr(state, "offset", None)):
                add(part)
            state = getattr(state, "state2", None)
    return total


def refuse_frozen_updates(what: str) -> QuantizeError:
    """The error for an update to a quantized frozen weight (module docstring: why)."""
    return QuantizeError(
        f"{what}: this side holds its frozen weights quantized (--quantize), and an update folded into a "
        "quantized weight is mostly rounded away. Use a strategy that keeps updates in LoRA (fedit, flexlora, "
        "hetlora, ...) without --init svd or --reinit-every, or --quantize none")


def check_federation(settings) -> None:
    """Refuse to join, with quantized frozen weights, a federation whose
    ``split.protocol.FederationSettings`` say it updates frozen weights."""
    if settings is not None and settings.frozen_updates:
        raise refuse_frozen_updates(f"the server's federation ({settings.strategy}) updates frozen weights")
