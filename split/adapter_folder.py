"""A saved whole-model adapter folder, read for inference: its LoRA spec and
tensors, its class labels, the cut it was trained with and the checkpoint it
belongs to.

Two kinds of folder are read:

- a client's saved adapter (``fedsplit client --out``): a standard PEFT adapter
  with ``split.json`` beside it (written by ``record_split``: the cut and the
  checkpoint's ``ModelInfo``);
- a federation's round checkpoint (``round_N/``): a standard PEFT adapter whose
  ``clients/`` records (``server/persist.py``) each name the cut of one client,
  and maybe ``base_delta.safetensors`` (frozen-weight changes to add first).

Everything in the folder is user input: a field of the wrong type, a feature
fedsplit does not serve (DoRA, rsLoRA, per-module ranks) or a tensor that is
not finite is an error naming the file and what to do.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .families import block_of
from .json_files import read_json_object
from .lora import PEFT_PREFIX, LoraSpec
from .partition import Cut
from .protocol import ModelInfo, ProtocolError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
SPLIT_RECORD = "split.json"
BASE_DELTA = "base_delta.safetensors"
CLIENT_RECORDS = "clients"  # server/persist.py's folder of per-client records in a round checkpoint
RECORD_META = "fedsplit"  # the safetensors metadata key of such a record
_TASKS = {"SEQ_CLS": "classification", "CAUSAL_LM": "causal-lm"}
# adapter_config.json features fedsplit's LoraSpec cannot express: the server
# could not build the same adapter, so an export of them would not be served.
_UNSUPPORTED = {"use_dora": False, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {},
                "layer_replication": None, "target_parameters": None}


class AdapterError(ValueError):
    """An adapter folder that cannot be used; the message says which file and what to do."""


@dataclass(frozen=True)
class AdapterFolder:
    """What a saved adapter folder holds."""

    path: Path
    spec: LoraSpec
    task: str
    blocks: tuple[int, ...] | None  # layers_to_transform (None: every block)
    heads: tuple[str, ...]  # modules_to_save: the trained head
    tensors: dict[str, torch.Tensor]  # PEFT on-disk names -> float32 tensors
    labels: tuple[str, ...] | None  # class names in head order (config.json's id2label)
    cuts: tuple[Cut, ...]  # the cuts it records (none, one, or a round's several)
    model: ModelInfo | None  # the checkpoint it records (a client's saved adapter only)
    base_delta: dict[str, torch.Tensor]  # module -> d_out x d_in change of frozen weights (round checkpoints)

    def lora_factors(self) -> dict[str, dict[str, torch.Tensor]]:
        """module -> {"A": lora_A, "B": lora_B} for every LoRA module in the folder."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name, value in self.tensors.items():
            module, factor = lora_key(name)
            if module is not None:
                out.setdefault(module, {})[factor] = value
        for module, pair in out.items():
            if set(pair) != {"A", "B"}:
                raise AdapterError(f"{self.path / WEIGHTS}: module {module} has lora_{next(iter(pair))} but no "
                                   f"lora_{'B' if 'A' in pair else 'A'}; the file is incomplete, save it again")
        return out

    def head_tensors(self) -> dict[str, torch.Tensor]:
        """The trained head's tensors under the model's own names."""
        return {name[len(PEFT_PREFIX):]: value for name, value in self.tensors.items()
                if lora_key(name)[0] is None}

    def cut(self, given: Cut | None) -> Cut:
        """The cut to use: ``given`` (--cut) when there is one, else the one
        the folder records; an error when it records none or several."""
        if given is not None:
            return given
        if len(self.cuts) == 1:
            return self.cuts[0]
        if not self.cuts:
            raise AdapterError(f"{self.path} records no cut (no {SPLIT_RECORD}, no {CLIENT_RECORDS}/ records): "
                               "pass --cut K1,K2, the cut the model is to be split at")
        raise AdapterError(f"{self.path}: its clients trained with different cuts "
                           f"({', '.join(str(c) for c in self.cuts)}): pass --cut K1,K2 to choose one")


def lora_key(name: str) -> tuple[str | None, str]:
    """(module, "A" or "B") of a LoRA tensor's PEFT on-disk name; (None, "") otherwise."""
    for factor in ("A", "B"):
        suffix = f".lora_{factor}.weight"
        if name.startswith(PEFT_PREFIX) and name.endswith(suffix):
            return name[len(PEFT_PREFIX):-len(suffix)], factor
    return None, ""


def record_split(folder: str | Path, cut: Cut, model: ModelInfo) -> Path:
    """Write ``split.json`` into a saved adapter folder: the cut it was trained
    with and the checkpoint it belongs to (``fedsplit export`` reads both)."""
    path = Path(folder) / SPLIT_RECORD
    path.write_text(json.dumps({"cut": [cut.front, cut.back], "model": model.to_meta()}, indent=2) + "\n")
    return path


