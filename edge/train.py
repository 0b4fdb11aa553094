"""A client's training session: data, evaluation, training loop, adapter, summary."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from split.families import family_for
from split.partition import load_config, resolve_model_path

from .allocation import affordable
from .client import ClientConfig, SplitClient
from .client_shares import client_shares
from .data import Batches, load_dataset, load_text_dataset, split_train_test
from .display import round_display
from .emulate_record import emulated_rounds
from .federated import FederatedClient, FederatedOptions
from .lm import TextBatches, held_out_loss
from .meter import cuda_peak, current_rss, peak_rss, reset_peak
from .metering import StepMeter
from .runlog import ClientRunLog
from .tokenizer import load_tokenizer

log = logging.getLogger(__name__)

TEST_FRACTION = 0.2  # held out of --data when no --test-data is given
PERSONAL_DIR = "personal"  # FedDPA's personal adapter, inside the federated client's --out


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
    adapter_out: str | None = None  # None: a federated client saves nothing; a single one saves at single_client_out
    single_client_out: str | None = None
    progress: bool = True
    tokenizer: str | None = None  # folder or hub id (None: the model folder)
    # federated runs: this client's share of the training data
    partition: str = "iid"
    partition_alpha: float = 0.5
    num_clients: int = 1
    client_index: int = 0
    blocks: list[int] | None = None  # blocks whose LoRA this client trains (None: all)
    capacity: int | None = None  # blocks it can train per round, for a server that allocates them
    train_memory_mb: float | None = None  # MiB it affords for trainable blocks, likewise
    planned: bool = False  # blocks, capacity and train memory came from the server's plan (--profile)
    eval_rounds: bool = False
    personal: bool = False  # FedDPA dual adapters, scored on a held-out 20% of this client's share
    profile: str = ""  # the device profile's name, sent at join (``--profile``)
    run_dir: str | None = None  # steps.jsonl and clients.jsonl of this run (split.runfolder)
    budget_bytes: int | None = None  # the device profile's memory budget, reported in each round record

    def __post_init__(self):
        # The CLI checks each value as it parses; this covers the Python API.
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ValueError(f"epochs must be a finite number > 0, got {self.epochs}")
        for name, low in (("max_steps", 1), ("batch_size", 1), ("max_length", 2), ("num_clients", 1)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if not 0 <= self.client_index < self.num_clients:
            raise ValueError(f"--client-index must be in [0, --num-clients={self.num_clients}), "
                             f"got {self.client_index}")
        if not (math.isfinite(self.partition_alpha) and self.partition_alpha > 0):
            raise ValueError(f"partition_alpha must be a finite number > 0, got {self.partition_alpha}")


@dataclass
class TaskData:
    """A task's train and test batches and how the test batches are scored."""

    train: Batches
    test: Batches
    score: object  # (client, batches) -> dict of metrics
    tokenizer: object  # saved beside the adapter
    labels: list[str] | None = None  # class names in head order (classification)

    def scored(self, client: SplitClient, when: str) -> dict:
        """The test metrics, keyed ``<metric>_<when>``."""
        return {f"{k}_{when}": v for k, v in self.score(client, self.test).items()}


def _accuracy(client: SplitClient, batches) -> dict:
    return {"accuracy": client.evaluate(batches)}


