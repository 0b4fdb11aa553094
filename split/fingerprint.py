"""A cheap fingerprint of a checkpoint, so that client and server can prove
they hold the same model before training through each other.

Type, depth and width agree for every fine-tuned variant of a model, so they do
not identify one. A full hash would read gigabytes. The fingerprint hashes the
config (less the keys that change when the same weights are re-saved), every
tensor's name, dtype and shape, and a short sample of each tensor's bytes at
its start, middle and end: any fine-tune, re-initialisation or truncated
download changes the sample of nearly every tensor, and computing it reads a
few kilobytes per tensor.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import ExitStack
from pathlib import Path

from .tensorfile import CheckpointIndex

SAMPLE_BYTES = 64
# Keys transformers rewrites on every save; the same weights re-saved by a
# newer release must keep their fingerprint.
_VOLATILE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures"}


def _config_digest(folder: Path) -> bytes:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder}: no config.json; a model folder needs config.json and safetensors")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    kept = {k: v for k, v in config.items() if k not in _VOLATILE}
    return json.dumps(kept, sort_keys=True).encode()


def _samples(f, entry) -> bytes:
    """Up to three SAMPLE_BYTES windows of a tensor's data: start, middle, end."""
    width = min(SAMPLE_BYTES, entry.nbytes)
    starts = sorted({0, max(0, entry.nbytes // 2 - width // 2), entry.nbytes - width})
    out = bytearray()
    for start in starts:
        f.seek(entry.start + start)
        out += f.read(width)
    return bytes(out)


def checkpoint_fingerprint(folder: str | Path, index: CheckpointIndex | None = None) -> str:
    """Hex SHA-256 over the config and, per tensor in name order, its name,
    dtype, shape and sampled bytes. Independent of shard layout and file order."""
    folder = Path(folder)
    index = index or CheckpointIndex(folder)
    digest = hashlib.sha256(_config_digest(folder))
    with ExitStack() as stack:
        files = {}
        for name in sorted(index.entries):
            entry = index.entries[name]
            if entry.file not in files:
                files[entry.file] = stack.enter_context(open(entry.file, "rb"))
            digest.update(f"{name}|{entry.dtype}|{list(entry.shape)}|".encode())
            digest.update(_samples(files[entry.file], entry))
    return digest.hexdigest()
