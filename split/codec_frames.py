"""The frame of each tensor codec: how a tensor becomes one frame's bytes and back.

Pure functions of a tensor (or a frame) and the codec's parameters;
split/codecs.py names the codecs and checks their parameters. All numbers are
little-endian. Each frame lays out its parts widest element first (4-byte
parts, then 2-byte, then 1-byte), so every part starts aligned and is read
without another copy.

Every decoder checks that the payload is one its encoder could have written
(finite non-negative scales, indices in range and strictly increasing, no
code outside the codec's set) and raises ``ValueError`` otherwise: a frame of
the right length can still be hostile, and it must never become a crash or a
silently wrong tensor.

Lossy encoders refuse non-finite input (a NaN would make every scale of its row
or block NaN); the lossless codec and the fp16/bf16 casts carry NaN and inf as
they are.
"""

from __future__ import annotations

import math
import warnings

import torch

# fp16 frames carry a power-of-two scale 2**e chosen so the largest finite
# magnitude lands in [2**14, 2**15): fp16's 11-bit precision then covers values
# 2**29 times smaller than the largest before they turn subnormal, and nothing
# overflows fp16's 65504. An exponent is exact (no rounding, no NaN scale) and
# costs 2 bytes. For a float32 input, e lies in [-163, 113]: frexp's exponent of
# a positive finite float32 is -148..128.
FP16_TOP = 15
EXPONENT_RANGE = (-163, 113)

# The 16 NormalFloat-4 levels of QLoRA (Dettmers et al., 2023, appendix E): the
# quantiles of N(0, 1) at 8 evenly spaced probabilities on the positive side
# and 7 on the negative, plus an exact zero, scaled to [-1, 1].
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
    1.0], dtype=torch.float32)
