"""Device profiles: what a device gives fedsplit (memory, compute, link) and
where each figure comes from.

A profile is a TOML file (docs/devices.md)::

    name = "Raspberry Pi 5 (8 GB)"
    memory_gb = 7.0          # GiB fedsplit may use, the OS's share left out
    gflops_fp32 = 29.6
    # gflops_fp16 = ...      # only where half precision runs at another speed
    accelerator = "cpu"      # cpu | cuda | unified (CPU and GPU share the memory)
    uplink_mbps = 20.0
    downlink_mbps = 20.0
    rtt_ms = 20.0
    bitsandbytes = true

    [sources]
    memory_gb = "..."        # one entry for every figure above

``parse_profile`` is a pure function of the text and the name it came from;
every problem is a ``ProfileError`` naming that source, the field, what was
found and what is expected. ``load_profile`` and ``builtin_profiles`` read
files; ``profile_to_toml`` writes a profile back in the same schema.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ACCELERATORS = ("cpu", "cuda", "unified")
DEVICES_DIR = Path(__file__).resolve().parent / "devices"
GIB = 1 << 30
MAX_NAME = 200
MAX_SOURCE = 2000
# dtype name -> which figure applies; half precisions share the fp16 figure.
HALF = ("float16", "bfloat16")


class ProfileError(ValueError):
    """A device profile that does not follow the schema (the text says where and why)."""


def _number(value) -> bool:
    # bool is an int subclass, and TOML keeps true/false apart from 1/0.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive(value) -> bool:
    return value > 0


# field -> (kind, test on a value of that kind, what is expected); in file order.
FIELDS = {
    "name": ("str", lambda v: 0 < len(v) <= MAX_NAME and v.isprintable(),
             f"a printable string of 1 to {MAX_NAME} characters"),
    "memory_gb": ("number", _positive, "a finite number > 0 (GiB fedsplit may use)"),
    "gflops_fp32": ("number", _positive, "a finite number > 0 (GFLOP/s of float32 matrix products)"),
    "gflops_fp16": ("number", _positive, "a finite number > 0 (GFLOP/s of float16 matrix products), or no "
                                         "entry where half precision is no faster"),
    "accelerator": ("str", lambda v: v in ACCELERATORS, f"one of {', '.join(ACCELERATORS)}"),
    "uplink_mbps": ("number", _positive, "a finite number > 0 (Mbit/s from the device to the server)"),
    "downlink_mbps": ("number", _positive, "a finite number > 0 (Mbit/s from the server to the device)"),
    "rtt_ms": ("number", lambda v: v >= 0, "a finite number >= 0 (round-trip time to the server, ms)"),
    "bitsandbytes": ("bool", lambda v: True, "true or false (whether bitsandbytes works on the device)"),
}
OPTIONAL = ("gflops_fp16",)
FIGURES = tuple(k for k in FIELDS if k != "name")  # what [sources] must account for


@dataclass(frozen=True)
class DeviceProfile:
    """One device: the memory budget fedsplit may use (GiB), matrix-product
    throughput (GFLOP/s; ``gflops_fp16`` None where half precision is no
    faster), the accelerator kind, the link to the server, whether
    bitsandbytes works there, and the source of each figure.

    Constructing one validates it, so a profile in hand is always valid."""

    name: str
    memory_gb: float
    gflops_fp32: float
    gflops_fp16: float | None
    accelerator: str
    uplink_mbps: float
    downlink_mbps: float
    rtt_ms: float
    bitsandbytes: bool
    sources: dict[str, str] = field(hash=False)

    def __post_init__(self):
        values = {k: getattr(self, k) for k in FIELDS}
        _check_values(values, self.sources, f"profile {self.name!r}" if isinstance(self.name, str) else "profile")
        # TOML's 4 and 4.0 are one figure; and a profile's sources are its own, not its caller's dict.
        for key, (kind, _, _) in FIELDS.items():
            if kind == "number" and values[key] is not None:
                object.__setattr__(self, key, float(values[key]))
        object.__setattr__(self, "sources", dict(self.sources))

    @property
    def memory_bytes(self) -> int:
        """The memory budget in bytes (GiB = 2**30 bytes)."""
        return int(self.memory_gb * GIB)

    def gflops(self, dtype: str = "float32") -> float:
        """Throughput for matrix products in ``dtype`` ("float32", "float16",
        "bfloat16" or the torch dtype): the fp16 figure for half precisions
        where the profile has one, else the fp32 figure."""
        name = str(dtype).removeprefix("torch.")
        if name == "float32":
            return self.gflops_fp32
        if name in HALF:
            return self.gflops_fp32 if self.gflops_fp16 is None else self.gflops_fp16
        raise ProfileError(f"no throughput for dtype {dtype!r}; known: float32, {', '.join(HALF)}")


def _fail(source: str, key: str, expected: str, value) -> ProfileError:
    return ProfileError(f"{source}: field {key!r} must be {expected}, got {_show(value)}")


def _show(value) -> str:
    """A value for an error message, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def _check_value(key: str, value, source: str) -> None:
    kind, test, expected = FIELDS[key]
    if kind == "number":
        ok = _number(value) and math.isfinite(value) and test(value)
    elif kind == "str":
        ok = isinstance(value, str) and test(value)
    else:
        ok = isinstance(value, bool)
    if not ok:
        raise _fail(source, key, expected, value)


