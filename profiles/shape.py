"""The numbers of a model that the cost model needs, read once from its config.

``ModelShape.from_config`` builds the task model on the meta device (no memory
for weights) and counts the parameters each part holds: the embeddings, every
block, the final norm, the pooler and the task head, and the LoRA targets of a
block with their (d_out, d_in), as ``split.lora.LoraSpec`` chooses them for the
family. Everything the cost model computes afterwards is arithmetic on these
numbers, so a planner can ask for thousands of plans.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

from torch import nn

from split.families import family_for, join
from split.partition import new_heads

# Which activation formula (profiles/activations.py) fits each model type. Each
# was checked against the tensors autograd saves and the forward allocates
# (tests/test_cost_model.py); model types whose blocks differ (Qwen3's and
# Gemma's extra norms, Gemma's scaled GELU) have none yet.
ARCHITECTURES = {
    "bert": "encoder",  # post-LN encoders: BERT (and MiniLM), RoBERTa, ELECTRA
    "roberta": "encoder",
    "electra": "encoder",
    "gpt2": "gpt2",  # pre-LN decoder with a GELU MLP
    "llama": "gated",  # pre-RMSNorm decoders with a gated (SwiGLU) MLP
    "qwen2": "gated",
    "mistral": "gated",
}


@dataclass(frozen=True)
class ModelShape:
    """Sizes of one model for one task; counts are parameters (elements)."""

    family: str
    architecture: str  # "encoder", "gpt2" or "gated" (profiles/activations.py)
    task: str  # "classification" or "causal-lm"
    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    num_labels: int
    embedding_params: int  # token (and position, type) embeddings, their norm, extras
    block_params: tuple[int, ...]  # per block
    norm_params: int  # the final norm (0 where there is none)
    pooler_params: int  # a pooler inside the base model (BERT)
    head_params: int  # the task head; 0 when it shares the token embedding's tensor
    head_trained: bool  # a new classification head trains beside LoRA
    lora_targets: tuple[tuple[str, int, int], ...]  # per block: (module name, d_out, d_in)
    attention_dropout: float
    hidden_dropout: float
    rotary: bool
    # per block, (d_out, d_in) of each linear layer: what --quantize holds in 8 or 4 bits
    block_linears: tuple[tuple[tuple[int, int], ...], ...] = ()
    checkpoint_dtype: str = "float32"  # what the checkpoint stores (the config's dtype; float32 when unsaid)
    # the token embedding (rows, width), part of embedding_params; --quantize holds it in 8 or 4 bits where it is
    # a plain lookup (embedding_lookup) not tied to a head the client computes (split/quant_embedding.py)
    token_embedding: tuple[int, int] = (0, 0)
    embedding_lookup: bool = False
    tied_head: bool = False  # the head shares the token embedding's tensor

    @classmethod
    def from_config(cls, config, num_labels: int = 2, task: str = "classification") -> "ModelShape":
        """The shape of ``config``'s task model as a fedsplit client builds it
        (the config as the client loads it: dropout settings included)."""
        from accelerate import init_empty_weights

        from split.partition import _task_class

        fam = family_for(config)
        if config.model_type not in ARCHITECTURES:
            raise ValueError(
                f"the cost model has no checked activation formula for model type {config.model_type!r}; "
                f"it covers {', '.join(sorted(ARCHITECTURES))}")
        head_paths = fam.head_modules(task)
        config = copy.deepcopy(config)  # the caller's config keeps its label count
        if task == "classification":
            config.num_labels = num_labels
        text = config.get_text_config()
        logging.getLogger("transformers").setLevel(logging.ERROR)  # meta-device build notices
        with init_empty_weights(include_buffers=False):
            model = _task_class(task).from_config(config)
        named = dict(model.named_parameters(remove_duplicate=True))
        blocks_path = join(fam.prefix, fam.blocks)

        def count(*prefixes: str) -> int:
            return sum(p.numel() for n, p in named.items() if any(n.startswith(x + ".") for x in prefixes))

        num_layers = config.num_hidden_layers
        block_params = tuple(count(f"{blocks_path}.{i}") for i in range(num_layers))
        embeddings = count(*(join(fam.prefix, e) for e in (*fam.embeddings, *fam.embed_extras)))
        heads = text.num_attention_heads
        hidden = text.hidden_size
        token = model.get_input_embeddings()
        tied = _tied_head(model, config, head_paths)
        return cls(
            family=fam.name,
            architecture=ARCHITECTURES[config.model_type],
            task=task,
            num_layers=num_layers,
            hidden=hidden,
            intermediate=_intermediate(text),
            heads=heads,
            kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or hidden // heads,
            vocab=text.vocab_size,
            num_labels=num_labels if task == "classification" else 0,
            embedding_params=embeddings,
            block_params=block_params,
            norm_params=count(join(fam.prefix, fam.norm)) if fam.norm else 0,
            pooler_params=count(*(join(fam.prefix, p) for p in fam.base_head)),
            head_params=0 if tied else count(*head_paths),
            head_trained=bool(new_heads(fam, task)),
            lora_targets=_lora_targets(model, f"{blocks_path}.0", fam),
            attention_dropout=_dropout(text, ("attention_probs_dropout_prob", "attn_pdrop", "attention_dropout")),
            hidden_dropout=_dropout(text, ("hidden_dropout_prob", "resid_pdrop", "hidden_dropout")),
            rotary=fam.rotary,
            block_linears=tuple(_linears(model.get_submodule(f"{blocks_path}.{i}")) for i in range(num_layers)),
            checkpoint_dtype=_stored_dtype(config),
            token_embedding=tuple(token.weight.shape),
            embedding_lookup=type(token) is nn.Embedding,
            tied_head=tied,
        )

    @property
    def kv_width(self) -> int:
        """Width of the key (and value) projection: smaller under grouped-query attention."""
        return self.kv_heads * self.head_dim

    @property
    def attention_width(self) -> int:
        """Width of the query projection (heads x head_dim; the hidden size in most models)."""
        return self.heads * self.head_dim

    def lora_params(self, rank: int) -> int:
        """LoRA parameters of one block at ``rank``: r x (d_in + d_out) per target."""
        return sum(rank * (d_out + d_in) for _, d_out, d_in in self.lora_targets)


def _stored_dtype(config) -> str:
    """The dtype the config says its checkpoint stores ("float32" when it says none)."""
    value = getattr(config, "dtype", None)
    name = str(value).removeprefix("torch.") if value is not None else "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def _linears(block) -> tuple[tuple[int, int], ...]:
    """(d_out, d_in) of each linear layer of ``block`` (GPT-2's Conv1D stores its weight in x out)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    out = []
    for module in block.modules():
        if isinstance(module, Conv1D):
            d_in, d_out = module.weight.shape
            out.append((d_out, d_in))
        elif isinstance(module, nn.Linear):
            out.append((module.out_features, module.in_features))
    return tuple(out)


def _tied_head(model, config, head_paths) -> bool:
    """Whether the head shares the token embedding's tensor (as
    ``split.partition`` ties it on the client): then it costs nothing more."""
    if not getattr(config.get_text_config(), "tie_word_embeddings", False):
        return False
    tied = dict(getattr(model, "_tied_weights_keys", None) or {})
    return any(name.startswith(head + ".") for name in tied for head in head_paths)


def _intermediate(text) -> int:
    inner = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None)
    return int(inner) if inner else 4 * text.hidden_size


def _dropout(text, keys: tuple[str, ...]) -> float:
    for key in keys:
        value = getattr(text, key, None)
        if isinstance(value, float):
            return value
    return 0.0


def _lora_targets(model, block_path: str, fam) -> tuple[tuple[str, int, int], ...]:
    """(name, d_out, d_in) of the family's default LoRA targets in one block."""
    from split.lora import LoraSpec

    wanted = set(LoraSpec().target_modules(fam))
    block = model.get_submodule(block_path)
    out = []
    for name, module in block.named_modules():
        if name.rsplit(".", 1)[-1] not in wanted:
            continue
        weight = module.weight
        d0, d1 = weight.shape
        # Conv1D (GPT-2) stores its weight in x out.
        out.append((name, d1, d0) if fam.conv1d else (name, d0, d1))
    if not out:
        raise ValueError(f"no LoRA target {sorted(wanted)} found in {block_path}")
    return tuple(out)
