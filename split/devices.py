"""Where a side computes and in which precision its frozen weights are held.

LoRA factors and trained heads stay float32 whatever the frozen dtype (peft
keeps adapters in float32 beside half-precision weights); what crosses the wire
is cast to the receiver's device and dtype on arrival, so the two sides choose
independently.
"""

from __future__ import annotations

import torch

DEVICES = ("cpu", "cuda", "mps", "auto")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (``cuda:N``), ``mps`` or ``auto`` (CUDA, else MPS, else
    CPU) as a torch device; a device this machine lacks is an error."""
    kind = name.split(":", 1)[0]
    if kind not in DEVICES or (":" in name and kind != "cuda"):
        raise ValueError(f"--device {name!r}: use one of {', '.join(DEVICES)} (or cuda:N)")
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this torch build sees no CUDA device "
                             f"(torch {torch.__version__}); use --device cpu or install a CUDA build of torch")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
        return device
    if kind == "mps" and not _mps_available():
        raise ValueError("--device mps: MPS is not available on this machine; use --device cpu")
    return torch.device(kind)


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """``float32``, ``bfloat16`` or ``float16`` (or such a torch dtype) for frozen weights."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ValueError(f"frozen weights are held in {', '.join(DTYPES)}, not {name}")
        return name
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _to_float32(module, args):
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def place(model: torch.nn.Module, device: torch.device, float32_modules=()) -> torch.nn.Module:
    """Move ``model`` to ``device``, with the modules at the dotted paths in
    ``float32_modules`` (trained heads) held in float32 whatever the frozen
    dtype (an optimizer stepping half-precision weights loses small updates);
    their inputs are cast to float32 on the way in."""
    for path in float32_modules:
        module = model.get_submodule(path)
        if any(p.dtype != torch.float32 for p in module.parameters()):
            module.float()
            module.register_forward_pre_hook(_to_float32)
    return model.to(device)
