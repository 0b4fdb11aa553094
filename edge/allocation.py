"""What a client tells a server that allocates blocks every round: how many
blocks it can train, its memory budget for them, and what each block costs
it to train (from the cost model, for its own batch, sequence length, rank,
cut and dtype). The server plans with these (server/allocation.py)."""

from __future__ import annotations

import copy
import math

MB = 1 << 20


def block_costs(model_config, k1: int, k2: int, rank: int, batch: int, seq_len: int, num_labels: int,
                dtype: str = "float32", task: str = "classification") -> dict[int, int]:
    """Bytes of training memory each block of the model costs this client
    when it trains that block's LoRA, for every block 0..L-1
    (``profiles.cost.block_memory``: the LoRA gradients and optimizer state
    and the activations it makes the client keep; 0 for a server block)."""
    from profiles.cost import ModelShape, Plan, block_memory

    shape = ModelShape.from_config(copy.deepcopy(model_config), num_labels=num_labels, task=task)
    layers = int(model_config.num_hidden_layers)
    plan = Plan(k1=k1, k2=k2, rank=rank, batch=batch, seq_len=seq_len, trainable=frozenset(range(layers)),
                dtype=dtype)
    return {b: int(block_memory(shape, plan, b)) for b in range(layers)}


def affordable(client, capacity: int | None, train_memory_mb: float | None, batch: int, seq_len: int) -> dict:
    """The ``FederatedOptions`` fields a client's --capacity and
    --train-memory-mb give (``capacity``, ``train_memory``, ``block_costs``)."""
    out = {"capacity": capacity, "train_memory": None, "block_costs": None}
    if train_memory_mb is None:
        return out
    if not (math.isfinite(train_memory_mb) and train_memory_mb > 0):
        raise ValueError(f"--train-memory-mb must be a finite number > 0, got {train_memory_mb}")
    cfg = client.config
    out["train_memory"] = int(train_memory_mb * MB)
    out["block_costs"] = block_costs(client.segment.config, client.cut.front, client.cut.back, cfg.lora.rank,
                                     batch, seq_len, cfg.num_labels, cfg.dtype, cfg.task)
    return out


def planned_budget(args, plan) -> None:
    """Take --capacity and --train-memory-mb from the server's plan (a
    ``ClientPlan``: its FedRA capacity and the memory its trainable blocks
    take) where the command line leaves them out; one given that says
    otherwise than the plan is an error naming both."""
    planned = {"capacity": (plan.capacity, "--capacity", str(plan.capacity)),
               "train_memory_mb": (plan.train_memory / MB, "--train-memory-mb", f"{plan.train_memory / MB:.1f}")}
    for dest, (value, option, shown) in planned.items():
        given = getattr(args, dest)
        if given is None:
            # A plan that trains no block affords none: nothing to say.
            setattr(args, dest, value if value > 0 else None)
        elif not math.isclose(given, value, rel_tol=1e-6):
            raise ValueError(f"{option} {given:g} conflicts with the server's plan for {plan.device!r}, which gives "
                             f"{option} {shown}; leave {option} out to follow the plan, or start the client "
                             "without --profile")
