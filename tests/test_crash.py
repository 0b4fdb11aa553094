"""Crash tests with real processes: a client SIGKILLed mid-step, and a server
SIGKILLed mid-round (federation) or mid-training (plain split) and started
again with --resume on the same endpoint, while the `fedsplit client`
processes carry on by themselves."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from conftest import save_tiny_with_tokenizer, status
from server.persist import read_record
from split.launch import child_env, fedsplit_command, free_port, start_server, stop, wait_ready

WORDS = ["red", "blue", "green", "apple", "pear", "plum", "teal", "fig"]
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return save_tiny_with_tokenizer("bert", tmp_path_factory.mktemp("bert-crash"))


def write_data(path: Path) -> Path:
    path.write_text("".join(json.dumps({"text": f"{w} is a {'fruit' if i % 2 else 'colour'}", "label": "abc"[i % 3]})
                            + "\n" for i, w in enumerate(WORDS * 4)))
    return path


def client(model: Path, endpoint: str, data: Path, tmp_path: Path, name: str, *extra: str) -> subprocess.Popen:
    """A `fedsplit client` process whose stderr goes to ``tmp_path/name.err``."""
    args = ["client", "--server", endpoint, "--model", str(model), "--data", str(data), "--id", name,
            "--batch-size", "4", "--max-length", "16", "--no-progress", "--rank", "4", "--alpha", "8", "--threads", "1",
            "--connect-timeout", "120", "--reconnect-for", "120", "--summary-json", str(tmp_path / f"{name}.json"),
            "--out", str(tmp_path / f"{name}-adapter"), *extra]
    return subprocess.Popen(fedsplit_command(*args), env=child_env(), stdout=subprocess.PIPE,
                            stderr=open(tmp_path / f"{name}.err", "w"), text=True)


def server(model: Path, endpoint: str, log: Path, *args: str) -> subprocess.Popen:
    """A `fedsplit server` process logging to ``log`` (appended: one file across restarts)."""
    proc = start_server(model, "1,1", endpoint, "--num-labels", "3", "--log-level", "INFO", "--threads", "1", *args,
                        output=open(log, "a"))
    wait_ready(endpoint, proc)
    return proc


def finish(procs: list[subprocess.Popen], tmp_path: Path, names: list[str]) -> list[dict]:
    """Wait for client processes; their summaries."""
    for proc, name in zip(procs, names):
        proc.communicate(timeout=240)
        assert proc.returncode == 0, (tmp_path / f"{name}.err").read_text()[-3000:]
    return [json.loads((tmp_path / f"{name}.json").read_text()) for name in names]


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL


def wait_for(what, timeout: float = 120.0, every: float = 0.05):
    """Poll ``what()`` until it returns something truthy; return it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = what()
        if found:
            return found
        time.sleep(every)
    raise TimeoutError(f"waited {timeout:.0f}s for {what.__doc__ or what}")


