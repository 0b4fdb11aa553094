"""Read selected tensors from a checkpoint's safetensors file(s).

The safetensors library memory-maps the whole file; pages it touches stay
resident until the map is closed, which would double a side's peak memory while
it loads. Here each wanted tensor is read with ``readinto`` straight into its
final buffer, so a side's peak is the bytes of the tensors it owns, no more.
The format is the published one: an 8-byte little-endian header length, a JSON
header of ``{name: {dtype, shape, data_offsets}}``, then the raw data.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, dtype, shape and byte range."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    nbytes: int


def _read_header(path: Path) -> dict[str, TensorEntry]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    base = 8 + length
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        entries[name] = TensorEntry(path, _DTYPES[info["dtype"]], tuple(info["shape"]), base + begin, end - begin)
    return entries


class CheckpointIndex:
    """The tensors of a model folder (single or sharded safetensors)."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [folder / s for s in shards]
        elif single.exists():
            files = [single]
        else:
            raise FileNotFoundError(
                f"no model.safetensors or model.safetensors.index.json in {folder}; "
                "fedsplit reads safetensors checkpoints only (convert with "
                "`model.save_pretrained(folder, safe_serialization=True)`)"
            )
        self.entries: dict[str, TensorEntry] = {}
        for file in files:
            self.entries.update(_read_header(file))

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def nbytes(self, name: str) -> int:
        """Stored size of one tensor in bytes."""
        return self.entries[name].nbytes

    def total_bytes(self) -> int:
        """Stored size of every tensor in the checkpoint."""
        return sum(e.nbytes for e in self.entries.values())

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor into fresh memory, cast to ``dtype`` if given."""
        entry = self.entries[name]
        out = torch.empty(entry.shape, dtype=entry.dtype)
        view = out.reshape(-1).view(torch.uint8).numpy()
        with open(entry.file, "rb") as f:
            f.seek(entry.start)
            got = f.readinto(memoryview(view))
        if got != entry.nbytes:
            raise ValueError(f"{entry.file}: tensor {name} is truncated ({got} of {entry.nbytes} bytes)")
        if dtype is not None and dtype != out.dtype and out.is_floating_point():
            out = out.to(dtype)
        return out
