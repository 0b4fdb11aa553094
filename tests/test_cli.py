"""The command line, end to end with real processes on the real model."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import server_process
from split.launch import child_env, fedsplit_command, free_port


def run(*args, timeout=300):
    return subprocess.run(fedsplit_command(*args), capture_output=True, text=True, env=child_env(),
                          timeout=timeout)


def test_client_without_a_server_exits_with_a_clear_error(tmp_path):
    out = run("client", "--server", f"tcp://127.0.0.1:{free_port()}", "--connect-timeout", "1",
              "--out", str(tmp_path / "a"))
    assert out.returncode == 2
    assert "no answer from the server" in out.stderr


def test_server_rejects_a_bad_cut():
    out = run("server", "--cut", "3,3", "--bind", f"tcp://127.0.0.1:{free_port()}")
    assert out.returncode == 2
    assert "leaves no block for the server" in out.stderr


@pytest.mark.slow
def test_client_trains_minilm_on_user_jsonl_through_a_server(tmp_path):
    lines = [json.dumps({"text": f"{w} is a {'fruit' if i % 2 else 'colour'} word", "label": "ab"[i % 2]})
             for i, w in enumerate(["red", "apple", "blue", "pear", "green", "plum", "teal", "fig"] * 3)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    summary = tmp_path / "summary.json"
    with server_process(None, "1,1") as endpoint:
        out = run("client", "--server", endpoint, "--data", str(tmp_path / "train.jsonl"), "--steps", "4",
                  "--batch-size", "4", "--out", str(tmp_path / "adapter"), "--summary-json", str(summary),
                  "--no-progress")
    assert out.returncode == 0, out.stderr
    s = json.loads(summary.read_text())
    assert s["steps"] == 4 and s["labels"] == ["a", "b"]
    assert s["bytes_sent"] > 0 and s["bytes_received"] > 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 8
