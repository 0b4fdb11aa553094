"""A federated client's share of a task's training data, as ``fedsplit
client --num-clients N --client-index k`` takes it: the same partition of the
same labels with the same seed, batched the same way. Both the Flower
ClientApp and fedsplit's own clients (the equivalence test) read it here; a
worker that runs many clients loads the dataset and tokenizer once."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from split.partition import load_config, resolve_model_path

from .client_shares import client_shares
from .data import Batches, Dataset, load_dataset
from .tokenizer import load_tokenizer


@dataclass(frozen=True)
class ShardSpec:
    """Which data, cut how, for whom."""

    data: str = "builtin"
    model: str = ""  # "": the built-in model (its tokenizer)
    tokenizer: str = ""  # "": the model folder's
    clients: int = 2
    partition: str = "dirichlet"
    partition_alpha: float = 0.5
    seed: int = 0
    batch_size: int = 16
    max_length: int = 64

    @classmethod
    def of(cls, run) -> "ShardSpec":
        """The data settings of a ``split.flower_settings.FlowerRun``."""
        return cls(run.data, run.model, run.tokenizer, run.clients, run.partition, run.partition_alpha, run.seed,
                   run.batch_size, run.max_length)


@dataclass
class Shard:
    """One client's training batches."""

    train: Batches
    num_samples: int
    labels: tuple[str, ...]  # every class of the task, in head order


@lru_cache(maxsize=4)
def _task(data: str, model: str, tokenizer: str, seed: int) -> tuple[Dataset, object, list]:
    dataset = load_dataset(None if data == "builtin" else data, seed=seed)
    path = resolve_model_path(model or None)
    vocab = load_config(path, "classification", len(dataset.labels), False).get_text_config().vocab_size
    tok = load_tokenizer(tokenizer or path, vocab, default=not tokenizer)
    return dataset, tok, [s.label for s in dataset.train]


def num_labels(spec: ShardSpec) -> int:
    """Classes of the task (the server's head size)."""
    return len(_task(spec.data, spec.model, spec.tokenizer, spec.seed)[0].labels)


def shard(spec: ShardSpec, index: int) -> Shard:
    """Client ``index``'s share of ``spec.clients``."""
    if not 0 <= index < spec.clients:
        raise ValueError(f"client index {index} is outside the {spec.clients} partitions of the data")
    dataset, tok, labels = _task(spec.data, spec.model, spec.tokenizer, spec.seed)
    parts = client_shares(labels, spec.clients, spec.partition, spec.partition_alpha, spec.seed)
    mine = [dataset.train[i] for i in parts[index]]
    train = Batches(mine, dataset, tok, spec.max_length, spec.batch_size, True, spec.seed)
    return Shard(train, len(mine), tuple(dataset.labels))