def run_client(config: ClientConfig, options: TrainOptions, emulator=None) -> dict:
    """Join the server, train, evaluate and save; returns a summary dict.
    With an ``emulator`` (``edge.emulate.EmulatedDevice``) the client runs
    under a device's limits; its ``summary()`` holds the emulated times."""
    runlog = ClientRunLog(options.run_dir, config.client_id)  # a bad --run-dir fails before any work
    path = resolve_model_path(config.model)
    model_config = load_config(path, config.task, config.num_labels, config.dropout)
    family_for(model_config).head_modules(config.task)  # a task the family lacks is refused before any work
    check_max_length(options.max_length, model_config)
    tokenizer = load_tokenizer(options.tokenizer or path, model_config.get_text_config().vocab_size,
                               default=options.tokenizer is None)
    if config.task == "causal-lm":
        texts = load_text_dataset(options.data, options.test_data, TEST_FRACTION, config.seed)
        _say_held_out(texts.held_out_from, len(texts.test), len(texts.train) + len(texts.test), "random")
        data = TaskData(TextBatches(texts.train, tokenizer, options.max_length, options.batch_size, True, config.seed),
                        TextBatches(texts.test, tokenizer, options.max_length, 64, False), held_out_loss,
                        tokenizer)
        summary = {"train_samples": len(texts.train), "test_samples": len(texts.test)}
    else:
        dataset = load_dataset(options.data, options.test_data, TEST_FRACTION, seed=config.seed)
        _say_held_out(dataset.held_out_from, len(dataset.test), len(dataset.train) + len(dataset.test),
                      "stratified by label")
        config.num_labels = len(dataset.labels)
        data = TaskData(Batches(dataset.train, dataset, tokenizer, options.max_length, options.batch_size, True,
                                config.seed),
                        Batches(dataset.test, dataset, tokenizer, options.max_length, 64, False), _accuracy,
                        tokenizer, dataset.labels)
        summary = {"labels": dataset.labels, "train_samples": len(dataset.train), "test_samples": len(dataset.test)}
    reset_peak()
    rss_before = current_rss()
    client = SplitClient(config, emulator)
    runlog.client_id = client.conn.client_id
    try:
        if client.federation is not None:
            if config.task != "classification":
                raise ValueError("federated rounds train classification only from `fedsplit client`; "
                                 "--task causal-lm runs with a server started without --strategy")
            return _run_federated(client, dataset, tokenizer, options, rss_before, runlog)
        # A plan a plain server serves trains every block; its capacity and budget go unused.
        budget = not options.planned and (options.capacity is not None or options.train_memory_mb is not None)
        if options.blocks is not None or options.personal or options.eval_rounds or options.num_clients > 1 or budget:
            raise ValueError("--blocks, --capacity, --train-memory-mb, --personal, --eval-rounds and --num-clients "
                             "are for federated rounds, but this server runs none (start it with --strategy)")
        return _run_single(client, data, options, summary, rss_before, runlog)
    finally:
        runlog.close()
        client.close()


def check_max_length(max_length: int, model_config) -> None:
    """Refuse a --max-length beyond the model's position embeddings (the lookup
    would fail mid-run). RoBERTa's positions start after the padding id."""
    text = model_config.get_text_config()
    positions = getattr(text, "max_position_embeddings", None)
    if positions is None:
        return
    if text.model_type in ("roberta", "xlm-roberta", "camembert"):
        positions -= (text.pad_token_id or 0) + 1
    if max_length > positions:
        raise ValueError(f"--max-length {max_length} exceeds the model's {positions} positions; "
                         f"use --max-length {positions} or less")


def _say_held_out(source: str | None, n_test: int, n_total: int, how: str) -> None:
    """Tell the user the test split comes out of the training data."""
    if source is not None:
        print(f"fedsplit client: no --test-data: {n_test} of {n_total} samples of {source} "
              f"({TEST_FRACTION:.0%}, {how}) are held out for evaluation and not trained on",
              file=sys.stderr, flush=True)


def _run_single(client: SplitClient, data: TaskData, options: TrainOptions, summary: dict, rss_before: int,
                runlog: ClientRunLog) -> dict:
    """Plain split training: steps, evaluation before and after, the adapter."""
    summary.update({"cut": str(client.cut), "client_owned_bytes": client.segment.owned_bytes,
                    "checkpoint_bytes": client.segment.checkpoint_bytes})
    if options.eval_before:
        summary.update(data.scored(client, "before"))
    total = options.max_steps or max(1, round(options.epochs * len(data.train)))
    losses = []
    meter = StepMeter(client)
    split_s = {"compute_s": 0.0, "network_s": 0.0, "server_s": 0.0}
    started = time.perf_counter()
    with Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                  TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  disable=not options.progress) as bar:
        job = bar.add_task("train", total=total, loss=float("nan"))
        while client.steps < total:
            for batch in data.train:
                loss, record = meter.measure(lambda: client.train_step(batch))
                losses.append(loss)
                runlog.step_done(record)
                for key in split_s:
                    split_s[key] += getattr(record, key)
                bar.update(job, advance=1, loss=sum(losses[-20:]) / len(losses[-20:]))
                if client.steps >= total:
                    break
    summary["train_seconds"] = time.perf_counter() - started
    summary.update(split_s)
    summary["steps"] = client.steps
    summary["first_loss"], summary["last_loss"] = losses[0], sum(losses[-20:]) / len(losses[-20:])
    summary.update(data.scored(client, "after"))
    out = options.adapter_out or options.single_client_out
    if out:
        client.save_adapter(out, labels=data.labels, tokenizer=data.tokenizer)
        summary["adapter"] = str(Path(out).resolve())
    summary["bytes_sent"] = client.conn.bytes_sent
    summary["bytes_received"] = client.conn.bytes_received
    summary["client_peak_rss"] = peak_rss()
    summary["client_peak_rss_above_start"] = peak_rss() - rss_before
    summary.update(_cuda_peak(client))
    return summary