def _check_values(values: dict, sources, source: str) -> None:
    """Every field's type and range, and a source for every figure given."""
    for key, value in values.items():
        if value is None and key in OPTIONAL:
            continue
        _check_value(key, value, source)
    if not isinstance(sources, dict):
        raise ProfileError(f"{source}: [sources] must be a table naming the source of each figure, "
                           f"got {_show(sources)}")
    for key, text in sources.items():
        if key not in FIGURES:
            raise ProfileError(f"{source}: [sources] has an entry for unknown field {_show(key)}; "
                               f"figures: {', '.join(FIGURES)}")
        if not (isinstance(text, str) and text.strip() and len(text) <= MAX_SOURCE and text.isprintable()):
            raise ProfileError(f"{source}: [sources] {key!r} must be one line of 1 to {MAX_SOURCE} printable "
                               f"characters saying where the figure comes from, got {_show(text)}")
    for key in FIGURES:
        if values.get(key) is not None and key not in sources:
            raise ProfileError(f"{source}: field {key!r} has no source: add {key} = \"where the figure comes "
                               f"from\" to the [sources] table")
        if values.get(key) is None and key in sources:
            raise ProfileError(f"{source}: [sources] names a source for {key!r}, but the profile gives no {key}: "
                               f"give the figure, or remove its source")


def parse_profile(text: str, source: str) -> DeviceProfile:
    """The profile in TOML ``text``; ``source`` (a file name) names it in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{source}: not valid TOML ({exc}); see docs/devices.md for the schema") from None
    for key in data:
        if key not in FIELDS and key != "sources":
            raise ProfileError(f"{source}: unknown field {_show(key)}; a profile has {', '.join(FIELDS)} and a "
                               f"[sources] table")
    for key in FIELDS:
        if key not in data and key not in OPTIONAL:
            expected = FIELDS[key][2]
            raise ProfileError(f"{source}: field {key!r} is missing; expected {expected}")
    if "sources" not in data:
        raise ProfileError(f"{source}: the [sources] table is missing; it names the source of every figure")
    values = {key: data.get(key) for key in FIELDS}
    _check_values(values, data["sources"], source)
    return DeviceProfile(**values, sources=dict(data["sources"]))


def load_profile(path) -> DeviceProfile:
    """The profile in the TOML file at ``path``."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read the profile ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProfileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); a profile is TOML") from None
    return parse_profile(text, str(path))


def builtin_profiles() -> dict[str, DeviceProfile]:
    """The profiles shipped in profiles/devices/, keyed by file stem ("pi5", ...)."""
    return {path.stem: load_profile(path) for path in sorted(DEVICES_DIR.glob("*.toml"))}


def resolve_profile(name_or_path: str) -> DeviceProfile:
    """A built-in profile by name ("pi5"), or the profile in a .toml file."""
    text = str(name_or_path)
    builtin = DEVICES_DIR / f"{text}.toml"
    if "/" not in text and "\\" not in text and not text.endswith(".toml") and text and builtin.is_file():
        return load_profile(builtin)
    path = Path(text)
    if path.suffix == ".toml" or path.exists():
        return load_profile(path)
    names = ", ".join(p.stem for p in sorted(DEVICES_DIR.glob("*.toml")))
    raise ProfileError(f"unknown device profile {text!r}: give a built-in name ({names}) or the path of a .toml "
                       "profile (`fedsplit profile --out FILE` measures one)")


def profile_to_toml(profile: DeviceProfile) -> str:
    """``profile`` as TOML in the schema ``parse_profile`` reads."""
    lines = []
    for key in FIELDS:
        value = getattr(profile, key)
        if value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    lines += ["", "[sources]"]
    lines += [f"{key} = {_toml_value(profile.sources[key])}" for key in FIGURES if key in profile.sources]
    return "\n".join(lines) + "\n"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(float(value))  # finite (validated): repr round-trips exactly and is a TOML float
    # Validated strings are printable (no control characters), and for those a
    # JSON string is a TOML basic string: quotes and backslashes escaped alike.
    return json.dumps(value, ensure_ascii=False)
