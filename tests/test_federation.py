"""Federated rounds with real processes: heterogeneous ranks, checkpoints, resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from split.launch import child_env, free_port, start_server, stop, wait_ready
from split.partition import load_config

HERE = Path(__file__).resolve().parent


def federation(model: Path, ckpt: Path, strategy: str, ranks: list[int], rounds: int, *extra: str) -> list[dict]:
    """Run a server and one client process per rank until the federation ends."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    server = start_server(model, "1,1", endpoint, "--strategy", strategy, "--rounds", str(rounds),
                          "--min-clients", str(len(ranks)), "--local-steps", "3", "--num-labels", "3",
                          "--no-dropout", "--checkpoint-dir", str(ckpt), *extra)
    try:
        wait_ready(endpoint, server)
        clients = [subprocess.Popen([sys.executable, str(HERE / "fed_client.py"), endpoint, str(model), f"c{k}",
                                     str(r), str(k)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=child_env()) for k, r in enumerate(ranks)]
        outputs = [c.communicate(timeout=300) for c in clients]
        for c, (out, err) in zip(clients, outputs):
            assert c.returncode == 0, err[-3000:]
        assert server.wait(60) == 0, "the server did not exit after the federation"
    finally:
        stop(server)
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]


@pytest.mark.slow
def test_three_clients_with_heterogeneous_ranks(tiny_models, tmp_path):
    model = tiny_models("bert")
    results = federation(model, tmp_path, "hetlora", [2, 4, 8], rounds=2)
    for r in results:
        assert [rec["round"] for rec in r["rounds"]] == [0, 1]
        assert r["final_accuracy"] is not None
    snap = json.loads((tmp_path / "round_1" / "coordinator.json").read_text())
    assert [h["uploaded"] for h in snap["history"]] == [["c0", "c1", "c2"]] * 2
    # The global LoRA is one standard PEFT adapter at the largest rank.
    adapter = load_file(str(tmp_path / "round_1" / "adapter_model.safetensors"))
    a = adapter["base_model.model.bert.encoder.layer.1.attention.self.query.lora_A.weight"]
    assert a.shape[0] == 8
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    config = load_config(model, "classification", 3, dropout=False)
    base = AutoModelForSequenceClassification.from_pretrained(model, config=config)
    loaded = PeftModel.from_pretrained(base, tmp_path / "round_1")
    assert torch.equal(loaded.base_model.model.bert.encoder.layer[1].attention.self.query.lora_A["default"].weight, a)


@pytest.mark.slow
def test_resume_gives_the_same_result_as_an_uninterrupted_run(tiny_models, tmp_path):
    model = tiny_models("bert")
    federation(model, tmp_path / "whole", "fedit", [4, 4], rounds=2)
    federation(model, tmp_path / "parts", "fedit", [4, 4], rounds=1)
    assert not (tmp_path / "parts" / "round_1").exists()
    federation(model, tmp_path / "parts", "fedit", [4, 4], 2, "--resume")
    whole = load_file(str(tmp_path / "whole" / "round_1" / "adapter_model.safetensors"))
    parts = load_file(str(tmp_path / "parts" / "round_1" / "adapter_model.safetensors"))
    assert whole.keys() == parts.keys()
    for key in whole:
        assert torch.equal(whole[key], parts[key]), key
    first = load_file(str(tmp_path / "whole" / "round_0" / "adapter_model.safetensors"))
    assert any(not torch.equal(first[k], whole[k]) for k in whole), "round 1 changed nothing"