def _run_federated(client: SplitClient, dataset, tokenizer, options: TrainOptions, rss_before: int,
                   runlog: ClientRunLog) -> dict:
    labels = [s.label for s in dataset.train]
    parts = client_shares(labels, options.num_clients, options.partition, options.partition_alpha,
                          client.config.seed)
    mine = [dataset.train[i] for i in parts[options.client_index]]
    cfg = client.config
    personal_test = None
    if options.personal:
        mine, held_out = split_train_test(mine, 0.2, cfg.seed)
        personal_test = Batches(held_out, dataset, tokenizer, options.max_length, 64, False)
    train = Batches(mine, dataset, tokenizer, options.max_length, options.batch_size, True, cfg.seed)
    test = Batches(dataset.test, dataset, tokenizer, options.max_length, 64, False) if options.eval_rounds else None
    budget = affordable(client, options.capacity, options.train_memory_mb, options.batch_size, options.max_length)
    display = round_display(options.progress)
    runner = FederatedClient(client, train, len(mine), test,
                             FederatedOptions(blocks=options.blocks, profile=options.profile,
                                              evaluate=options.eval_rounds,
                                              personal=options.personal, personal_test=personal_test,
                                              labels=tuple(dataset.labels), blocks_planned=options.planned,
                                              budget_bytes=options.budget_bytes,
                                              observers=[display, runlog, *emulated_rounds(client.emulator)],
                                              **budget))
    try:
        records = runner.run()
    finally:
        display.close()
    peak = max(runner.meter.run_peak_rss, peak_rss())  # the meter resets the peak every round
    summary = {"labels": dataset.labels, "train_samples": len(mine), "test_samples": len(dataset.test),
               "federation": asdict(client.federation), "cut": str(client.cut),
               "rounds": [r.__dict__ for r in records], "final_accuracy": runner.final_accuracy,
               "personal_accuracy": runner.personal_accuracy,
               "round_records": runlog.rows,
               "steps": client.steps, "bytes_sent": client.conn.bytes_sent,
               "bytes_received": client.conn.bytes_received, "client_peak_rss": peak,
               "client_peak_rss_above_start": peak - rss_before,
               "label_counts": {lab: sum(1 for s in mine if s.label == lab) for lab in dataset.labels},
               **_cuda_peak(client)}
    if options.adapter_out:
        summary.update(save_federated(runner, options.adapter_out, dataset.labels, tokenizer))
    return summary


def save_federated(runner: FederatedClient, folder: str, labels: list[str], tokenizer) -> dict:
    """Save what a federated client holds after the last round: the global
    model as the server's final offer gave it to this client (its rank, its
    blocks; under FedSA-LoRA its own B) with the server-side half, which the
    server loads from the same final offer; and under FedDPA the personal
    adapter in ``folder/personal``; each names the labels and holds the
    tokenizer. Returns the summary's paths."""
    saved = {"adapter": str(runner.client.save_adapter(folder, labels=labels, tokenizer=tokenizer).resolve())}
    if runner.personal is not None:
        personal = runner.personal.save(Path(folder) / PERSONAL_DIR, labels=labels, tokenizer=tokenizer)
        saved["personal_adapter"] = str(personal.resolve())
    return saved


def _cuda_peak(client: SplitClient) -> dict:
    """The client's CUDA peak, where it computes on a CUDA device."""
    peak = cuda_peak(client.device)
    return {} if peak is None else {"client_peak_cuda": peak}


def write_summary(summary: dict, path: str | None) -> None:
    """Write the summary as JSON to ``path`` (None: nowhere)."""
    if path:
        Path(path).write_text(json.dumps(summary, indent=2))
