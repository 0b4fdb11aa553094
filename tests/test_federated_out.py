"""A federated client's --out: the global model after the last round, both
halves, and under FedDPA its personal adapter."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from conftest import save_tiny_with_tokenizer, threaded_server
from server.rounds import FederationConfig
from split.launch import child_env, fedsplit_command

WORDS = ["red", "blue", "green", "apple", "pear", "plum", "teal", "fig"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return save_tiny_with_tokenizer("bert", tmp_path_factory.mktemp("bert-tok"))


def run_federation(model, tmp_path, personal_client: int | None = None, outs=(True, True)) -> list[dict]:
    """Two `fedsplit client` processes through a two-round FedIT server (in this
    process, so the test can read its checkpoints); returns their summaries."""
    data = tmp_path / "train.jsonl"
    # Three labels: the tiny model's saved head has three classes.
    data.write_text("".join(json.dumps({"text": f"{w} is a {'fruit' if i % 2 else 'colour'}", "label": "abc"[i % 3]})
                            + "\n" for i, w in enumerate(WORDS * 4)))
    federation = FederationConfig(rounds=2, min_clients=2, local_steps=2)
    with threaded_server(model, "1,1", dropout=False, federation=federation,
                         checkpoint_dir=str(tmp_path / "ckpt")) as (endpoint, _):
        procs = []
        for k in range(2):
            args = ["client", "--server", endpoint, "--model", str(model), "--no-dropout", "--rank", "4",
                    "--alpha", "8", "--lr", "2e-2", "--id", f"c{k}", "--data", str(data), "--num-clients", "2",
                    "--client-index", str(k), "--batch-size", "4", "--max-length", "16", "--no-progress",
                    "--connect-timeout", "120", "--summary-json", str(tmp_path / f"summary{k}.json")]
            args += ["--personal"] if k == personal_client else []
            args += ["--out", str(tmp_path / f"out{k}")] if outs[k] else []
            procs.append(subprocess.Popen(fedsplit_command(*args), env=child_env(), stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
        results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
    return [json.loads((tmp_path / f"summary{k}.json").read_text()) | {"stdout": results[k][0]} for k in range(2)]


def test_federated_clients_save_the_global_model_at_out(bert, tmp_path):
    summaries = run_federation(bert, tmp_path, personal_client=0, outs=(True, False))
    glob = load_file(str(tmp_path / "ckpt" / "round_1" / "adapter_model.safetensors"))
    saved = load_file(str(tmp_path / "out0" / "adapter_model.safetensors"))
    assert summaries[0]["adapter"] == str((tmp_path / "out0").resolve())
    assert set(saved) == set(glob)
    # Block 1 and 2 are the server's: their saved LoRA is the aggregate, not what client 0 last trained.
    assert any(".layer.1." in k for k in saved)
    for key, value in glob.items():
        assert torch.equal(saved[key], value), key
    # The clients named their classes at join: the round checkpoint and the
    # client's own folders (global and personal) all name them in head order.
    names = {"0": "a", "1": "b", "2": "c"}
    for folder in ("ckpt/round_1", "out0", "out0/personal"):
        assert json.loads((tmp_path / folder / "config.json").read_text())["id2label"] == names, folder
    assert (tmp_path / "out0" / "tokenizer_config.json").exists()
    # No --out: nothing is written, and the summary says so by having no path.
    assert "adapter" not in summaries[1] and not (tmp_path / "out1").exists()
    assert f"adapter saved to {(tmp_path / 'out0').resolve()}" in summaries[0]["stdout"]

    # FedDPA: the personal adapter sits beside it, on the client-side blocks only, and loads with peft.
    personal = load_file(str(tmp_path / "out0" / "personal" / "adapter_model.safetensors"))
    lora = [k for k in personal if ".lora_" in k]
    assert lora and all(".layer.0." in k or ".layer.3." in k for k in lora)
    assert {k for k in personal if ".lora_" not in k} == {k for k in glob if "classifier" in k}  # the one head
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in personal.items())
    assert summaries[0]["personal_adapter"] == str((tmp_path / "out0" / "personal").resolve())
    base = AutoModelForSequenceClassification.from_pretrained(bert, num_labels=3)
    model = PeftModel.from_pretrained(base, tmp_path / "out0")
    model.load_adapter(tmp_path / "out0" / "personal", adapter_name="personal")
    assert "personal" in model.peft_config
