"""Measurements a client reports: peak memory (process and CUDA) and time."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import psutil

_STATUS = Path("/proc/self/status")


def _status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss() -> int:
    """Resident memory now, in bytes."""
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes (VmHWM, else ru_maxrss)."""
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux kB


def reset_peak() -> bool:
    """Reset the peak to the current resident size (Linux); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cuda_peak(device) -> int | None:
    """Peak bytes torch allocated on a CUDA ``device`` so far (None for other devices)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device)
