"""Tensor codecs: which codec a tensor travels in, with which parameters.

A ``CodecSpec`` names a codec and its parameters ("fp32", "int8:outliers=4",
"topk:density=0.1"); ``parse_codec`` reads one from a command line or a hello,
and each tensor's header entry carries one, so the receiver decodes without
guessing. The frames themselves are in split/codec_frames.py.

Codecs (docs/compression.md has each frame's layout and error bound):

- ``fp32``: lossless, the tensor's own bytes (the default; "raw" on the wire,
  and the only codec for tensors that are not floating point);
- ``fp16``: fp16 values times a power-of-two scale per tensor;
- ``bf16``: bfloat16 values;
- ``int8[:outliers=N]``: per-row (per-token) absmax int8 with fp32 scales; the N
  channels of largest magnitude go apart in fp16;
- ``nf4[:block=B]``: 4-bit NormalFloat in blocks of B with fp32 absmax;
- ``topk:density=D[,ef=1]``: the largest D of the entries (int32 indices,
  fp16 values); with ``ef=1`` the sender keeps the rest as an error-feedback
  residual for the next step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Hashable

import torch

from .codec_frames import Bf16Codec, Fp16Codec, Int8Codec, Nf4Codec, RawCodec, TopkCodec

# Dtypes a header may name; anything else is refused before any byte is read.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# What lossy codecs take: they decode into the header's dtype, which must hold fractions.
FLOATING = (torch.float32, torch.float16, torch.bfloat16)

# The frame of each codec, by the name its header entry carries.
CODECS = {c.name: c for c in (RawCodec(), Fp16Codec(), Bf16Codec(), Int8Codec(), Nf4Codec(), TopkCodec())}


@dataclass(frozen=True)
class Param:
    """One codec parameter: its type, default (None: required) and range."""

    kind: type  # int or float
    default: object
    low: float
    high: float
    low_open: bool = False  # the range excludes ``low``
    meaning: str = ""

    def describe(self, key: str) -> str:
        """"outliers=N: an integer in 0..256, default 0 (what it means)"."""
        if self.kind is int:
            what = f"{key}=N: an integer in {self.low}..{self.high}"
        else:
            what = f"{key}=D: a number with {self.low:g} < D <= {self.high:g}"
        default = "required" if self.default is None else f"default {self.default}"
        return f"{what}, {default} ({self.meaning})"

    def check(self, key: str, value) -> object:
        """``value`` as this parameter's type; ValueError naming what is wrong."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be {'an integer' if self.kind is int else 'a number'}, "
                             f"not a {type(value).__name__}")
        if self.kind is int and not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, not {value!r}")
        value = self.kind(value)
        inside = (self.low < value if self.low_open else self.low <= value) and value <= self.high
        if not (math.isfinite(value) and inside):
            raise ValueError(f"{key}={value!r} is out of range: {self.describe(key)}")
        return value


# Each codec's parameters, by the name a spec gives it (fp32 travels as "raw").
PARAMS: dict[str, dict[str, Param]] = {
    "fp32": {},
    "fp16": {},
    "bf16": {},
    "int8": {"outliers": Param(int, 0, 0, 256, meaning="channels of largest magnitude sent apart in fp16")},
    "nf4": {"block": Param(int, 64, 2, 4096, meaning="elements per absmax scale")},
    "topk": {"density": Param(float, None, 0.0, 1.0, low_open=True, meaning="fraction of the entries sent"),
             # Off by default: a hidden state's or gradient's residual belongs to other samples than the
             # next step's, and adding it there wrecked training (docs/compression.md, measured).
             "ef": Param(int, 0, 0, 1, meaning="1: the sender adds what it left out to the next step's tensor "
                                               "(error feedback); 0: what is left out is dropped")},
}
WIRE_NAMES = {"fp32": "raw"}  # the lossless codec keeps the header name it always had
SPEC_NAMES = {WIRE_NAMES.get(name, name): name for name in PARAMS}


def known_codecs() -> str:
    """The codec names and their parameters, for error messages and --help."""
    out = []
    for name, params in PARAMS.items():
        out.append(name + "".join(f" [{p.describe(k)}]" for k, p in params.items()))
    return "; ".join(out)