def hashes(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


def loads_with_peft(model: Path, folder: Path) -> PeftModel:
    base = AutoModelForSequenceClassification.from_pretrained(model, num_labels=3)
    return PeftModel.from_pretrained(base, folder)


# ---------------------------------------------------------------- server killed


@pytest.mark.slow
def test_federated_clients_outlive_a_server_killed_mid_round_and_resumed(bert, tmp_path):
    data = write_data(tmp_path / "train.jsonl")
    endpoint, ckpt, log = f"tcp://127.0.0.1:{free_port()}", tmp_path / "ckpt", tmp_path / "server.log"
    args = ["--strategy", "fedit", "--rounds", "3", "--min-clients", "2", "--local-steps", "40", "--no-dropout",
            "--checkpoint-dir", str(ckpt)]
    srv = server(bert, endpoint, log, *args)
    names = ["c0", "c1"]
    procs = [client(bert, endpoint, data, tmp_path, name, "--num-clients", "2", "--client-index", str(k),
                    "--no-dropout", "--lr", "2e-2") for k, name in enumerate(names)]
    try:
        wait_for(lambda: (ckpt / "round_0").is_dir())
        # Mid-round: round 0 is committed and a client's forward waits for its backward.
        wait_for(lambda: status(endpoint)["pending"] > 0, every=0.01)
        kill(srv)
        committed = {p.name: hashes(p) for p in ckpt.glob("round_*")}
        assert "round_2" not in committed and all(p.poll() is None for p in procs)
        time.sleep(1.0)  # a few seconds down, counting the restart
        srv = server(bert, endpoint, log, *args, "--resume")
        summaries = finish(procs, tmp_path, names)
        assert srv.wait(60) == 0, "the resumed server did not end after the federation"
    finally:
        stop(srv)
        for p in procs:
            stop(p)
    # What was committed before the kill is untouched; every round is there.
    for name, before in committed.items():
        assert hashes(ckpt / name) == before, name
    assert all((ckpt / f"round_{r}" / "adapter_model.safetensors").exists() for r in range(3))
    assert "resuming after round_" in log.read_text()
    for name, summary in zip(names, summaries):
        err = (tmp_path / f"{name}.err").read_text()
        assert "registering and joining again" in err, err[-2000:]
        assert [r["round"] for r in summary["rounds"]] == [0, 1, 2], summary["rounds"]
    assert any("redoing round" in (tmp_path / f"{n}.err").read_text() for n in names)
    # Each client's final adapter is the last round's global model, and loads with peft.
    glob = load_file(str(ckpt / "round_2" / "adapter_model.safetensors"))
    saved = load_file(str(tmp_path / "c0-adapter" / "adapter_model.safetensors"))
    assert set(saved) == set(glob) and all(torch.equal(saved[k], glob[k]) for k in glob)
    model = loads_with_peft(bert, tmp_path / "c0-adapter")
    assert any("lora_A" in n for n, _ in model.named_parameters())


@pytest.mark.slow
def test_a_plain_split_client_outlives_a_server_killed_and_resumed(bert, tmp_path):
    data = write_data(tmp_path / "train.jsonl")
    endpoint, ckpt, log = f"tcp://127.0.0.1:{free_port()}", tmp_path / "ckpt", tmp_path / "server.log"
    args = ["--checkpoint-dir", str(ckpt), "--save-every", "5"]
    srv = server(bert, endpoint, log, *args)
    proc = client(bert, endpoint, data, tmp_path, "solo", "--steps", "120", "--lr", "5e-3")
    try:
        def saved():
            """a saved adapter at step 10 or later"""
            records = list((ckpt / "clients").glob("*.safetensors"))
            return records and read_record(records[0]).meta["steps"] >= 10 and records[0]

        record = wait_for(saved)
        kill(srv)
        at_kill = read_record(record).meta["steps"]
        assert proc.poll() is None
        time.sleep(1.0)
        srv = server(bert, endpoint, log, *args, "--resume")
        (summary,) = finish([proc], tmp_path, ["solo"])
    finally:
        stop(srv)
        stop(proc)
    err = (tmp_path / "solo.err").read_text()
    assert "registering again to redo the step" in err, err[-2000:]
    restored = int(err.split("gave back its server-side adapter at step ")[1].split(" ")[0])
    assert restored >= at_kill and restored % 5 == 0
    assert summary["steps"] == 120
    assert "restored at step" in log.read_text()
    loads_with_peft(bert, tmp_path / "solo-adapter")


# ---------------------------------------------------------------- client killed


DOOMED = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from conftest import VOCAB, random_batch
    from edge.client import ClientConfig, SplitClient
    from edge.federated import FederatedClient
    from split.lora import LoraSpec
    client = SplitClient(ClientConfig(server={endpoint!r}, model={model!r}, num_labels=3, dropout=False,
                                      lora=LoraSpec(4, 8.0), client_id="doomed"))
    runner = FederatedClient(client, [random_batch(0, VOCAB)], num_samples=4)

    def die(offer):  # a forward through the server, then death before the backward
        client.model.train()
        client.model(**random_batch(1, VOCAB))
        print("forwarded", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    runner._train_round = die
    runner.run()
""")


@pytest.mark.slow
def test_a_federated_client_killed_mid_step_is_left_out_and_the_rounds_complete(bert, tmp_path):
    data = write_data(tmp_path / "train.jsonl")
    endpoint, ckpt, log = f"tcp://127.0.0.1:{free_port()}", tmp_path / "ckpt", tmp_path / "server.log"
    srv = server(bert, endpoint, log, "--strategy", "fedit", "--rounds", "1", "--min-clients", "3",
                 "--local-steps", "5", "--deadline", "5", "--session-timeout", "3", "--no-dropout",
                 "--checkpoint-dir", str(ckpt))
    names = ["c0", "c1"]
    procs = [client(bert, endpoint, data, tmp_path, name, "--num-clients", "2", "--client-index", str(k),
                    "--no-dropout") for k, name in enumerate(names)]
    doomed = subprocess.Popen([sys.executable, "-c", DOOMED.format(tests=str(TESTS), endpoint=endpoint,
                                                                   model=str(bert))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        out, err = doomed.communicate(timeout=120)
        assert "forwarded" in out and doomed.returncode == -signal.SIGKILL, err[-2000:]
        summaries = finish(procs, tmp_path, names)
        assert srv.wait(60) == 0
    finally:
        stop(srv)
        for p in procs:
            stop(p)
    (entry,) = json.loads((ckpt / "round_0" / "coordinator.json").read_text())["history"]
    assert entry["uploaded"] == names and "doomed" in entry["selected"] and entry["aggregated"]
    assert entry["seconds"] >= 5  # the round waited for the dead client until its deadline
    # The server ends only once every session is gone: the dead client's was freed when it fell silent.
    text = log.read_text()
    assert "doomed missed the deadline" in text and "client doomed silent for more than 3s" in text
    assert [[r["round"] for r in s["rounds"]] for s in summaries] == [[0], [0]]
