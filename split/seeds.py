"""The one seed derivation: every random draw in fedsplit is named.

A draw is identified by the run's seed and a path of names (a module name, a
round, a client), hashed with SHA-256. The result is the same in every process
and on every machine, unlike Python's ``hash()`` (salted per process), so the
client and the server draw the same LoRA for the same module, and a resumed
run repeats the draws of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager

import torch


def stable_seed(seed: int, *names) -> int:
    """A 63-bit seed derived from ``seed`` and ``names`` (joined with ``:``)."""
    key = ":".join(str(part) for part in (seed, *names))
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, *names) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``stable_seed(seed, *names)``."""
    return torch.Generator().manual_seed(stable_seed(seed, *names))


@contextmanager
def seeded_rng(device: torch.device | str, seed: int, *names):
    """Run the body with torch's global generator (CPU and, on a CUDA device,
    that device's) seeded from ``stable_seed(seed, *names)``, and restore the
    generators after. Dropout draws from the global generator; seeding it per
    step makes a step's masks a function of the run's seed and the step alone,
    whatever else ran in the process before."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(stable_seed(seed, *names))
        yield
