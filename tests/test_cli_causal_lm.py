"""`fedsplit client --task causal-lm`, end to end: a server process and a client
process on a tiny GPT-2 with a real tokenizer, texts without labels."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import save_tiny_with_tokenizer, server_process
from edge.lm import collate_lm
from split.launch import child_env, fedsplit_command, free_port

WORDS = "the cat sat on the mat and the dog ran in the park while the birds sang all day".split()


def run(*args, timeout=300):
    return subprocess.run(fedsplit_command(*args), capture_output=True, text=True, env=child_env(),
                          timeout=timeout)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return save_tiny_with_tokenizer("gpt2", tmp_path_factory.mktemp("gpt2-lm"), "causal-lm")


def write_texts(path, n, offset=0):
    path.write_text("".join(json.dumps({"text": " ".join(WORDS[(i + offset) % 6:(i + offset) % 6 + 9])}) + "\n"
                            for i in range(n)))
    return path


def peft_loss(model_path, adapter, texts_path) -> float:
    """Token-weighted held-out loss of the saved adapter on stock transformers + peft."""
    tok = AutoTokenizer.from_pretrained(model_path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path), adapter).eval()
    texts = [json.loads(line)["text"] for line in texts_path.read_text().splitlines()]
    ids = tok(texts, truncation=True, max_length=64)["input_ids"]
    total = tokens = 0.0
    with torch.no_grad():
        for start in range(0, len(ids), 64):
            batch = collate_lm(ids[start:start + 64], tok.pad_token_id)
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * n
            tokens += n
    return total / tokens


@pytest.mark.slow
def test_client_trains_a_causal_lm_through_a_server_and_saves_a_peft_adapter(gpt2, tmp_path):
    train = write_texts(tmp_path / "train.jsonl", 24)
    test = write_texts(tmp_path / "test.jsonl", 6, offset=3)
    summary_path = tmp_path / "summary.json"
    with server_process(gpt2, "1,1", "--task", "causal-lm", "--no-dropout") as endpoint:
        out = run("client", "--server", endpoint, "--model", str(gpt2), "--task", "causal-lm", "--no-dropout",
                  "--data", str(train), "--test-data", str(test), "--steps", "12", "--batch-size", "4",
                  "--lr", "1e-2", "--out", str(tmp_path / "adapter"), "--summary-json", str(summary_path),
                  "--no-progress")
    assert out.returncode == 0, out.stderr
    s = json.loads(summary_path.read_text())
    assert s["steps"] == 12 and s["train_samples"] == 24 and s["test_samples"] == 6
    assert s["loss_after"] < s["loss_before"]
    assert s["perplexity_after"] == pytest.approx(math.exp(s["loss_after"]))
    assert f"held-out loss {s['loss_before']:.3f} -> {s['loss_after']:.3f}" in out.stdout
    assert "held out" not in out.stderr  # a test file was given: nothing is held out
    # The saved adapter is the trained split model: stock peft reproduces its held-out loss.
    assert peft_loss(gpt2, tmp_path / "adapter", test) == pytest.approx(s["loss_after"], abs=1e-4)


def test_causal_lm_without_data_is_a_clear_error(gpt2):
    out = run("client", "--model", str(gpt2), "--task", "causal-lm", "--server",
              f"tcp://127.0.0.1:{free_port()}", "--connect-timeout", "1")
    assert out.returncode == 2
    assert "fedsplit client: error: --task causal-lm needs --data" in out.stderr


def test_held_out_share_is_announced(gpt2, tmp_path):
    # Without --test-data the client says how much of --data it keeps back (then finds no server).
    train = write_texts(tmp_path / "train.jsonl", 20)
    out = run("client", "--model", str(gpt2), "--task", "causal-lm", "--data", str(train), "--server",
              f"tcp://127.0.0.1:{free_port()}", "--connect-timeout", "1")
    assert out.returncode == 2
    assert f"no --test-data: 4 of 20 samples of {train} (20%, random) are held out for evaluation" in out.stderr