@dataclass(frozen=True)
class CodecSpec:
    """A codec and its parameters, canonical: parameters sorted by key, those
    at their default left out, so equal specs compare equal. Constructing one
    checks it (ValueError naming what is wrong)."""

    name: str
    params: tuple[tuple[str, object], ...] = ()

    def __post_init__(self):
        if not isinstance(self.name, str) or self.name not in PARAMS:
            raise ValueError(f"unknown codec {str(self.name)[:40]!r}; known: {known_codecs()}")
        schema = PARAMS[self.name]
        given: dict[str, object] = {}
        for item in self.params:
            key, value = item
            if not isinstance(key, str) or key not in schema:
                known = ", ".join(schema) or "none"
                raise ValueError(f"codec {self.name} has no parameter {str(key)[:40]!r}; its parameters: {known}")
            if key in given:
                raise ValueError(f"codec {self.name}: parameter {key} given twice")
            try:
                given[key] = schema[key].check(key, value)
            except ValueError as exc:
                raise ValueError(f"codec {self.name}: {exc}") from None
        for key, param in schema.items():
            if param.default is None and key not in given:
                raise ValueError(f"codec {self.name} needs {param.describe(key)}; e.g. {self.name}:{key}=0.1")
        canonical = tuple(sorted((k, v) for k, v in given.items() if v != schema[k].default))
        object.__setattr__(self, "params", canonical)

    @property
    def text(self) -> str:
        """The spec as ``parse_codec`` reads it: "int8:outliers=4", "fp32"."""
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.params)

    def param(self, key: str):
        """The value of parameter ``key``, its default when not given."""
        schema = PARAMS[self.name]
        if key not in schema:
            raise KeyError(f"codec {self.name} has no parameter {key!r}")
        return dict(self.params).get(key, schema[key].default)

    @property
    def lossless(self) -> bool:
        return self.name == "fp32"

    @property
    def wire_name(self) -> str:
        """The codec's name in a header entry."""
        return WIRE_NAMES.get(self.name, self.name)

    @property
    def frame(self):
        """The codec that writes and reads the frame."""
        return CODECS[self.wire_name]


def parse_codec(text: str) -> CodecSpec:
    """A spec from its text, "name" or "name:key=value,key=value"; ValueError
    naming the known codecs, their parameters and ranges."""
    if not isinstance(text, str):
        raise ValueError(f"a codec is a string such as 'int8' or 'topk:density=0.1', not a {type(text).__name__}")
    name, colon, rest = text.strip().partition(":")
    if name not in PARAMS:
        raise ValueError(f"unknown codec {name[:40]!r}; known: {known_codecs()}")
    params = []
    for item in rest.split(",") if colon else []:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in PARAMS[name]:
            known = ", ".join(f"{k}=..." for k in PARAMS[name]) or "none"
            raise ValueError(f"codec {name}: {item[:40]!r} is not a parameter; its parameters: {known} "
                             f"(write {name}:key=value)")
        kind = PARAMS[name][key].kind
        try:
            parsed = kind(value.strip())
        except ValueError:
            raise ValueError(f"codec {name}: {key}={value[:40]!r} is not "
                             f"{'an integer' if kind is int else 'a number'}") from None
        params.append((key, parsed))
    return CodecSpec(name, tuple(params))


RAW = parse_codec("fp32")


def split_codec_list(text: str) -> list[str]:
    """Codec texts from a comma-separated list, a ``key=value`` item belonging
    to the codec before it: "fp32,topk:density=0.1,ef=0,int8" is fp32,
    topk:density=0.1,ef=0 and int8. Texts are not checked here (``parse_codec``
    does); an empty item or a parameter before any codec is a ValueError."""
    out: list[str] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            raise ValueError(f"codecs {text[:80]!r}: an empty item; expected codec texts separated by commas, "
                             "such as fp32,fp16,int8")
        if "=" in item and ":" not in item:
            if not out or ":" not in out[-1]:
                raise ValueError(f"codecs {text[:80]!r}: {item[:40]!r} is a parameter with no codec before it "
                                 "(write name:key=value,key=value)")
            out[-1] += "," + item
        else:
            out.append(item)
    return out


