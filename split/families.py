"""Where each model family keeps its embeddings, blocks, final norm and head.

The partitioner never re-implements a model's forward pass: both sides run the
transformers model's own ``forward`` with the modules they do not own replaced
by placeholders. A family therefore only has to name the modules, as attribute
paths relative to the task model (``BertForSequenceClassification``,
``LlamaForCausalLM``, ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

TASKS = ("classification", "causal-lm")


@dataclass(frozen=True)
class Family:
    """Module layout of one model family.

    prefix:      attribute of the task model that holds the base model.
    blocks:      path (under ``prefix``) of the ``ModuleList`` of transformer blocks.
    embeddings:  modules (under ``prefix``) that turn ids into the first hidden
                 state, the token embedding first. On the server they return
                 zeros and the client's hidden state enters at the first block.
    norm:        final norm (under ``prefix``) or None.
    embed_extras: modules (under ``prefix``) applied between the embeddings and
                 block 0 (embedding dropout, a projection) that the server skips;
                 absent ones are ignored.
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


def _decoder(name: str, model_types: tuple[str, ...], lora_targets: tuple[str, ...] = ("q_proj", "v_proj"),
             **layout) -> Family:
    """A decoder with a score head for classification and an LM head."""
    fields = dict(prefix="model", blocks="layers", embeddings=("embed_tokens",), norm="norm", embed_extras=(),
                  base_head=(), heads={"classification": ("score",), "causal-lm": ("lm_head",)}, rotary=True)
    return Family(name=name, model_types=model_types, lora_targets=lora_targets, **{**fields, **layout})


def _encoder(name: str, model_types: tuple[str, ...], lora_targets: tuple[str, ...] = ("query", "value"),
             **layout) -> Family:
    """A BERT-style encoder (classification only); the prefix comes from the model class."""
    fields = dict(prefix="", blocks="encoder.layer", embeddings=("embeddings",), norm=None, embed_extras=(),
                  base_head=(), heads={"classification": ("classifier",)}, rotary=False)
    return Family(name=name, model_types=model_types, lora_targets=lora_targets, **{**fields, **layout})


FAMILIES: tuple[Family, ...] = (
    _decoder("gpt2", ("gpt2",), ("c_attn",), prefix="transformer", blocks="h", embeddings=("wte", "wpe"),
             norm="ln_f", embed_extras=("drop",), rotary=False, conv1d=True),
    # Gemma scales the token embedding (inside its embedding module); the server's
    # hidden state enters at its first block, so the scale is applied once, on the client.
    _decoder("llama", ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text")),
    _decoder("phi3", ("phi3",), ("qkv_proj",)),
    _decoder("gpt_neox", ("gpt_neox",), ("query_key_value",), prefix="gpt_neox", embeddings=("embed_in",),
             norm="final_layer_norm", embed_extras=("emb_dropout",)),
    _decoder("opt", ("opt",), blocks="decoder.layers", embeddings=("decoder.embed_tokens", "decoder.embed_positions"),
             norm="decoder.final_layer_norm", rotary=False),
    _encoder("bert", ("bert", "roberta"), base_head=("pooler",)),
    # ELECTRA projects the embedding when embedding_size != hidden_size.
    _encoder("electra", ("electra",), embed_extras=("embeddings_project",)),
    _encoder("distilbert", ("distilbert",), ("q_lin", "v_lin"), blocks="transformer.layer",
             heads={"classification": ("pre_classifier", "classifier")}),
)


def family_for(config) -> Family:
    """The family of a transformers config, with the prefix resolved.

    A model type outside ``FAMILIES`` gets a layout detected from the model
    itself (``split.detect``) when its structure is one fedsplit can place;
    otherwise a ValueError names the supported model types.
    """
    model_type = getattr(config, "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam if fam.prefix else replace(fam, prefix=_base_prefix(config))
    from .detect import detect_family  # builds meta models: only for unlisted types

    return detect_family(config, supported_types())


def supported_types() -> list[str]:
    """Model types with a tested entry in ``FAMILIES``."""
    return sorted(t for f in FAMILIES for t in f.model_types)


def _base_prefix(config) -> str:
    """The attribute under which the task models of ``config`` keep the base model."""
    from transformers import MODEL_MAPPING

    return MODEL_MAPPING[type(config)].base_model_prefix


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
