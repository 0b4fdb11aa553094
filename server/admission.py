"""What the federation admits: joins and uploads checked against the model
the server hosts, before anything reaches a strategy.

A strategy trusts its inputs' shapes and values; a client is not trusted. So
the coordinator checks every join and every upload here, against what the
server itself knows (``ModelLayout``: every linear module a LoRA can wrap with
its true shape, and the trained head's tensors), and refuses the client with
the reason. Nothing a client sends can then make an aggregation fail.

Values are checked too: every tensor of an upload (both LoRA halves and the
head) must be finite and at most ``max_value`` in magnitude. LoRA factors and
a classification head live near the scale of the pretrained weights (a
Kaiming-uniform A is below 1/sqrt(d_in), B starts at zero and moves by about
the learning rate per step), so the default bound, 1e3, is orders of magnitude
above any honest value and still far below what overflows a float16 sum. The
bound is a refusal, never a clamp: a clamped value would be aggregated as if
the client had sent it.

The functions here are pure: they take plain values and raise ``Refused``
naming what was wrong and what to do.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.pytorch_utils import Conv1D

from split import records
from split.families import Family, block_of

MAX_SAMPLES = 1_000_000  # default cap on the samples one client may declare
MAX_VALUE = 1e3  # default bound on the magnitude of any uploaded value


class Refused(ValueError):
    """A join or an upload the federation cannot take; the text goes back to the client."""


@dataclass(frozen=True)
class ModelLayout:
    """What the server knows of the whole model, whichever side holds each part.

    ``modules``: every linear module a LoRA may wrap, whole-model name ->
    (d_out, d_in); ``heads``: the trained head's tensors, plain name -> shape,
    with None for a dimension that is the number of classes (the clients'
    data sets it, not the server's model); empty when no head is trained;
    ``num_layers``: transformer blocks."""

    modules: Mapping[str, tuple[int, int]]
    heads: Mapping[str, tuple[int | None, ...]]
    num_layers: int


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(d_out, d_in) of a module LoRA can wrap (``nn.Linear``, transformers'
    ``Conv1D``, whose weight is stored d_in x d_out), None for anything else."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, Conv1D):
        return module.nf, module.weight.shape[0]
    return None


def _skeleton(config, task: str) -> nn.Module:
    cls = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    with init_empty_weights(include_buffers=False):
        return cls.from_config(config)


def _head_shapes(model: nn.Module, heads: list[str]) -> dict[str, tuple[int, ...]]:
    return {f"{head}.{pname}": tuple(int(d) for d in p.shape)
            for head in heads for pname, p in model.get_submodule(head).named_parameters()}


def model_layout(config, family: Family, task: str) -> ModelLayout:
    """The layout of the task model ``config`` describes, read off a skeleton
    built on the meta device (no memory for weights, no checkpoint read)."""
    model = _skeleton(config, task)
    heads = family.trained_heads(task)
    modules = {}
    for name, module in model.named_modules():
        shape = linear_shape(module)
        # A trained head is a module to save, never a LoRA module.
        if shape is not None and not any(name == h or name.startswith(h + ".") for h in heads):
            modules[name] = (int(shape[0]), int(shape[1]))
    head_tensors = _head_shapes(model, heads)
    if head_tensors:
        # The dimensions that follow the number of classes: those that change with it.
        other = copy.deepcopy(config)
        other.num_labels = config.num_labels + 1
        moved = _head_shapes(_skeleton(other, task), heads)
        head_tensors = {n: tuple(None if d != e else d for d, e in zip(shape, moved[n], strict=True))
                        for n, shape in head_tensors.items()}
    return ModelLayout(modules, head_tensors, int(config.num_hidden_layers))


def _preview(names: Iterable[str], shown: int = 3) -> str:
    names = sorted(names)
    return f"{names[:shown]}{' and %d more' % (len(names) - shown) if len(names) > shown else ''}"


# ---------------------------------------------------------------- join


def check_modules(layout: ModelLayout, modules: Mapping[str, tuple[int, int]], server_side: Iterable[str]) -> None:
    """A client's declared client-side LoRA modules: each a linear module of
    the model with its true (d_out, d_in), none on the server's side of its cut."""
    unknown = [m for m in modules if m not in layout.modules]
    if unknown:
        raise Refused(f"LoRA module(s) {_preview(unknown)} are not linear modules of the server's model; "
                      "join with the same --model and --targets as the server's checkpoint")
    for m, shape in modules.items():
        if tuple(shape) != layout.modules[m]:
            raise Refused(f"LoRA module {m} has shape (d_out, d_in) = {tuple(shape)} in the join, "
                          f"the model's is {layout.modules[m]}")
    overlap = set(modules) & set(server_side)
    if overlap:
        raise Refused(f"LoRA module(s) {_preview(overlap)} are on the server's side of this client's cut; "
                      "a client declares only the modules of its own blocks")


def check_blocks(layout: ModelLayout, blocks: frozenset[int] | None) -> None:
    """A client's block subset: non-empty, and only blocks the model has."""
    if blocks is None:
        return
    if not blocks:
        raise Refused("the join names an empty block set: give --blocks at least one block, or leave it out "
                      "to train every block")
    outside = sorted(b for b in blocks if not 0 <= b < layout.num_layers)
    if outside:
        raise Refused(f"blocks {outside} do not exist: the model has blocks 0..{layout.num_layers - 1}")


def check_samples(num_samples: int, max_samples: int) -> None:
    """A sample count declared at join: at least 1 and at most the server's cap."""
    if not 1 <= num_samples <= max_samples:
        raise Refused(f"the join declares {num_samples} training samples; this server accepts 1 to "
                      f"{max_samples} per client (its --max-samples)")


# ---------------------------------------------------------------- values


def value_problem(tensor: torch.Tensor, max_value: float | None = None) -> str | None:
    """Why ``tensor`` cannot be trained on or aggregated (None: it can): not a
    float tensor, a NaN or an infinity, or (with ``max_value``) a magnitude
    above the bound."""
    if not tensor.is_floating_point():
        return f"has dtype {tensor.dtype}, not a floating-point type"
    if tensor.numel() == 0:
        return None
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        kinds = [k for k, hit in (("NaN", torch.isnan(tensor).any()), ("infinite", torch.isinf(tensor).any()))
                 if bool(hit)]
        return f"holds {bad} {' and '.join(kinds)} value(s)"
    if max_value is not None:
        peak = float(tensor.detach().abs().max())
        if peak > max_value:
            return (f"holds a value of magnitude {peak:.3g}, above this server's bound of {max_value:g} "
                    "(--max-upload-value)")
    return None


def check_values(what: str, tensors: Mapping[str, torch.Tensor], max_value: float | None) -> None:
    """Every tensor finite and within the bound; the error names the first that is not."""
    for name, t in tensors.items():
        problem = value_problem(t, max_value)
        if problem is not None:
            raise Refused(f"{what} {name} {problem}; the upload is refused (lower the learning rate or check "
                          "the client's data if training diverged)")


# ---------------------------------------------------------------- upload


def expected_modules(modules: Mapping[str, tuple[int, int]], blocks: frozenset[int] | None) -> set[str]:
    """The client-side modules an upload may carry: all declared ones, or with
    a block subset those in its blocks and those outside every block."""
    return {m for m in modules if blocks is None or block_of(m) is None or block_of(m) in blocks}


def check_factors(A: Mapping[str, torch.Tensor], B: Mapping[str, torch.Tensor], rank: int,
                  modules: Mapping[str, tuple[int, int]], blocks: frozenset[int] | None, every_module: bool) -> None:
    """Uploaded client-side factors: the modules the client declared (within its
    blocks; all of them with ``every_module``), each A rank x d_in and B d_out x rank."""
    if set(A) != set(B):
        raise Refused(f"modules {_preview(set(A) ^ set(B))} have one LoRA factor but not the other")
    allowed = expected_modules(modules, blocks)
    extra = set(A) - allowed
    if extra:
        where = "declared at join" if blocks is None else f"declared at join within blocks {sorted(blocks)}"
        raise Refused(f"the upload carries module(s) {_preview(extra)} that are not among the client-side "
                      f"modules {where}")
    missing = allowed - set(A)
    if every_module and missing:
        raise Refused(f"the upload lacks module(s) {_preview(missing)}; this strategy trains every module, so "
                      "upload them all")
    for m in sorted(A):
        d_out, d_in = modules[m]
        if tuple(A[m].shape) != (rank, d_in) or tuple(B[m].shape) != (d_out, rank):
            raise Refused(f"{m}: A has shape {tuple(A[m].shape)} and B {tuple(B[m].shape)}; at the upload's "
                          f"rank {rank} they must be {(rank, d_in)} and {(d_out, rank)}")


def _shape_text(shape: tuple[int | None, ...], classes: int | None) -> str:
    dims = [str(d) if d is not None else (str(classes) if classes is not None else "classes") for d in shape]
    return f"({', '.join(dims)}{',' if len(dims) == 1 else ''})"


def check_head(layout: ModelLayout, head: Mapping[str, torch.Tensor], classes: int | None) -> int | None:
    """Head tensors: only the model's trained head, each with its true shape,
    its class dimensions equal to ``classes`` (None: not known yet, then equal
    among themselves); returns the number of classes the head has (None: no
    class dimension in it). Any other name would be published as a module to
    save and, once the adapter is loaded, overwrite a frozen weight of the base
    model."""
    unknown = [n for n in head if n not in layout.heads]
    if unknown:
        known = ", ".join(sorted(layout.heads)) or "none (this task trains no head)"
        raise Refused(f"head tensor(s) {_preview(unknown)} are not the model's trained head; its tensors: {known}")
    for name, t in sorted(head.items()):
        want = layout.heads[name]
        got = tuple(t.shape)
        fits = len(got) == len(want) and all(w is None or g == w for g, w in zip(got, want))
        seen = {g for g, w in zip(got, want) if w is None} if fits else set()
        if fits and classes is not None:
            fits = seen <= {classes}
        if not fits or len(seen) > 1:
            raise Refused(f"head tensor {name} has shape {got}, the model's is {_shape_text(want, classes)}"
                          + ("" if classes is None else f" ({classes} classes in this federation)"))
        if seen:
            classes = seen.pop()
    return classes


def check_upload_rank(rank: int, joined: int, mixed_ranks: bool) -> None:
    """An upload's rank: the joined rank, or, where the method takes mixed
    ranks (HetLoRA prunes), 1 to the joined rank."""
    if mixed_ranks:
        if not 1 <= rank <= joined:
            raise Refused(f"the upload has rank {rank}; this client joined with rank {joined} and may only "
                          "upload that rank or a pruned one below it")
    elif rank != joined:
        raise Refused(f"the upload has rank {rank} but this client joined with rank {joined}, and this strategy "
                      "trains one rank")


def check_upload_samples(num_samples: int, declared: int) -> None:
    """An upload's sample count: 1 to what the client declared at join."""
    if not 1 <= num_samples <= declared:
        raise Refused(f"the upload claims {num_samples} samples; this client declared {declared} at join, and "
                      f"an upload may claim 1 to {declared}")


def check_record(record) -> dict[str, int | float]:
    """An upload's round record (``split.records``): known keys, finite
    numbers of the right kind within range; returns the checked copy."""
    try:
        return records.check_record(record)
    except records.RecordError as exc:
        raise Refused(f"bad round record: {exc}") from None
