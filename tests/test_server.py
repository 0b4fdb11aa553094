"""The server under bad input and lost clients (invariant 5, session lifetime),
and the client's errors when the server is missing or refuses it.

The server runs in this process (a serving thread) unless a separate process
is the point: only the client that dies is a process of its own."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import time

import msgpack
import pytest
import torch

from conftest import VOCAB, dealer, random_batch, save_tiny, status, threaded_server
from edge.client import ClientConfig, ServerRefused, ServerUnavailable, SplitClient
from split.launch import child_env, free_port
from split.lora import LoraSpec
from split.partition import Cut
from split.wire import Limits, Message, decode

TIMEOUT = 3.0


@pytest.fixture(scope="module")
def bert_server(tiny_models):
    path = tiny_models("bert")
    limit = 1 << 20
    with threaded_server(path, "1,1", num_labels=3, session_timeout=TIMEOUT,
                         limits=Limits(max_tensor_bytes=limit, max_message_bytes=limit)) as (endpoint, _):
        yield path, endpoint


def client_for(path, endpoint, **kw) -> SplitClient:
    return SplitClient(ClientConfig(server=endpoint, model=str(path), num_labels=3, timeout=30, **kw))


def raw_request(endpoint: str, frames: list) -> Message:
    sock = dealer(endpoint)
    try:
        sock.send_multipart(frames)
        assert sock.poll(10_000), "the server did not answer a malformed message"
        return decode(sock.recv_multipart())
    finally:
        sock.close()


def _header(**kw) -> bytes:
    base = {"v": 1, "op": "forward", "client": "intruder", "step": 0, "meta": {}, "tensors": []}
    base.update(kw)
    return msgpack.packb(base)


def test_malformed_messages_get_errors_and_others_keep_training(bert_server):
    path, endpoint = bert_server
    good = client_for(path, endpoint)
    try:
        losses = [good.train_step(random_batch(0, VOCAB))]
        hidden = {"name": "hidden", "dtype": "float32", "shape": [1, 2, 32], "codec": "raw", "nbytes": 256}
        mask = {"name": "attention_mask", "dtype": "uint8", "shape": [1, 2], "codec": "raw", "nbytes": 2}
        big = 2 * (1 << 20)
        cases = [
            ([b"not msgpack \xc1"], "not valid msgpack"),
            ([_header(v=2)], "protocol version"),
            ([_header(op="format_disk")], "unknown op"),
            ([_header(tensors=[{**hidden, "dtype": "float128"}]), bytes(256)], "not allowed"),
            ([_header(tensors=[{**hidden, "shape": [1, 3, 32]}]), bytes(256)], "header says 256 bytes"),
            ([_header(tensors=[hidden]), bytes(100)], "the frame holds 100"),
            ([_header(tensors=[hidden, mask]), bytes(256)], "2 tensors but 1 tensor frames"),
            ([_header(tensors=[{**hidden, "shape": [1, big // 128, 32], "nbytes": big}]), bytes(big)],
             "exceed the limit"),
            ([_header(tensors=[hidden, mask]), bytes(256), bytes(2)], "no session for client 'intruder'"),
            ([_header(op="ok")], "is a reply, not a request"),
            ([_header(op="status", client="x" * 500)], "client id"),
        ]
        for frames, expected in cases:
            reply = raw_request(endpoint, frames)
            assert reply.op == "error", expected
            assert expected in reply.meta["error"], (expected, reply.meta["error"])
            losses.append(good.train_step(random_batch(len(losses), VOCAB)))
        # A registered client sending bad tensors gets an error, not a crash.
        bad = good.conn
        with pytest.raises(Exception, match="'hidden' must be a float tensor of shape"):
            bad.request(Message("forward", tensors={"hidden": torch.zeros(1, 2, 31),
                                                    "attention_mask": torch.ones(1, 2, dtype=torch.uint8)}))
        with pytest.raises(Exception, match="no forward is waiting"):
            bad.request(Message("backward", step=12345, tensors={"grad": torch.zeros(1, 2, 32)}))
        losses.append(good.train_step(random_batch(99, VOCAB)))
        assert all(torch.isfinite(torch.tensor(losses)))
        assert good.steps == len(losses)
    finally:
        good.close()


VANISH = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import random_batch, VOCAB
    from edge.client import ClientConfig, SplitClient
    client = SplitClient(ClientConfig(server={endpoint!r}, model={model!r}, num_labels=3, client_id="doomed"))
    client.model.train()
    out = client.model(**random_batch(1, VOCAB))  # forward through the server, no backward
    print("forwarded", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.slow
def test_killed_client_state_is_freed_and_others_keep_training(bert_server):
    path, endpoint = bert_server
    tests = str(__import__("pathlib").Path(__file__).parent)
    survivor = client_for(path, endpoint, client_id="survivor")
    try:
        proc = subprocess.Popen([sys.executable, "-c", VANISH.format(tests=tests, endpoint=endpoint, model=str(path))],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
        steps = 0
        while proc.poll() is None:  # the survivor trains while the doomed client starts and dies
            survivor.train_step(random_batch(steps, VOCAB))
            steps += 1
        out, err = proc.communicate()
        assert "forwarded" in out, err
        assert proc.returncode == -9
        before = status(endpoint)
        assert before["sessions"] == 2 and before["pending"] >= 1
        # The survivor keeps training while the dead client's session times out.
        deadline = time.monotonic() + TIMEOUT + 2.0
        while time.monotonic() < deadline:
            survivor.train_step(random_batch(steps, VOCAB))
            steps += 1
        after = status(endpoint)
        print(f"before the timeout: {before}; after: {after}; survivor steps meanwhile: {steps}")
        assert after["sessions"] == 1
        assert after["pending"] == 0
        assert steps > 0
    finally:
        survivor.close()
    assert status(endpoint)["sessions"] == 0


def test_unreachable_server_fails_fast_with_a_clear_message(tiny_models):
    start = time.monotonic()
    with pytest.raises(ServerUnavailable, match="no answer from the server at tcp://127.0.0.1"):
        SplitClient(ClientConfig(server=f"tcp://127.0.0.1:{free_port()}", model=str(tiny_models("bert")),
                                 num_labels=3, connect_timeout=1.0))
    assert time.monotonic() - start < 10


def test_server_refuses_mismatched_model_and_bad_cut(bert_server, tiny_models):
    path, endpoint = bert_server
    with pytest.raises(ServerRefused, match="model mismatch"):
        SplitClient(ClientConfig(server=endpoint, model=str(tiny_models("gpt2")), num_labels=3))
    with pytest.raises(ServerRefused, match="does not host"):
        SplitClient(ClientConfig(server=endpoint, model=str(path), num_labels=3, cut=Cut(1, 0)))
    with pytest.raises(ValueError, match="leaves no block for the server"):
        SplitClient(ClientConfig(server=endpoint, model=str(path), num_labels=3, cut=Cut(2, 2)))


def test_same_shape_checkpoint_with_other_weights_is_refused_naming_both(bert_server, tmp_path):
    path, endpoint = bert_server
    # A "fine-tuned variant": same config and shapes, other weights.
    variant = save_tiny("bert", tmp_path / "variant", seed=1)
    with pytest.raises(ServerRefused, match="checkpoint mismatch") as refused:
        SplitClient(ClientConfig(server=endpoint, model=str(variant), num_labels=3))
    assert f"{path.parent.name}/{path.name}" in str(refused.value)
    assert f"{tmp_path.name}/variant" in str(refused.value)
    # The same weights re-saved elsewhere are the same checkpoint.
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    client_for(copy, endpoint).close()


def test_two_part_server_refuses_a_client_with_more_labels_than_its_head(tiny_models):
    path = tiny_models("bert")
    with threaded_server(path, "1,0", num_labels=3) as (endpoint, _):
        with pytest.raises(ServerRefused, match="head has 3 labels, the client.s data has 8.*--num-labels 8"):
            SplitClient(ClientConfig(server=endpoint, model=str(path), num_labels=8, cut=Cut(1, 0)))
        client = SplitClient(ClientConfig(server=endpoint, model=str(path), num_labels=3, cut=Cut(1, 0)))
        try:
            assert client.train_step(random_batch(0, VOCAB, num_labels=3)) > 0
        finally:
            client.close()


def test_client_with_a_deeper_cut_uses_only_its_server_blocks(bert_server):
    path, endpoint = bert_server
    client = client_for(path, endpoint, cut=Cut(2, 1))
    try:
        client.train_step(random_batch(0, VOCAB))
        server_blocks = {n.split(".layer.")[1].split(".")[0] for n in client.conn.request(Message("adapter")).tensors}
        # The server hosts blocks 1 and 2, but this client keeps block 1 itself.
        assert server_blocks == {"2"}
        whole = {n.split(".layer.")[1].split(".")[0] for n in client.adapter_state() if ".layer." in n}
        assert whole == {"0", "1", "2", "3"}
    finally:
        client.close()


def test_shared_server_lora_is_trained_by_every_client(tiny_models):
    path = tiny_models("bert")
    with threaded_server(path, "1,1", num_labels=3, server_lora="shared") as (endpoint, _):
        a = client_for(path, endpoint, client_id="a")
        b = client_for(path, endpoint, client_id="b")
        try:
            before = a.conn.request(Message("adapter")).tensors
            # a's forward waits for its backward while b takes a whole step:
            # b's update must wait too, or a's graph would see changed weights.
            a.model.train()
            loss_a = a.model(**random_batch(0, VOCAB)).loss
            b.train_step(random_batch(1, VOCAB))
            loss_a.backward()
            a.optimizer.step()
            after_a = a.conn.request(Message("adapter")).tensors
            after_b = b.conn.request(Message("adapter")).tensors
            assert after_a.keys() == after_b.keys() == before.keys()
            for key in before:
                assert torch.equal(after_a[key], after_b[key]), key
            assert any(not torch.equal(before[k], after_a[k]) for k in before if "lora_B" in k)
            with pytest.raises(ServerRefused, match="one shared server-side LoRA"):
                client_for(path, endpoint, lora=LoraSpec(2, 4.0))
        finally:
            a.close()
            b.close()
