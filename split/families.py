"""Where each model family keeps its embeddings, blocks, final norm and head.

The partitioner never re-implements a model's forward pass: both sides run the
transformers model's own ``forward`` with the modules they do not own replaced
by placeholders. A family therefore only has to name the modules, as attribute
paths relative to the task model (``BertForSequenceClassification``,
``LlamaForCausalLM``, ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TASKS = ("classification", "causal-lm")


@dataclass(frozen=True)
class Family:
    """Module layout of one model family.

    prefix:      attribute of the task model that holds the base model.
    blocks:      path (under ``prefix``) of the ``ModuleList`` of transformer blocks.
    embeddings:  modules (under ``prefix``) that turn ids into the first hidden
                 state; the first one is the one the server's injected hidden
                 state replaces, the others contribute zeros there.
    norm:        final norm (under ``prefix``) or None.
    embed_extras: modules (under ``prefix``) applied between the embeddings and
                 block 0 (embedding dropout) that the server must skip.
    base_head:   head parts that live inside the base model (BERT's pooler).
    heads:       per task, the head modules on the task model.
    rotary:      True when blocks need position ids (rotary embeddings), which
                 then cross the wire.
    lora_targets: default LoRA target module names (attention query and value).
    conv1d:      True when linear weights are stored in x out (transformers'
                 ``Conv1D``, GPT-2): the one place fedsplit learns a weight's
                 orientation (peft's ``fan_in_fan_out``).
    """

    name: str
    model_types: tuple[str, ...]
    prefix: str
    blocks: str
    embeddings: tuple[str, ...]
    norm: str | None
    embed_extras: tuple[str, ...]
    base_head: tuple[str, ...]
    heads: dict[str, tuple[str, ...]]
    rotary: bool
    lora_targets: tuple[str, ...]
    conv1d: bool = False

    def head_modules(self, task: str) -> tuple[str, ...]:
        """Task-model paths of the head for ``task`` (clear error if unsupported)."""
        if task not in self.heads:
            raise ValueError(
                f"task {task!r} is not supported for the {self.name} family; "
                f"use one of {sorted(self.heads)}"
            )
        return self.heads[task]

    def trained_heads(self, task: str) -> list[str]:
        """Head modules trained beside LoRA: a classification head is new and
        must learn; a language-model head is pretrained (and often tied to the
        embedding) and stays frozen."""
        return list(self.head_modules(task)) if task == "classification" else []


FAMILIES: tuple[Family, ...] = (
    Family(
        name="gpt2",
        model_types=("gpt2",),
        prefix="transformer",
        blocks="h",
        embeddings=("wte", "wpe"),
        norm="ln_f",
        embed_extras=("drop",),
        base_head=(),
        heads={"classification": ("score",), "causal-lm": ("lm_head",)},
        rotary=False,
        lora_targets=("c_attn",),
        conv1d=True,
    ),
    Family(
        name="llama",
        model_types=("llama", "qwen2", "mistral"),
        prefix="model",
        blocks="layers",
        embeddings=("embed_tokens",),
        norm="norm",
        embed_extras=(),
        base_head=(),
        heads={"classification": ("score",), "causal-lm": ("lm_head",)},
        rotary=True,
        lora_targets=("q_proj", "v_proj"),
    ),
    Family(
        name="bert",
        model_types=("bert", "roberta"),
        prefix="",  # filled per model type: "bert" or "roberta"
        blocks="encoder.layer",
        embeddings=("embeddings",),
        norm=None,
        embed_extras=(),
        base_head=("pooler",),
        heads={"classification": ("classifier",)},
        rotary=False,
        lora_targets=("query", "value"),
    ),
)


def family_for(config) -> Family:
    """The family of a transformers config, with the prefix resolved.

    Raises a ValueError naming the supported model types otherwise.
    """
    model_type = getattr(config, "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            if fam.name == "bert":
                return Family(**{**fam.__dict__, "prefix": model_type})
            return fam
    supported = sorted(t for f in FAMILIES for t in f.model_types)
    raise ValueError(
        f"model type {model_type!r} is not supported; fedsplit partitions {', '.join(supported)}"
    )


def get_module(root, path: str):
    """Follow a dotted attribute path (``""`` is ``root`` itself)."""
    obj = root
    for part in filter(None, path.split(".")):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def set_module(root, path: str, module) -> None:
    """Replace the module at a dotted path."""
    parent_path, _, leaf = path.rpartition(".")
    parent = get_module(root, parent_path)
    if leaf.isdigit():
        parent[int(leaf)] = module
    else:
        setattr(parent, leaf, module)


def join(*parts: str) -> str:
    """Join dotted path parts, skipping empty ones."""
    return ".".join(p for p in parts if p)


_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h)\.(\d+)\.")


def block_of(module: str) -> int | None:
    """Block index in a whole-model module name (None outside the blocks)."""
    m = _BLOCK.search(module)
    return int(m.group(1)) if m else None
