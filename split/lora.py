"""LoRA on a segment with peft, under the whole model's module names.

A client's block 11 is still ``...layers.11...`` and a server's block 3 still
``...layers.3...``, so the two sides' adapter tensors are disjoint pieces of one
adapter for the whole model and save together as a standard PEFT adapter.

LoRA A matrices are initialised from a seed and the module's whole-model name,
not from the global random stream, so a module starts identical wherever it is
built: on a client, on the server, or in a monolithic model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import AutoConfig

from .families import Family
from .quant import is_quantized, refuse_frozen_updates
from .seeds import generator

PEFT_PREFIX = "base_model.model."
_TASK_TYPES = {"classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}


@dataclass(frozen=True)
class LoraSpec:
    """Rank, scaling and targets of one LoRA adapter."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None  # None: the family's attention query/value

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoRA alpha must be a finite number > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    def target_modules(self, family: Family) -> list[str]:
        return list(self.targets or family.lora_targets)

    def peft_config(self, family: Family, modules_to_save: list[str] | None, task: str,
                    blocks: list[int] | None = None) -> LoraConfig:
        """The peft LoraConfig for this spec on ``family``; ``blocks`` limits
        LoRA to those block indices."""
        return LoraConfig(
            layers_to_transform=blocks,
            layers_pattern=family.blocks.rsplit(".", 1)[-1] if blocks is not None else None,
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules(family),
            modules_to_save=modules_to_save or None,
            fan_in_fan_out=family.conv1d,
            task_type=_TASK_TYPES[task],
        )

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "targets": list(self.targets) if self.targets else None}

    @classmethod
    def from_dict(cls, d: dict) -> "LoraSpec":
        """The spec of ``to_dict``; refuses values of the wrong type (ValueError)."""
        rank, alpha = d["rank"], d["alpha"]
        dropout, targets = d.get("dropout", 0.0), d.get("targets")
        if not isinstance(rank, int) or isinstance(rank, bool):
            raise ValueError(f"rank must be an integer, got {rank!r}")
        for name, value in (("alpha", alpha), ("dropout", dropout)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if targets is not None and (not isinstance(targets, (list, tuple))
                                    or not all(isinstance(t, str) and t for t in targets)):
            raise ValueError(f"targets must be a list of module names, got {targets!r}")
        return cls(rank, float(alpha), float(dropout), tuple(targets) if targets else None)


def init_lora(model: PeftModel, adapter: str, seed: int) -> None:
    """Initialise every LoRA pair of ``adapter``: A as peft does (Kaiming-uniform,
    a = sqrt(5)) from a generator seeded by ``seed`` and the module's name; B = 0.
    A is drawn in float32 on the CPU and copied to the layer, so a module starts
    the same on every device and side."""
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or adapter not in lora_a:
            continue
        whole = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
        weight = lora_a[adapter].weight
        drawn = torch.empty(weight.shape)
        torch.nn.init.kaiming_uniform_(drawn, a=math.sqrt(5), generator=generator(seed, whole))
        with torch.no_grad():
            weight.copy_(drawn)
            module.lora_B[adapter].weight.zero_()


def attach_lora(model, spec: LoraSpec, family: Family, task: str, seed: int,
                modules_to_save: list[str] | None = None, adapter: str = "default",
                blocks: list[int] | None = None) -> PeftModel:
    """Wrap ``model`` (or add an adapter to a PeftModel) and initialise it;
    ``blocks`` limits LoRA to those blocks."""
    config = spec.peft_config(family, modules_to_save, task, blocks)
    if isinstance(model, PeftModel):
        model.add_adapter(adapter, config)
    else:
        model = get_peft_model(model, config, adapter_name=adapter)
    init_lora(model, adapter, seed)
    return model


def adapter_state(model: PeftModel, adapter: str = "default") -> dict[str, torch.Tensor]:
    """CPU copies of the adapter's tensors under PEFT's on-disk names (whole-model names)."""
    state = get_peft_model_state_dict(model, adapter_name=adapter)
    return {k: _cpu_copy(v).contiguous() for k, v in state.items()}


def save_adapter(folder: str | Path, state: dict[str, torch.Tensor], spec: LoraSpec, family: Family,
                 task: str, base_model: str, modules_to_save: list[str], blocks: list[int] | None = None,
                 labels: list[str] | None = None, tokenizer=None) -> Path:
    """Write a standard PEFT adapter folder (adapter_config.json +
    adapter_model.safetensors) that ``PeftModel.from_pretrained`` loads;
    ``blocks`` limits the adapter to those blocks (None: every block).

    With ``labels`` (classification) the folder also gets the base model's
    config.json with ``num_labels``, ``id2label`` and ``label2id``, where
    transformers looks for label names; with ``tokenizer`` it gets the tokenizer
    the adapter was trained with."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = spec.peft_config(family, modules_to_save, task, blocks)
    config.base_model_name_or_path = str(base_model)
    config.save_pretrained(str(folder))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    if labels is not None:
        if task != "classification":
            raise ValueError(f"labels name the classes of a classification head; task {task!r} has none")
        model_config = AutoConfig.from_pretrained(base_model)
        model_config.num_labels = len(labels)
        model_config.id2label = dict(enumerate(labels))
        model_config.label2id = {label: i for i, label in enumerate(labels)}
        model_config.save_pretrained(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder


def lora_layers(model: PeftModel, adapter: str = "default") -> dict:
    """Whole-model module name -> peft LoRA layer holding ``adapter``."""
    out = {}
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is not None and adapter in lora_a:
            out[name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name] = module
    return out


def get_factors(model: PeftModel, adapter: str = "default",
                modules=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """CPU copies of (A, B) per module: A = lora_A (r x d_in), B = lora_B (d_out x r)."""
    return {name: (_cpu_copy(layer.lora_A[adapter].weight), _cpu_copy(layer.lora_B[adapter].weight))
            for name, layer in lora_layers(model, adapter).items() if modules is None or name in modules}


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)


def set_factors(model: PeftModel, A: dict[str, torch.Tensor], B: dict[str, torch.Tensor],
                adapter: str = "default") -> None:
    """Load factors into the adapter; modules or factors left out keep their values."""
    layers = lora_layers(model, adapter)
    unknown = (set(A) | set(B)) - set(layers)
    if unknown:
        raise KeyError(f"no LoRA module {sorted(unknown)[:3]} in this model")
    with torch.no_grad():
        for name, value in A.items():
            target = layers[name].lora_A[adapter].weight
            if target.shape != value.shape:
                raise ValueError(f"{name}: lora_A has shape {tuple(target.shape)}, got {tuple(value.shape)}")
            target.copy_(value)
        for name, value in B.items():
            target = layers[name].lora_B[adapter].weight
            if target.shape != value.shape:
                raise ValueError(f"{name}: lora_B has shape {tuple(target.shape)}, got {tuple(value.shape)}")
            target.copy_(value)


def set_trainable(model: PeftModel, which: str, adapter: str = "default", modules=None) -> list:
    """Let only ``which`` factors ("both", "A" or "B") of ``modules`` (None: all)
    train; returns the parameters that train."""
    params = []
    for name, layer in lora_layers(model, adapter).items():
        on = modules is None or name in modules
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        a.requires_grad_(on and which in ("both", "A"))
        b.requires_grad_(on and which in ("both", "B"))
        params += [p for p in (a, b) if p.requires_grad]
    return params


def native_delta(delta: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """``delta`` (d_out x d_in) in a layer's own orientation: transposed for
    Conv1D-style weights stored in x out (peft's ``fan_in_fan_out``), as is for
    ``nn.Linear``. Adding it without honouring the flag fits a square weight's
    shape and is silently wrong."""
    return delta.T if fan_in_fan_out else delta


def fold_into(weight: torch.Tensor, delta: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """Add ``delta`` (d_out x d_in) to ``weight`` in place, in the weight's own
    orientation, dtype and device; returns ``weight``."""
    native = native_delta(delta, fan_in_fan_out)
    if tuple(native.shape) != tuple(weight.shape):
        raise ValueError(
            f"cannot fold a delta of shape {tuple(delta.shape)} (d_out x d_in) into a weight of shape "
            f"{tuple(weight.shape)} with fan_in_fan_out={fan_in_fan_out}")
    with torch.no_grad():
        weight.add_(native.to(dtype=weight.dtype, device=weight.device))
    return weight


def fold_delta(model: PeftModel, module: str, delta: torch.Tensor) -> None:
    """Add ``delta`` (d_out x d_in) to the frozen weight of a LoRA module of
    ``model``, in the layer's own orientation. A quantized weight is refused
    (``split.quant``: the update would be rounded away)."""
    layer = model.get_submodule(PEFT_PREFIX + module)
    base = layer.get_base_layer()
    if is_quantized(base):
        raise refuse_frozen_updates(f"an update to the frozen weight of {module}")
    fold_into(base.weight, delta, getattr(layer, "fan_in_fan_out", False))


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` with zero rows appended up to ``rows`` (a pruned rank on a full-rank adapter)."""
    if x.shape[0] >= rows:
        return x
    return torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])])
