"""The checkpoint's tensors under the model's names, mapped as transformers maps
them when it loads a checkpoint (its own renaming functions, not copied
tables), and the reports on what is missing or unused."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key
from transformers.utils.loading_report import LoadStateDictInfo

from .families import block_of
from .tensorfile import CheckpointIndex

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointNames:
    """The checkpoint's tensors under the model's names, renamed the way
    transformers renames them when loading (legacy ``LayerNorm.gamma``/``beta``,
    per-model renamings such as GPT-NeoX's ``embed_out``, a base-model prefix
    added or removed)."""

    sources: dict[str, str]  # model tensor name -> checkpoint name
    converted: dict[str, str]  # model tensor name -> transformers conversion it would need
    unexpected: dict[str, str]  # checkpoint name -> its renamed form, used by no model tensor


def checkpoint_names(model: nn.Module, index: CheckpointIndex) -> CheckpointNames:
    """Map ``index``'s tensors to ``model``'s (the full skeleton, before placeholders)."""
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    expected = model.state_dict()
    prefix = model.base_model_prefix
    sources, converted, unexpected = {}, {}, {}
    # transformers visits keys in this order; grouped renamings depend on it.
    for key in sorted(index.entries, key=dot_natural_key):
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, expected)
        if renamed not in expected and key in expected:
            renamed, pattern = rename_source_key(key, [], [], prefix, expected)
        if renamed not in expected:
            unexpected[key] = renamed
        elif pattern is not None:
            converted[renamed] = pattern
        else:
            sources.setdefault(renamed, key)
    return CheckpointNames(sources, converted, _used_by_transformers(model, unexpected))


def _used_by_transformers(model, unexpected: dict[str, str]) -> dict[str, str]:
    """Drop the unexpected names transformers itself ignores (old buffers such as
    ``position_ids``, the model's ``_keys_to_ignore_on_load_unexpected``)."""
    info = LoadStateDictInfo(missing_keys=set(), unexpected_keys=set(unexpected), mismatched_keys=set(),
                             error_msgs=[], conversion_errors={}, skipped_pp_keys=set())
    model._adjust_missing_and_unexpected_keys(info)
    return {k: v for k, v in unexpected.items() if k in info.unexpected_keys}


def refuse_missing(path: Path, missing: list[str], converted: dict[str, str]) -> None:
    if converted:
        raise ValueError(
            f"{path}: tensors {', '.join(sorted(converted))} need transformers' on-the-fly tensor conversion "
            f"({', '.join(sorted(set(converted.values())))}), which fedsplit's per-tensor reader does not apply"
        )
    if missing:
        raise ValueError(
            f"{path}: the checkpoint has no tensor for {', '.join(missing)} (after transformers' key renaming). "
            "Only a new classification head may be absent; check that the folder holds the model its config.json "
            "describes, or re-save it with `save_pretrained`."
        )


def report_unexpected(side: str, server_blocks, unexpected: dict[str, str]) -> None:
    """Warn about checkpoint tensors no model tensor uses: the side that runs a
    block reports its block's, the client everything outside the server's blocks."""
    server = set(server_blocks)
    mine = [k for k, renamed in unexpected.items() if (block_of(renamed) in server) == (side == "server")]
    if mine:
        log.warning("%s segment: the checkpoint has %d tensors the model does not use (not loaded): %s",
                    side, len(mine), ", ".join(mine[:20]) + (" ..." if len(mine) > 20 else ""))
