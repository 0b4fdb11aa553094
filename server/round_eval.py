"""Test accuracy of a ``round_N/`` checkpoint, whole model in one process.

A Flower run (and any ``fedsplit server --checkpoint-dir`` run) leaves each
round as a standard PEFT adapter beside the frozen-weight updates it folded
(``base_delta.safetensors``). Its global model is the base model plus that
delta plus the adapter, with the head the adapter saves; this module builds it
with transformers and peft alone and scores it on labelled texts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from split.json_files import read_json_object

from .checkpoint import apply_base_delta


class RoundError(ValueError):
    """A round folder that cannot be evaluated as asked; the text says why."""


def round_labels(folder: str | Path) -> list[str]:
    """The head's class names, in head order, from the round's config.json."""
    path = Path(folder) / "config.json"
    id2label = read_json_object(path, RoundError, "give a round_N/ checkpoint of a classification run").get(
        "id2label")
    if not isinstance(id2label, dict) or not id2label:
        raise RoundError(f"{path} names no classes (id2label); only classification rounds can be scored")
    try:
        order = sorted(id2label, key=int)
    except ValueError:
        raise RoundError(f"{path}: id2label keys must be class indices, got {sorted(id2label)[:3]}") from None
    if [int(k) for k in order] != list(range(len(order))):
        raise RoundError(f"{path}: id2label must number the classes 0..{len(order) - 1}, got {order[:5]}")
    return [id2label[k] for k in order]


def load_round_model(folder: str | Path, base_model: str | Path):
    """The global model of a round: ``base_model`` (a local folder) with the
    round's frozen-weight delta folded in and its adapter loaded, in eval mode."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    labels = round_labels(folder)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the head is "newly initialised" only until the adapter replaces it
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            base_model, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)})
    finally:
        hf_logging.set_verbosity(verbosity)
    apply_base_delta(model, folder)
    return PeftModel.from_pretrained(model, folder).eval()


@torch.no_grad()
def round_accuracy(folder: str | Path, base_model: str | Path, batches, labels: list[str]) -> float:
    """Accuracy of the round's global model over ``batches`` (dicts of
    input_ids, attention_mask and labels, as ``edge.data.Batches`` gives),
    whose label ids follow ``labels``; the round's classes must be the same,
    in the same order, or the ids would mean other classes."""
    head = round_labels(folder)
    if list(labels) != head:
        raise RoundError(f"the round's head classes {head[:4]}... differ from the data's {list(labels)[:4]}...: "
                         f"score it on the task it was trained on")
    model = load_round_model(folder, base_model)
    correct = total = 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
        total += len(batch["labels"])
    if total == 0:
        raise RoundError("no labelled samples to score the round on")
    return correct / total
