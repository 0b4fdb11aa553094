"""Language modelling on the client: batches of texts and held-out loss.

A causal-LM batch is the classification batch with ``labels`` = ``input_ids``
where padding is masked to -100, so the model's own shifted cross-entropy
ignores it.
"""

from __future__ import annotations

import math

import torch

from .data import Batches, pad_batch

IGNORE = -100  # the label transformers' losses skip


class TextBatches(Batches):
    """Tokenised texts served as padded causal-LM batches."""

    def __init__(self, texts: list[str], tokenizer, max_length: int, batch_size: int, shuffle: bool,
                 seed: int = 0):
        self._tokenise(texts, tokenizer, max_length, batch_size, shuffle, seed)
        self.labels = None

    def _collate(self, rows: list[int]) -> dict[str, torch.Tensor]:
        return collate_lm([self.ids[i] for i in rows], self.pad_id)


def collate_lm(ids: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest sequence; labels are the inputs with padding masked."""
    input_ids, mask = pad_batch(ids, pad_id)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, IGNORE)}


def held_out_loss(client, batches) -> dict[str, float]:
    """Mean next-token loss over every predicted token of ``batches`` and its
    perplexity. Each batch's loss is a mean over its predicted tokens, so it is
    weighted by that count (a batch's first position predicts nothing)."""
    total = tokens = 0.0
    for batch in batches:
        n = int((batch["labels"][:, 1:] != IGNORE).sum())
        if n:
            total += client.loss(batch) * n
            tokens += n
    if not tokens:
        raise ValueError("the held-out texts have no token to predict: each needs at least two tokens")
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
