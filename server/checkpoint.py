"""Atomic round checkpoints: the global model after each round, and what a
resumed federation continues from.

``round_{t}/`` holds:

- ``adapter_config.json`` + ``adapter_model.safetensors``: the global LoRA after
  round t as one standard PEFT adapter for the whole model (the head, if
  clients train one, as a module to save);
- ``base_delta.safetensors`` (only for methods that change frozen weights,
  FedEx-LoRA and FLoRA): the sum of those changes, d_out x d_in per module,
  to add to the base model before loading the adapter (``apply_base_delta``);
- ``coordinator.safetensors`` + ``coordinator.json``: the strategy's state and
  the coordinator's, to resume from;
- ``clients/``: each federated client's server-side adapter as round t+1
  starts, with its owner's token hash (``server/persist.py``), given back to
  that client when it registers with a resumed server.

A round is written to ``round_{t}.tmp`` and renamed into place, so a folder
named ``round_{t}`` is always complete, client records included. Server-side
optimizers restart every round, so no optimizer state crosses a round boundary.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from split.families import Family, family_for
from split.lora import PEFT_PREFIX, LoraSpec, fold_into, save_adapter

from .persist import CLIENTS, Record, write_record
from .strategies.base import GlobalModel


def flatten(tree, prefix: str = "") -> tuple[object, dict[str, torch.Tensor]]:
    """Split a nested structure into JSON (tensors replaced by references) and tensors."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node, path):
        if isinstance(node, torch.Tensor):
            tensors[path] = node.detach().contiguous().clone()
            return {"__tensor__": path}
        if isinstance(node, dict):
            if not all(isinstance(k, str) for k in node):
                raise TypeError(f"{path or 'state'}: checkpointed maps need string keys")
            return {k: walk(v, f"{path}/{k}" if path else k) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(node)]
        if isinstance(node, frozenset | set):
            return {"__set__": sorted(node)}
        if node is None or isinstance(node, (str, int, float, bool)):
            return node
        raise TypeError(f"{path or 'state'}: cannot checkpoint a {type(node).__name__}")

    return walk(tree, prefix), tensors


def unflatten(tree, tensors: dict[str, torch.Tensor]):
    """Inverse of ``flatten``."""
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            return tensors[tree["__tensor__"]]
        if set(tree) == {"__set__"}:
            return frozenset(tree["__set__"])
        return {k: unflatten(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [unflatten(v, tensors) for v in tree]
    return tree


def adapter_tensors(glob: GlobalModel, shared: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """The global model under PEFT's on-disk names: its factors, the shared
    server-side LoRA (SplitFed-V2, trained by every client, so global as it
    is) and the head."""
    tensors = {}
    pairs = {m: (glob.A[m], glob.B[m]) for m in glob.A}
    pairs.update(shared)
    for m, (a, b) in pairs.items():
        tensors[f"{PEFT_PREFIX}{m}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{m}.lora_B.weight"] = b
    tensors.update({f"{PEFT_PREFIX}{name}": v for name, v in glob.head.items()})
    return tensors


def write_round(root: str | Path, round_index: int, glob: GlobalModel, family: Family, task: str,
                base_model: str, base_delta: dict[str, torch.Tensor], coordinator: dict,
                shared: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                labels: tuple[str, ...] | None = None, clients: list[Record] | None = None) -> Path:
    """Write ``root/round_{round_index}`` atomically; returns its path.

    ``glob`` must hold both factors of every module (zeros where a method
    keeps a factor on the clients); ``labels`` (the clients' class names) name
    the head's classes in the round's config.json; ``clients`` are the
    clients' server-side adapters, written under ``clients/``."""
    root = Path(root)
    final = root / f"round_{round_index}"
    tmp = root / f"round_{round_index}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    targets = sorted({m.rsplit(".", 1)[-1] for m in glob.A} | {m.rsplit(".", 1)[-1] for m in shared or {}})
    heads = sorted({name.rsplit(".", 1)[0] for name in glob.head})
    trained = family.trained_heads(task)
    stray = [h for h in heads if not any(h == t or h.startswith(t + ".") for t in trained)]
    if stray:
        # Written as modules to save, they would overwrite base weights once the adapter is loaded.
        raise ValueError(f"round {round_index}: head tensors of {stray[:3]} are not part of the model's trained "
                         f"head ({', '.join(trained) or 'none'}); the round is not written")
    save_adapter(tmp, adapter_tensors(glob, shared or {}), LoraSpec(glob.rank, glob.alpha, targets=tuple(targets)),
                 family, task, base_model, heads, labels=None if labels is None else list(labels))
    if base_delta:
        save_file({k: v.contiguous() for k, v in base_delta.items()}, str(tmp / "base_delta.safetensors"))
    tree, tensors = flatten(coordinator)
    save_file(tensors, str(tmp / "coordinator.safetensors"))
    (tmp / "coordinator.json").write_text(json.dumps(tree))
    for record in clients or []:
        write_record(tmp / CLIENTS, record)
    for f in tmp.rglob("*"):  # the rename below must not expose unflushed files
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def last_round(root: str | Path) -> Path | None:
    """The newest complete ``round_{t}`` folder under ``root``, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    rounds = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("round_") and p.name[6:].isdigit()]
    return max(rounds, key=lambda p: int(p.name[6:]), default=None)


def read_coordinator(folder: str | Path) -> dict:
    """The coordinator state saved in a round folder."""
    folder = Path(folder)
    tensors = load_file(str(folder / "coordinator.safetensors"))
    return unflatten(json.loads((folder / "coordinator.json").read_text()), tensors)


def apply_base_delta(model, folder: str | Path) -> int:
    """Add a round's ``base_delta.safetensors`` to a plain transformers model's
    frozen weights (before loading the round's adapter); returns modules changed."""
    path = Path(folder) / "base_delta.safetensors"
    if not path.exists():
        return 0
    conv1d = family_for(model.config).conv1d
    deltas = load_file(str(path))
    for module, delta in deltas.items():
        fold_into(model.get_submodule(module).weight, delta, conv1d)
    return len(deltas)
