"""What a client tells a server that allocates blocks every round: how many
blocks it can train, its memory budget for them, and what each block costs
it to train (from the cost model, for its own batch, sequence length, rank
and cut). The server plans with these (server/allocation.py)."""

from __future__ import annotations

import math

MB = 1 << 20


def block_costs(model_config, k1: int, k2: int, rank: int, batch: int, seq_len: int,
                num_labels: int) -> dict[int, int]:
    """Bytes of training memory each block of the model costs this client
    when it trains that block's LoRA (``profiles.cost.block_memory``: the
    LoRA parameters, gradients and optimizer state, and the activations the
    block saves for backward), for every block 0..L-1."""
    from profiles.cost import ModelShape, Plan, block_memory

    shape = ModelShape.from_config(model_config, num_labels=num_labels)
    layers = int(model_config.num_hidden_layers)
    plan = Plan(k1=k1, k2=k2, rank=rank, batch=batch, seq_len=seq_len, trainable=frozenset(range(layers)))
    return {b: int(block_memory(shape, plan, b)) for b in range(layers)}


def affordable(client, capacity: int | None, train_memory_mb: float | None, batch: int, seq_len: int) -> dict:
    """The ``FederatedOptions`` fields a client's --capacity and
    --train-memory-mb give (``capacity``, ``train_memory``, ``block_costs``)."""
    out = {"capacity": capacity, "train_memory": None, "block_costs": None}
    if train_memory_mb is None:
        return out
    if not (math.isfinite(train_memory_mb) and train_memory_mb > 0):
        raise ValueError(f"--train-memory-mb must be a finite number > 0, got {train_memory_mb}")
    cfg = client.segment.config
    out["train_memory"] = int(train_memory_mb * MB)
    out["block_costs"] = block_costs(cfg, client.cut.front, client.cut.back, client.config.lora.rank, batch,
                                     seq_len, client.config.num_labels)
    return out