def spec_for_wire(wire_name: str, params: dict) -> CodecSpec:
    """The spec a header entry names (its codec and params map); ValueError
    naming what is wrong."""
    if wire_name not in SPEC_NAMES:
        raise ValueError(f"unknown codec {wire_name[:40]!r}; known: {', '.join(SPEC_NAMES)}")
    return CodecSpec(SPEC_NAMES[wire_name], tuple(params.items()))


def check_dtype(spec: CodecSpec, dtype: torch.dtype) -> None:
    """Lossy codecs take floating tensors only; ValueError otherwise."""
    if not spec.lossless and dtype not in FLOATING:
        raise ValueError(f"the {spec.text} codec takes float32, float16 or bfloat16 tensors, not {dtype}; "
                         f"other tensors travel raw (fp32)")


def encoded_nbytes(shape, dtype: torch.dtype, spec: CodecSpec) -> int:
    """Bytes of the frame of a ``shape`` tensor of ``dtype`` in ``spec``: a pure
    function of the three (no tensor is built)."""
    check_dtype(spec, dtype)
    return spec.frame.nbytes(tuple(int(d) for d in shape), dtype, spec)


def encode_tensor(tensor: torch.Tensor, spec: CodecSpec):
    """The frame of ``tensor`` in ``spec`` (a buffer)."""
    check_dtype(spec, tensor.dtype)
    return spec.frame.encode(tensor, spec)


def decode_tensor(buffer, shape: tuple[int, ...], dtype: torch.dtype, spec: CodecSpec) -> torch.Tensor:
    """The tensor a frame holds (ValueError where the payload is inconsistent)."""
    return spec.frame.decode(buffer, shape, dtype, spec)


def roundtrip(tensor: torch.Tensor, spec: CodecSpec) -> torch.Tensor:
    """Exactly what the receiver decodes from ``tensor`` sent in ``spec``, on
    ``tensor``'s device."""
    frame = encode_tensor(tensor, spec)
    return decode_tensor(frame, tuple(tensor.shape), tensor.dtype, spec).to(tensor.device)


def uses_error_feedback(spec: CodecSpec) -> bool:
    """Whether the sender keeps an error-feedback residual for ``spec``: top-k
    with ``ef=1`` does (without one, the entries just below the cut are never
    sent); the quantizers' errors are unbiased enough to leave alone."""
    return spec.name == "topk" and spec.param("ef") == 1


class ErrorFeedback:
    """The sender's residuals, one per key (a tensor name and direction, say):
    what earlier sends left out, added to the next tensor sent under that key.

    ``correct`` returns the tensor to send, tensor + residual, and keeps as the
    new residual what the receiver will not get of it: corrected -
    roundtrip(corrected). Over any run of steps, the sum of what was received
    equals the sum of the inputs minus the final residual."""

    def __init__(self):
        self._residuals: dict[Hashable, torch.Tensor] = {}

    def correct(self, key: Hashable, tensor: torch.Tensor, spec: CodecSpec) -> torch.Tensor:
        """The tensor to send under ``key`` in ``spec``. A lossless spec sends
        ``tensor`` as it is and keeps nothing; a residual of another shape,
        dtype or device (a new sequence length, say) is dropped."""
        if spec.lossless:
            self._residuals.pop(key, None)
            return tensor
        tensor = tensor.detach()
        residual = self._residuals.pop(key, None)
        if residual is not None and (residual.shape, residual.dtype, residual.device) == (
                tensor.shape, tensor.dtype, tensor.device):
            tensor = tensor + residual
        self._residuals[key] = tensor - roundtrip(tensor, spec)
        return tensor

    def residual(self, key: Hashable) -> torch.Tensor | None:
        """The residual held for ``key``, if any."""
        return self._residuals.get(key)

    def clear(self) -> None:
        """Drop every residual (a new session starts from none)."""
        self._residuals.clear()


def get_codec(name: str):
    """The frame codec whose header name is ``name`` (KeyError lists the known ones)."""
    try:
        return CODECS[name]
    except KeyError:
        raise KeyError(f"unknown codec {name!r}; known: {sorted(CODECS)}") from None
