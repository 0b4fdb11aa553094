"""A client's training session: data, evaluation, training loop, adapter, summary."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from split.partition import resolve_model_path

from .client import ClientConfig, SplitClient
from .client_shares import client_shares
from .data import Batches, load_dataset, load_tokenizer, split_train_test
from .federated import FederatedClient, FederatedOptions
from .meter import current_rss, peak_rss, reset_peak

log = logging.getLogger(__name__)


@dataclass
class TrainOptions:
    """What to train on and for how long."""

    data: str | None = None  # None: the built-in stdlib-docstring task
    test_data: str | None = None
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 16
    max_length: int = 64
    eval_before: bool = True
    adapter_out: str | None = None
    progress: bool = True
    # federated runs: this client's share of the training data
    partition: str = "iid"
    partition_alpha: float = 0.5
    num_clients: int = 1
    client_index: int = 0
    blocks: list[int] | None = None  # blocks whose LoRA this client trains (None: all)
    eval_rounds: bool = False
    personal: bool = False  # FedDPA dual adapters, scored on a held-out 20% of this client's share


def run_client(config: ClientConfig, options: TrainOptions) -> dict:
    """Join the server, train, evaluate and save; returns a summary dict."""
    dataset = load_dataset(options.data, options.test_data, seed=config.seed)
    config.num_labels = len(dataset.labels)
    tokenizer = load_tokenizer(resolve_model_path(config.model))
    train = Batches(dataset.train, dataset, tokenizer, options.max_length, options.batch_size, True, config.seed)
    test = Batches(dataset.test, dataset, tokenizer, options.max_length, 64, False)
    reset_peak()
    rss_before = current_rss()
    client = SplitClient(config)
    if client.federation is not None:
        try:
            return _run_federated(client, dataset, tokenizer, options, rss_before)
        finally:
            client.close()
    summary = {"labels": dataset.labels, "train_samples": len(dataset.train), "test_samples": len(dataset.test),
               "cut": str(client.cut), "client_owned_bytes": client.segment.owned_bytes,
               "checkpoint_bytes": client.segment.checkpoint_bytes}
    try:
        if options.eval_before:
            summary["accuracy_before"] = client.evaluate(test)
        total = options.max_steps or max(1, round(options.epochs * len(train)))
        losses = []
        started = time.perf_counter()
        with Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                      TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn(),
                      disable=not options.progress) as bar:
            job = bar.add_task("train", total=total, loss=float("nan"))
            while client.steps < total:
                for batch in train:
                    losses.append(client.train_step(batch))
                    bar.update(job, advance=1, loss=sum(losses[-20:]) / len(losses[-20:]))
                    if client.steps >= total:
                        break
        summary["train_seconds"] = time.perf_counter() - started
        summary["steps"] = client.steps
        summary["first_loss"], summary["last_loss"] = losses[0], sum(losses[-20:]) / len(losses[-20:])
        summary["accuracy_after"] = client.evaluate(test)
        if options.adapter_out:
            client.save_adapter(options.adapter_out, labels=dataset.labels, tokenizer=tokenizer)
            summary["adapter"] = str(Path(options.adapter_out).resolve())
        summary["bytes_sent"] = client.conn.bytes_sent
        summary["bytes_received"] = client.conn.bytes_received
        summary["client_peak_rss"] = peak_rss()
        summary["client_peak_rss_above_start"] = peak_rss() - rss_before
    finally:
        client.close()
    return summary


def _run_federated(client: SplitClient, dataset, tokenizer, options: TrainOptions, rss_before: int) -> dict:
    labels = [s.label for s in dataset.train]
    parts = client_shares(labels, options.num_clients, options.partition, options.partition_alpha,
                          client.config.seed)
    if not 0 <= options.client_index < options.num_clients:
        raise ValueError(f"--client-index must be in [0, {options.num_clients}), got {options.client_index}")
    mine = [dataset.train[i] for i in parts[options.client_index]]
    cfg = client.config
    personal_test = None
    if options.personal:
        mine, held_out = split_train_test(mine, 0.2, cfg.seed)
        personal_test = Batches(held_out, dataset, tokenizer, options.max_length, 64, False)
    train = Batches(mine, dataset, tokenizer, options.max_length, options.batch_size, True, cfg.seed)
    test = Batches(dataset.test, dataset, tokenizer, options.max_length, 64, False) if options.eval_rounds else None
    runner = FederatedClient(client, train, len(mine), test,
                             FederatedOptions(blocks=options.blocks, evaluate=options.eval_rounds,
                                              personal=options.personal, personal_test=personal_test))
    records = runner.run()
    summary = {"labels": dataset.labels, "train_samples": len(mine), "test_samples": len(dataset.test),
               "federation": asdict(client.federation), "cut": str(client.cut),
               "rounds": [r.__dict__ for r in records], "final_accuracy": runner.final_accuracy,
               "personal_accuracy": runner.personal_accuracy,
               "steps": client.steps, "bytes_sent": client.conn.bytes_sent,
               "bytes_received": client.conn.bytes_received, "client_peak_rss": peak_rss(),
               "client_peak_rss_above_start": peak_rss() - rss_before,
               "label_counts": {lab: sum(1 for s in mine if s.label == lab) for lab in dataset.labels}}
    return summary


def write_summary(summary: dict, path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(summary, indent=2))
