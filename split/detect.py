"""The layout of a decoder whose model type has no entry in ``split.families``.

The partitioner needs to know where a model keeps its embeddings, blocks, final
norm and heads. For an unlisted model type that is read off the model itself,
built on the meta device, and accepted only when the structure leaves no doubt:
the base model holds, as direct children, token and position embeddings
(``nn.Embedding``) before one ``ModuleList`` of ``num_hidden_layers`` blocks and
at most one norm after it; anything else that has weights is refused. Such a
model is safe to split because the server's hidden state enters at the input of
its first block (``partition.Injected``): what the model does between its
embeddings and its blocks (scaling, adding positions) runs on the client only.
"""

from __future__ import annotations

import logging

from accelerate import init_empty_weights
from torch import nn
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING
from transformers.pytorch_utils import Conv1D

from .families import Family

log = logging.getLogger(__name__)

# Attention projections LoRA targets by default, by the names models give them.
_LORA_TARGETS = (("q_proj", "v_proj"), ("query", "value"), ("qkv_proj",), ("query_key_value",), ("c_attn",),
                 ("Wqkv",))
_TASK_MAPPINGS = {"causal-lm": MODEL_FOR_CAUSAL_LM_MAPPING, "classification": MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING}
# block_of (split.families) finds block indices under these names.
_BLOCK_NAMES = ("layers", "layer", "h")

_detected: dict[type, Family] = {}


class LayoutUnclear(ValueError):
    """The model's structure is not one the partitioner can place safely."""


def detect_family(config, supported: list[str]) -> Family:
    """The layout of ``config``'s model, detected from its structure; a
    ValueError naming the supported model types when it cannot be placed."""
    key = type(config)
    if key not in _detected:
        try:
            _detected[key] = _detect(config)
        except LayoutUnclear as exc:
            raise ValueError(
                f"model type {config.model_type!r} is not supported: {exc}. fedsplit partitions "
                f"{', '.join(supported)}, and decoders whose layout it can read off the model "
                "(embeddings, one list of blocks, a final norm)"
            ) from None
        fam = _detected[key]
        log.warning("model type %r has no tested fedsplit family; using the layout read off the model: blocks "
                    "%s.%s, embeddings %s, norm %s, heads %s, LoRA targets %s", config.model_type, fam.prefix,
                    fam.blocks, ", ".join(fam.embeddings), fam.norm, fam.heads, ", ".join(fam.lora_targets))
    return _detected[key]


def _detect(config) -> Family:
    models = _task_models(config)
    if not models:
        raise LayoutUnclear("transformers has neither a causal-LM nor a sequence-classification class for it")
    prefixes = {m.base_model_prefix for m in models.values()}
    if len(prefixes) != 1:
        raise LayoutUnclear(f"its task models keep the base model under different names {sorted(prefixes)}")
    prefix = prefixes.pop()
    model = next(iter(models.values()))
    base = getattr(model, prefix, None)
    if not isinstance(base, nn.Module):
        raise LayoutUnclear(f"{type(model).__name__} has no base model at {prefix!r}")
    blocks, embeddings, norm = _base_layout(base, config.num_hidden_layers, model.get_input_embeddings())
    targets, conv1d = _lora_targets(getattr(base, blocks)[0])
    return Family(
        name=f"detected:{config.model_type}",
        model_types=(config.model_type,),
        prefix=prefix,
        blocks=blocks,
        embeddings=embeddings,
        norm=norm,
        embed_extras=(),
        base_head=(),
        heads={task: _heads(m, prefix, task) for task, m in models.items()},
        rotary=True,  # position ids cross the wire; harmless where the blocks ignore them
        lora_targets=targets,
        conv1d=conv1d,
    )


def _task_models(config) -> dict[str, nn.Module]:
    """The task models transformers has for ``config``, on the meta device."""
    models = {}
    for task, mapping in _TASK_MAPPINGS.items():
        if type(config) in mapping:
            with init_empty_weights(include_buffers=False):
                models[task] = mapping[type(config)]._from_config(config)
    return models


def _has_weights(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _base_layout(base: nn.Module, num_layers: int,
                 token_embedding: nn.Module) -> tuple[str, tuple[str, ...], str | None]:
    """(blocks, embeddings, norm) as names of the base model's children."""
    children = list(base.named_children())
    lists = [i for i, (_, m) in enumerate(children) if isinstance(m, nn.ModuleList) and len(m) == num_layers]
    if len(lists) != 1:
        raise LayoutUnclear(f"{type(base).__name__} does not hold exactly one list of its {num_layers} blocks")
    at = lists[0]
    blocks = children[at][0]
    if blocks not in _BLOCK_NAMES:
        raise LayoutUnclear(f"its blocks are called {blocks!r}, not one of {_BLOCK_NAMES}")
    before = [(n, m) for n, m in children[:at] if _has_weights(m)]
    after = [(n, m) for n, m in children[at + 1:] if _has_weights(m)]
    odd = [n for n, m in before if not isinstance(m, nn.Embedding)]
    odd += [n for n, m in after[1:]] + [n for n, m in after[:1] if "norm" not in type(m).__name__.lower()]
    if odd:
        raise LayoutUnclear(f"{type(base).__name__} has weights in {', '.join(odd)}, which are neither "
                            "embeddings before the blocks nor one final norm after them")
    first = [n for n, m in before if m is token_embedding]
    if not first:
        raise LayoutUnclear("its input embedding is not a direct child of the base model")
    embeddings = (first[0], *(n for n, _ in before if n != first[0]))
    return blocks, embeddings, after[0][0] if after else None


def _heads(model: nn.Module, prefix: str, task: str) -> tuple[str, ...]:
    """The task model's modules with weights outside the base model."""
    heads = tuple(n for n, m in model.named_children() if n != prefix and _has_weights(m))
    if task == "causal-lm" and heads != (_path_of(model, model.get_output_embeddings()),):
        raise LayoutUnclear(f"{type(model).__name__} has weights outside its base model besides the LM head: "
                            f"{', '.join(heads)}")
    if not heads:
        raise LayoutUnclear(f"{type(model).__name__} has no head")
    return heads


def _path_of(root: nn.Module, module: nn.Module) -> str | None:
    return next((n for n, m in root.named_modules() if m is module), None)


def _lora_targets(block: nn.Module) -> tuple[tuple[str, ...], bool]:
    """Default LoRA targets (attention query and value) and whether they are Conv1D."""
    layers = {n.rsplit(".", 1)[-1]: m for n, m in block.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    for targets in _LORA_TARGETS:
        if all(t in layers for t in targets):
            return targets, isinstance(layers[targets[0]], Conv1D)
    raise LayoutUnclear(f"none of its block's layers {sorted(layers)} is an attention projection fedsplit "
                        f"recognises ({', '.join('/'.join(t) for t in _LORA_TARGETS)})")