def read_adapter(folder: str | Path) -> AdapterFolder:
    """Read and check an adapter folder (see the module docstring)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise AdapterError(f"--adapter {folder}: not a folder; give the folder a client saved (--out) or a "
                           "round_N checkpoint folder")
    config = read_json_object(folder / CONFIG, AdapterError, "a saved PEFT adapter has one")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{folder / CONFIG}: peft_type {config.get('peft_type')!r}; only LoRA adapters are served")
    for key, plain in _UNSUPPORTED.items():
        if config.get(key, plain) not in (plain, None, {}, False):
            raise AdapterError(f"{folder / CONFIG}: {key} = {config[key]!r} is not supported (fedsplit serves "
                               "plain LoRA: one rank and alpha for every module)")
    task = _TASKS.get(config.get("task_type"))
    if task is None:
        raise AdapterError(f"{folder / CONFIG}: task_type {config.get('task_type')!r}; expected one of "
                           f"{sorted(_TASKS)}")
    spec = _spec(config, folder / CONFIG)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise AdapterError(f"{weights}: missing; a saved adapter folder holds its tensors there")
    tensors = {name: _finite(value, name, weights).float() for name, value in load_file(str(weights)).items()}
    if not tensors:
        raise AdapterError(f"{weights}: holds no tensors")
    base_delta = {}
    if (folder / BASE_DELTA).is_file():
        base_delta = {m: _finite(v, m, folder / BASE_DELTA).float()
                      for m, v in load_file(str(folder / BASE_DELTA)).items()}
    cuts, model = _split_records(folder)
    return AdapterFolder(path=folder, spec=spec, task=task, blocks=_blocks(config, folder / CONFIG),
                         heads=tuple(_strings(config.get("modules_to_save") or [], "modules_to_save",
                                              folder / CONFIG)),
                         tensors=tensors, labels=_labels(folder), cuts=cuts, model=model, base_delta=base_delta)


def server_part(adapter: AdapterFolder, cut: Cut, num_layers: int) -> dict[str, torch.Tensor]:
    """The adapter's LoRA tensors in the blocks the server runs for ``cut``."""
    hosted = set(cut.server_blocks(num_layers))
    return {name: value for name, value in adapter.tensors.items()
            if lora_key(name)[0] is not None and block_of(lora_key(name)[0]) in hosted}


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over each tensor's name, shape and float32 bytes, in name order:
    the same adapter gives the same digest whether read from a file or
    received from a server."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}|{list(value.shape)}|".encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------- parts


def _strings(value, what: str, path: Path) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise AdapterError(f"{path}: {what} must be a list of names, got {value!r}"[:300])
    return value


def _spec(config: dict, path: Path) -> LoraSpec:
    targets = config.get("target_modules")
    if isinstance(targets, str):
        raise AdapterError(f"{path}: target_modules is a pattern ({targets!r}); fedsplit serves adapters whose "
                           "target_modules is a list of module names")
    targets = sorted(_strings(targets, "target_modules", path))
    try:
        return LoraSpec.from_dict({"rank": config.get("r"), "alpha": config.get("lora_alpha"),
                                   "dropout": config.get("lora_dropout") or 0.0, "targets": targets})
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"{path}: bad LoRA settings: {exc}") from None


def _blocks(config: dict, path: Path) -> tuple[int, ...] | None:
    layers = config.get("layers_to_transform")
    if layers is None:
        return None
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                               for i in layers):
        raise AdapterError(f"{path}: layers_to_transform must be a list of block indices, got {layers!r}"[:300])
    return tuple(sorted(set(layers)))


def _labels(folder: Path) -> tuple[str, ...] | None:
    """Class names in head order, from the config.json a saved adapter keeps beside it."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    id2label = read_json_object(path, AdapterError, "").get("id2label")
    if id2label is None:
        return None
    if not isinstance(id2label, dict) or set(id2label) != {str(i) for i in range(len(id2label))}:
        raise AdapterError(f"{path}: id2label must map 0..N-1 to class names, got {id2label!r}"[:300])
    names = [id2label[str(i)] for i in range(len(id2label))]
    if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise AdapterError(f"{path}: id2label must name each class once, got {names!r}"[:300])
    return tuple(names)


def _split_records(folder: Path) -> tuple[tuple[Cut, ...], ModelInfo | None]:
    """The cuts (and checkpoint) a folder records: ``split.json`` of a client's
    saved adapter, or the cuts of a round checkpoint's client records."""
    record = folder / SPLIT_RECORD
    if record.is_file():
        data = read_json_object(record, AdapterError, "")
        try:
            cut = _cut(data.get("cut"))
            model = ModelInfo.from_meta(data.get("model"), SPLIT_RECORD)
        except (ProtocolError, ValueError) as exc:
            raise AdapterError(f"{record}: {exc}") from None
        return (cut,), model
    cuts = set()
    for path in sorted((folder / CLIENT_RECORDS).glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt") as fh:
                cuts.add(_cut(json.loads((fh.metadata() or {})[RECORD_META])["cut"]))
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise AdapterError(f"{path}: not a readable client record ({type(exc).__name__}: {exc})") from None
    return tuple(sorted(cuts, key=lambda c: (c.front, c.back))), None


def _cut(value) -> Cut:
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"cut must be [K1, K2], got {value!r}"[:200])
    return Cut(*value)


def _finite(value: torch.Tensor, name: str, path: Path) -> torch.Tensor:
    if not value.is_floating_point():
        raise AdapterError(f"{path}: tensor {name} is {value.dtype}, expected floating point")
    if not bool(torch.isfinite(value).all()):
        raise AdapterError(f"{path}: tensor {name} holds NaN or infinite values")
    return value

