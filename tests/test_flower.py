"""fedsplit through Flower: a Ray-backed simulation gives the same global
adapter as fedsplit's own server and clients, runs mixed ranks, and writes
checkpoints peft loads. Each simulation costs 15-30 s of start-up (Ray, its
actors, torch in each), so every simulation runs once per module and the
tests share it."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest
import torch

flwr = pytest.importorskip("flwr", reason="flwr is not installed: pip install -e '.[flower]' (Python >= 3.11)")

from flwr.app import RecordDict  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from conftest import minilm_path, save_tiny, threaded_server  # noqa: E402
from edge.client import ClientConfig, SplitClient  # noqa: E402
from edge.federated import FederatedClient, FederatedOptions  # noqa: E402
from edge.flower_client import client_app  # noqa: E402
from edge.shard import ShardSpec, num_labels, shard  # noqa: E402
from server.flower_app import server_app  # noqa: E402
from server.rounds import FederationConfig  # noqa: E402
from split.flower_records import RecordError, from_records, to_records  # noqa: E402
from split.flower_settings import FlowerRun  # noqa: E402
from split.lora import LoraSpec  # noqa: E402
from split.partition import Cut  # noqa: E402
from split.wire import Message  # noqa: E402

CLIENTS = 4


@pytest.fixture(scope="module")
def task_model(tmp_path_factory) -> Path:
    """A tiny BERT with the built-in model's tokenizer and a head for the built-in task's classes,
    without dropout: the reference clients are threads of one process, whose
    dropout would draw from torch's one global generator in whatever order the
    threads run (fedsplit's clients are processes of their own)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("flower-bert")
    tok = AutoTokenizer.from_pretrained(minilm_path())
    tok.save_pretrained(folder)
    labels = num_labels(ShardSpec(model=str(minilm_path())))
    return save_tiny("bert", folder, vocab_size=len(tok), num_labels=labels, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)


def settings(model: Path, out: Path, strategy: str, ranks: tuple[int, ...]) -> FlowerRun:
    return FlowerRun(strategy=strategy, rounds=2, clients=CLIENTS, fraction=0.5, local_steps=3, model=str(model),
                     ranks=ranks, batch_size=8, max_length=32, checkpoint_dir=str(out))


@pytest.fixture(scope="module")
def simulate(tmp_path_factory):
    """strategy -> (FlowerRun, the finished FedsplitStrategy), each simulated once."""
    done = {}
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

    def run(model: Path, strategy: str, ranks: tuple[int, ...]):
        if strategy not in done:
            cfg = settings(model, tmp_path_factory.mktemp(f"flower-{strategy}"), strategy, ranks)
            results = []
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # as in the Ray workers: the same float sums on both sides
            try:
                run_simulation(server_app(lambda r: num_labels(ShardSpec.of(r)), cfg, results), client_app(),
                               num_supernodes=CLIENTS, backend_config={"client_resources": {"num_cpus": 1}})
            finally:
                torch.set_num_threads(threads)
            assert len(results) == 1, "the ServerApp did not finish (its log above says why)"
            done[strategy] = (cfg, results[0])
        return done[strategy]

    return run


def reference_run(cfg: FlowerRun, out: Path):
    """The same federation with fedsplit's own server and four clients (threads of this process)."""
    spec = ShardSpec.of(cfg)
    federation = FederationConfig(strategy=cfg.strategy, rounds=cfg.rounds, fraction=cfg.fraction,
                                  min_clients=cfg.clients, local_steps=cfg.local_steps, seed=cfg.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threaded_server(cfg.model, cfg.cut, federation=federation, num_labels=num_labels(spec), seed=cfg.seed,
                             checkpoint_dir=str(out)) as (endpoint, server):
            errors = []
            # Built one after the other: tokenizers and model loading are not for several threads at once.
            shards = [shard(spec, k) for k in range(cfg.clients)]
            clients = [SplitClient(ClientConfig(
                server=endpoint, model=cfg.model, cut=Cut.parse(cfg.cut), num_labels=len(shards[k].labels),
                lora=LoraSpec(rank=cfg.rank_of(k), alpha=cfg.alpha), lr=cfg.lr, head_lr=cfg.head_lr, seed=cfg.seed,
                client_id=f"client{k}")) for k in range(cfg.clients)]

            def client(k: int):
                try:
                    with clients[k]:
                        FederatedClient(clients[k], shards[k].train, shards[k].num_samples,
                                        options=FederatedOptions(labels=shards[k].labels)).run()
                except Exception as exc:  # noqa: BLE001 - reported by the test
                    logging.exception("reference client %d failed", k)
                    errors.append(exc)

            workers = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(cfg.clients)]
            for w in workers:
                w.start()
            for w in workers:
                w.join(300)
            assert not errors, errors
            return [(h.selected, h.uploaded, h.aggregated) for h in server.coordinator.history]
    finally:
        torch.set_num_threads(threads)


def test_fedit_through_flower_equals_fedsplits_own_rounds(task_model, simulate, tmp_path):
    cfg, strategy = simulate(task_model, "fedit", (4,))
    history = reference_run(cfg, tmp_path)
    flower = [(h.selected, h.uploaded, h.aggregated) for h in strategy.host.coordinator.history]
    assert flower == history  # the coordinator's sampling, on both paths
    assert [len(h.selected) for h in strategy.host.coordinator.history] == [2, 2]
    for r in range(cfg.rounds):
        ours = load_file(str(Path(cfg.checkpoint_dir) / f"round_{r}" / "adapter_model.safetensors"))
        theirs = load_file(str(tmp_path / f"round_{r}" / "adapter_model.safetensors"))
        assert set(ours) == set(theirs)
        for name in ours:
            # One torch thread on both sides, the same seeds, data, steps and
            # step ids: the same float operations in the same order, so equal bits.
            assert torch.equal(ours[name], theirs[name]), name


def test_mixed_ranks_run_through_flower(task_model, simulate):
    cfg, strategy = simulate(task_model, "hetlora", (4, 8))
    coord = strategy.host.coordinator
    assert coord.phase == "done" and [h.aggregated for h in coord.history] == [True, True]
    sessions = strategy.host.server.sessions.by_client
    assert {c: sessions[c].spec.rank for c in coord.members} == {f"client{k}": cfg.rank_of(k) for k in range(CLIENTS)}
    assert all(m.info.rank <= sessions[c].spec.rank for c, m in coord.members.items())  # HetLoRA may prune
    assert all(entry["uploads"] and not entry["left_out"] for entry in strategy.history)
    adapter = load_file(str(Path(cfg.checkpoint_dir) / "round_1" / "adapter_model.safetensors"))
    ranks = {t.shape[0] for n, t in adapter.items() if "lora_A" in n}
    assert ranks == {8}  # the global adapter at the largest rank
    metrics = strategy.history[-1]["metrics"]
    assert metrics["num-examples"] > 0 and metrics["bytes-sent"] > 0 and metrics["peak-memory"] > 0


def test_flower_checkpoint_loads_with_peft(task_model, simulate):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    cfg, _ = simulate(task_model, "fedit", (4,))
    folder = Path(cfg.checkpoint_dir) / "round_1"
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(task_model), folder)
    saved = load_file(str(folder / "adapter_model.safetensors"))
    loaded = dict(model.named_parameters())
    lora = [n for n in saved if "lora_B" in n]
    assert lora and any(saved[n].abs().sum() > 0 for n in lora)  # trained, not the initial B = 0
    for name in lora:
        peft_name = name.replace(".lora_B.weight", ".lora_B.default.weight")
        assert torch.equal(loaded[peft_name].detach(), saved[name])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[101, 2023, 102]])).logits
    assert logits.shape == (1, model.config.num_labels) and torch.isfinite(logits).all()


def test_records_round_trip_and_refuse_what_is_not_a_message():
    msg = Message("upload", "client3", 0, meta={"round": 1, "record": {"loss": 0.5}},
                  tensors={"A:m": torch.randn(2, 3), "H:h": torch.zeros(4, dtype=torch.float16)})
    back = from_records(to_records(msg), "upload")
    assert (back.op, back.client, back.meta) == ("upload", "client3", msg.meta)
    assert all(torch.equal(back.tensors[k], v) for k, v in msg.tensors.items())
    with pytest.raises(RecordError, match="expected a fedsplit 'ok'"):
        from_records(to_records(msg), "ok")
    with pytest.raises(RecordError, match="holds no fedsplit"):
        from_records(RecordDict(), "upload")
    with pytest.raises(RecordError, match="bfloat16"):
        to_records(Message("upload", tensors={"A:m": torch.zeros(2, dtype=torch.bfloat16)}))