# A value is coded as the nearest level: the boundaries are the midpoints.
NF4_BOUNDARIES = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
# The largest distance from any value in [-1, 1] to its level: half the widest gap.
NF4_MAX_ERROR = float((NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max()) / 2

INT8_LEVELS = 127  # symmetric: -127..127, so -128 never appears in a valid frame
MAX_INDEX = (1 << 31) - 1  # top-k indices and outlier channels are int32


def numel(shape: tuple[int, ...]) -> int:
    """Elements in a tensor of ``shape``."""
    n = 1
    for d in shape:
        n *= d
    return n


def rows_of(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, width): a tensor seen as rows of its last dimension, the way
    per-token scales see it. A 0-d tensor is one row of one."""
    if not shape:
        return 1, 1
    return numel(shape[:-1]), shape[-1]


def topk_count(count: int, density: float) -> int:
    """How many entries top-k keeps of ``count`` at ``density``: the nearest
    integer to density * count, at least one of a non-empty tensor."""
    if count == 0:
        return 0
    return min(count, max(1, math.floor(density * count + 0.5)))


def outlier_count(width: int, outliers: int) -> int:
    """How many channels int8 sends apart: ``outliers``, at most the width."""
    return min(outliers, width)


# ------------------------------------------------------------ bytes in, bytes out


def _join(parts: list[torch.Tensor]) -> memoryview:
    """One frame: the parts' bytes, in order."""
    flat = [p.detach().cpu().contiguous().reshape(-1).view(torch.uint8) for p in parts]
    data = torch.cat(flat) if flat else torch.empty(0, dtype=torch.uint8)
    return memoryview(data.numpy())


class _Reader:
    """Typed parts of a frame, in order, from one aligned copy of its bytes."""

    def __init__(self, buffer):
        raw = bytearray(buffer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self.data = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        self.at = 0

    def take(self, dtype: torch.dtype, count: int) -> torch.Tensor:
        size = count * torch.empty((), dtype=dtype).element_size()
        if self.at + size > len(self.data):
            raise ValueError(f"the frame ends {self.at + size - len(self.data)} bytes early")
        part = self.data[self.at:self.at + size]
        self.at += size
        return part.view(dtype)


def _require_finite(x: torch.Tensor, codec: str) -> None:
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"the {codec} codec cannot encode NaN or infinite values; send this tensor with fp32, "
                         f"fp16 or bf16, or find where the values stopped being finite")


def _check_scales(scales: torch.Tensor, what: str) -> None:
    if scales.numel() and not bool((torch.isfinite(scales) & (scales >= 0)).all()):
        raise ValueError(f"{what} must be finite and non-negative")


def _check_indices(indices: torch.Tensor, bound: int, what: str) -> None:
    """Indices in 0..bound-1, strictly increasing (so none repeats)."""
    if not indices.numel():
        return
    if int(indices[0]) < 0 or int(indices[-1]) >= bound:
        raise ValueError(f"{what} must lie in 0..{bound - 1}")
    if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
        raise ValueError(f"{what} must be strictly increasing (sorted, none repeated)")


# ------------------------------------------------------------ fp16 with a power-of-two scale


def fp16_exponent(x: torch.Tensor) -> int:
    """The scale exponent e of an fp16 frame: 2**-e brings the largest finite
    magnitude of ``x`` into [2**14, 2**15); 0 when there is none."""
    if not x.numel():
        return 0
    largest = x.detach().abs().float().nan_to_num(0.0, 0.0, 0.0).max()
    if float(largest) == 0.0:
        return 0
    _, exponent = torch.frexp(largest)  # largest = m * 2**exponent, m in [0.5, 1)
    return int(exponent) - FP16_TOP


def fp16_nbytes(count: int) -> int:
    """Bytes of an fp16 frame of ``count`` values: the values, then the int16 exponent."""
    return 2 * count + 2


def fp16_parts(x: torch.Tensor) -> list[torch.Tensor]:
    """The parts of an fp16 frame of ``x`` (any shape; flattened)."""
    e = fp16_exponent(x)
    flat = x.detach().reshape(-1)
    # Scaling by a power of two is exact: in float32 when 2**-e is a normal
    # float32 (all but the most extreme tensors), else in float64.
    flat = flat.float() if -126 <= -e <= 127 else flat.double()
    values = (flat * 2.0 ** -e).to(torch.float16)
    return [values, torch.tensor([e], dtype=torch.int16)]


def fp16_read(reader: _Reader, count: int) -> torch.Tensor:
    """``count`` values of an fp16 frame, in float64 (exact: fp16 times a power of two)."""
    values = reader.take(torch.float16, count)
    e = int(reader.take(torch.int16, 1)[0])
    low, high = EXPONENT_RANGE
    if not low <= e <= high:
        raise ValueError(f"the fp16 scale exponent {e} is outside {low}..{high}")
    return values.double() * 2.0 ** e


def nf4_codes(normalized: torch.Tensor) -> torch.Tensor:
    """The NF4 code of each value in [-1, 1]: the nearest level, a value on a
    midpoint taking the lower one (the number of boundaries below it; 15
    comparisons run faster than torch.bucketize's binary search)."""
    codes = torch.zeros(normalized.shape, dtype=torch.long)
    for boundary in NF4_BOUNDARIES.tolist():
        codes += normalized > boundary
    return codes


def largest_entries(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the ``k`` entries of largest magnitude, ascending; ties
    at the cut go to the lower index, so the choice is a function of the values
    alone (torch.topk's order among equal values is not specified)."""
    if k >= flat.numel():
        return torch.arange(flat.numel())
    magnitude = flat.abs()
    cut = torch.topk(magnitude, k, sorted=False).values.min()
    above = torch.nonzero(magnitude > cut).reshape(-1)
    at_cut = torch.nonzero(magnitude == cut).reshape(-1)[:k - above.numel()]
    return torch.cat([above, at_cut]).sort().values


# ------------------------------------------------------------ the codecs


class RawCodec:
    """Lossless: the tensor's own bytes, row-major (fp32 hidden states travel as
    fp32). Any dtype."""

    name = "raw"
    lossy = False

    def nbytes(self, shape, dtype, spec=None) -> int:
        return numel(shape) * torch.empty((), dtype=dtype).element_size()

    def encode(self, tensor: torch.Tensor, spec=None) -> memoryview:
        """The tensor's bytes: a zero-copy view of a contiguous CPU tensor; a
        tensor on an accelerator is copied to the CPU first."""
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        return memoryview(flat.view(torch.uint8).numpy())

    def decode(self, buffer, shape, dtype, spec=None) -> torch.Tensor:
        """A tensor holding the received bytes, copied into torch's own memory:
        a frame's buffer is read-only and may be unaligned, and matrix kernels
        round differently on unaligned input, which would break bit-exactness."""
        if len(buffer) == 0:
            return torch.empty(shape, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only buffer: copied at once
            return torch.frombuffer(buffer, dtype=dtype).reshape(shape).clone()


class Fp16Codec:
    """fp16 values times one power-of-two scale per tensor:
    ``[values: float16 x numel][e: int16]``; value = fp16 * 2**e."""

    name = "fp16"
    lossy = True

    def nbytes(self, shape, dtype, spec=None) -> int:
        return fp16_nbytes(numel(shape))

    def encode(self, tensor: torch.Tensor, spec=None) -> memoryview:
        return _join(fp16_parts(tensor))

    def decode(self, buffer, shape, dtype, spec=None) -> torch.Tensor:
        return fp16_read(_Reader(buffer), numel(shape)).reshape(shape).to(dtype)


class Bf16Codec:
    """bfloat16 values, rounded to nearest: ``[values: bfloat16 x numel]``."""

    name = "bf16"
    lossy = True

    def nbytes(self, shape, dtype, spec=None) -> int:
        return 2 * numel(shape)

    def encode(self, tensor: torch.Tensor, spec=None) -> memoryview:
        return _join([tensor.detach().to(torch.bfloat16)])

    def decode(self, buffer, shape, dtype, spec=None) -> torch.Tensor:
        return _Reader(buffer).take(torch.bfloat16, numel(shape)).reshape(shape).to(dtype)


class Int8Codec:
    """int8 with one absmax scale per row of the last dimension (per token of
    a hidden state), and optionally the ``outliers`` channels of largest
    magnitude sent apart in fp16::

        [scales: float32 x rows][channels: int32 x n]
        [outlier values: fp16 frame of rows x n, when n > 0][codes: int8 x rows x (width - n)]

    value = code * scale, code in -127..127, scale = row absmax / 127 over the
    channels not sent apart. fp32 scales: a gradient's absmax (1e-6 and below)
    would fall into fp16's subnormals."""

    name = "int8"
    lossy = True

    def nbytes(self, shape, dtype, spec) -> int:
        rows, width = rows_of(shape)
        n = outlier_count(width, spec.param("outliers"))
        apart = 4 * n + fp16_nbytes(rows * n) if n else 0
        return 4 * rows + apart + rows * (width - n)

    def encode(self, tensor: torch.Tensor, spec) -> memoryview:
        rows, width = rows_of(tuple(tensor.shape))
        x = tensor.detach().float().reshape(rows, width)
        _require_finite(x, self.name)
        n = outlier_count(width, spec.param("outliers"))
        channels, kept = self._channels(x, n)
        inner = x[:, kept] if n else x
        absmax = inner.abs().amax(dim=1) if inner.shape[1] else torch.zeros(rows)
        scales = absmax / INT8_LEVELS
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        codes = (inner / safe[:, None]).round().clamp(-INT8_LEVELS, INT8_LEVELS).to(torch.int8)
        parts = [scales]
        if n:
            parts += [channels.to(torch.int32)] + fp16_parts(x[:, channels])
        return _join(parts + [codes])

    @staticmethod
    def _channels(x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The n channels of largest absmax over all rows (ties to the lower
        index), ascending, and the mask of the rest."""
        width = x.shape[1]
        kept = torch.ones(width, dtype=torch.bool)
        if not n:
            return torch.empty(0, dtype=torch.long), kept
        magnitude = x.abs().amax(dim=0) if x.shape[0] else torch.zeros(width)
        order = torch.sort(magnitude, descending=True, stable=True).indices[:n]
        channels = order.sort().values
        kept[channels] = False
        return channels, kept

    def decode(self, buffer, shape, dtype, spec) -> torch.Tensor:
        rows, width = rows_of(shape)
        n = outlier_count(width, spec.param("outliers"))
        reader = _Reader(buffer)
        scales = reader.take(torch.float32, rows)
        _check_scales(scales, "int8 row scales")
        channels = outliers = None
        if n:
            channels = reader.take(torch.int32, n).long()
            _check_indices(channels, width, "int8 outlier channels")
            outliers = fp16_read(reader, rows * n).reshape(rows, n)
        codes = reader.take(torch.int8, rows * (width - n))
        if codes.numel() and int(codes.min()) < -INT8_LEVELS:
            raise ValueError(f"int8 codes must lie in -{INT8_LEVELS}..{INT8_LEVELS}")
        # code x scale is exact in float64 and rounded once to float32, which
        # is what a float32 product gives: no need for float64 here.
        inner = codes.reshape(rows, width - n).float() * scales[:, None]
        if not n:
            return inner.reshape(shape).to(dtype)
        out = torch.empty(rows, width, dtype=torch.float32)
        kept = torch.ones(width, dtype=torch.bool)
        kept[channels] = False
        out[:, kept] = inner
        out[:, channels] = outliers.float()
        return out.reshape(shape).to(dtype)


class Nf4Codec:
    """4-bit NormalFloat in blocks of ``block`` elements of the flattened
    tensor, each with its absmax::

        [absmax: float32 x blocks][codes: 2 per byte, first in the high nibble]

    value = NF4_LEVELS[code] * absmax; an odd count leaves the last low nibble 0.
    Pure torch: a peer decodes it without bitsandbytes (a CUDA-first library
    whose CPU support varies by version and platform), and the layout is this
    codec's own, so it cannot change under a library upgrade."""

    name = "nf4"
    lossy = True

    def nbytes(self, shape, dtype, spec) -> int:
        count, block = numel(shape), spec.param("block")
        return 4 * -(-count // block) + -(-count // 2)

    def encode(self, tensor: torch.Tensor, spec) -> memoryview:
        flat = tensor.detach().float().reshape(-1)
        _require_finite(flat, self.name)
        count, block = flat.numel(), spec.param("block")
        blocks = -(-count // block)
        padded = torch.zeros(blocks * block)
        padded[:count] = flat
        padded = padded.reshape(blocks, block)
        absmax = padded.abs().amax(dim=1) if blocks else torch.zeros(0)
        safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        codes = nf4_codes((padded / safe[:, None]).reshape(-1))[:count]
        if count % 2:
            codes = torch.cat([codes, torch.zeros(1, dtype=codes.dtype)])
        packed = (codes[0::2] << 4 | codes[1::2]).to(torch.uint8)
        return _join([absmax, packed])

    def decode(self, buffer, shape, dtype, spec) -> torch.Tensor:
        count, block = numel(shape), spec.param("block")
        reader = _Reader(buffer)
        absmax = reader.take(torch.float32, -(-count // block))
        _check_scales(absmax, "nf4 block absmax values")
        packed = reader.take(torch.uint8, -(-count // 2)).long()
        if count % 2 and int(packed[-1]) & 0x0F:
            raise ValueError("nf4: the padding nibble after an odd count of values must be 0")
        codes = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:count]
        scale = absmax.repeat_interleave(block)[:count]
        return (NF4_LEVELS[codes] * scale).reshape(shape).to(dtype)


class TopkCodec:
    """The k entries of largest magnitude, k = topk_count(numel, density)::

        [indices: int32 x k, ascending][values: fp16 frame of k]

    The entries left out decode as zeros. Ties go to the lower index, so a
    tensor always encodes to the same bytes. The sender keeps what was left out
    as an error-feedback residual (split.codecs.ErrorFeedback)."""

    name = "topk"
    lossy = True

    def nbytes(self, shape, dtype, spec) -> int:
        k = topk_count(numel(shape), spec.param("density"))
        return 4 * k + fp16_nbytes(k)

    def encode(self, tensor: torch.Tensor, spec) -> memoryview:
        flat = tensor.detach().float().reshape(-1)
        _require_finite(flat, self.name)
        if flat.numel() > MAX_INDEX:
            raise ValueError(f"topk indexes at most {MAX_INDEX} entries with int32, not {flat.numel()}")
        chosen = largest_entries(flat, topk_count(flat.numel(), spec.param("density")))
        return _join([chosen.to(torch.int32)] + fp16_parts(flat[chosen]))

    def decode(self, buffer, shape, dtype, spec) -> torch.Tensor:
        count = numel(shape)
        k = topk_count(count, spec.param("density"))
        reader = _Reader(buffer)
        indices = reader.take(torch.int32, k).long()
        _check_indices(indices, count, "topk indices")
        out = torch.zeros(count, dtype=torch.float64)
        out[indices] = fp16_read(reader, k)
        return out.reshape(shape).to(dtype)
