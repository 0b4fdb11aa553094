"""Liveness: requests resent after a lost reply are answered once, a client
keeps its session while it works locally, and clients outlive a server killed
and restarted with --resume (real processes)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import zmq

from conftest import VOCAB, random_batch, threaded_server
from edge.client import ClientConfig, SplitClient
from server.service import BackboneServer, ServerConfig
from split.lora import LoraSpec
from split.partition import Cut
from split.protocol import Hello, ModelInfo, Welcome
from split.transport import Connection, ServerUnavailable, SessionLost
from split.wire import Message, decode, encode

# ---------------------------------------------------------------- the client's retries


class FlakyServer:
    """A ROUTER on loopback that ignores the first ``drop`` copies of each
    request, answers the next, and records every request it received."""

    def __init__(self, drop: int, code: str | None = None):
        self.drop, self.code = drop, code
        self.seen: list[Message] = []
        self.socket = zmq.Context.instance().socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop.is_set():
            if not self.socket.poll(20):
                continue
            routing_id, *frames = self.socket.recv_multipart()
            msg = decode(frames)
            self.seen.append(msg)
            if sum(m.meta["rid"] == msg.meta["rid"] for m in self.seen) <= self.drop:
                continue  # this copy's reply is "lost"
            reply = Message("ok", msg.client, msg.step, meta={"rid": msg.meta["rid"]})
            if self.code is not None:
                reply = Message("error", msg.client, msg.step,
                                meta={"rid": msg.meta["rid"], "error": "gone", "code": self.code})
            self.socket.send_multipart([routing_id] + encode(reply))

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self.socket.close(linger=0)


def test_an_unanswered_request_is_resent_unchanged_until_answered():
    server = FlakyServer(drop=2)
    conn = Connection(server.endpoint, "c", timeout=0.3, reconnect_for=30)
    try:
        started = time.monotonic()
        reply = conn.request(Message("backward", step=7, tensors={"grad": torch.ones(2, 3)}))
        took = time.monotonic() - started
    finally:
        conn.close()
        server.close()
    assert reply.op == "ok" and reply.step == 7
    copies = [m for m in server.seen if m.op == "backward"]
    assert len(copies) == 3 and conn.retries == 2
    # The same request each time: op, step, request id and tensors.
    assert {m.meta["rid"] for m in copies} == {copies[0].meta["rid"]}
    assert {m.step for m in copies} == {7}
    assert all(torch.equal(m.tensors["grad"], torch.ones(2, 3)) for m in copies)
    # Two waits of 0.3 s and two backoff pauses (0.1-0.2 s, then 0.2-0.4 s).
    print(f"answered after 2 lost replies in {took:.2f}s")
    assert 0.9 <= took < 5


def test_without_reconnect_time_a_lost_reply_fails_with_what_to_do():
    server = FlakyServer(drop=1)
    conn = Connection(server.endpoint, "c", timeout=0.3, reconnect_for=0)
    try:
        with pytest.raises(ServerUnavailable, match="no reply within 0s.*--reconnect-for"):
            conn.request(Message("ping"))
    finally:
        conn.close()
        server.close()
    assert len(server.seen) == 1


def test_a_session_error_raises_session_lost_at_once():
    server = FlakyServer(drop=0, code="session")
    conn = Connection(server.endpoint, "c", timeout=5, reconnect_for=30)
    try:
        with pytest.raises(SessionLost, match="gone") as lost:
            conn.request(Message("forward", step=1))
    finally:
        conn.close()
        server.close()
    assert lost.value.code == "session" and len(server.seen) == 1


# ---------------------------------------------------------------- the server's reply cache


class InProcess:
    """A server driven through ``handle``, without sockets: each request is
    encoded once, so sending it twice sends exactly the same frames."""

    def __init__(self, path, **config):
        self.server = BackboneServer(ServerConfig(model=str(path), cut=Cut(1, 1), num_labels=3, dropout=True,
                                                  **config))
        self.path = path
        self.rid = 0

    def frames(self, msg: Message, client: str, token: str = "") -> list:
        self.rid += 1
        msg.client, msg.meta = client, {**msg.meta, "rid": self.rid, "token": token}
        return encode(msg)

    def send(self, frames: list) -> Message:
        return self.server.handle(b"r", frames)

    def hello(self, client: str) -> str:
        from split.partition import load_config

        config = load_config(self.path, "classification", 3, True)
        hello = Hello(ModelInfo.of(self.path, config), LoraSpec(4, 8.0), "classification", seed=3)
        reply = self.send(self.frames(hello.to_message(), client))
        return Welcome.from_message(reply).token


def _steps(node: InProcess, client: str, token: str, twice: bool) -> tuple[list, list]:
    """Three forward/backward pairs from fixed tensors; with ``twice`` each
    request is sent a second time, as a client does after a lost reply."""
    gen = torch.Generator().manual_seed(0)
    outs, grads = [], []
    for step in range(3):
        hidden = torch.randn(2, 5, 32, generator=gen)
        mask = torch.ones(2, 5, dtype=torch.uint8)
        grad = torch.randn(2, 5, 32, generator=gen)
        for op, tensors, into in (("forward", {"hidden": hidden, "attention_mask": mask}, outs),
                                  ("backward", {"grad": grad}, grads)):
            frames = node.frames(Message(op, step=step, tensors=tensors), client, token)
            first = node.send(frames)
            assert first.op == "ok", first.meta
            if twice:
                again = node.send(frames)
                assert again.op == "ok", again.meta
                for name in first.tensors:
                    assert torch.equal(first.tensors[name], again.tensors[name]), (op, step, name)
            into.append(first.tensors)
    return outs, grads


def test_a_resent_forward_and_backward_are_answered_from_the_cache_and_applied_once(tiny_models):
    path = tiny_models("bert")
    runs = {}
    for twice in (False, True):
        node = InProcess(path)
        token = node.hello("c")
        outs, grads = _steps(node, "c", token, twice)
        session = node.server.sessions.by_client["c"]
        assert session.steps == 3 and not session.graphs  # one backward applied per step, no graph left over
        assert len(session.replies) == 1  # only the last reply, which the client may still resend
        adapter = node.send(node.frames(Message("adapter"), "c", token)).tensors
        runs[twice] = (outs, grads, adapter)
    plain, doubled = runs[False], runs[True]
    assert plain[2].keys() == doubled[2].keys()
    for key in plain[2]:
        assert torch.equal(plain[2][key], doubled[2][key]), key  # the optimizer stepped once per step
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in plain[2].items() if "lora_B" in k)
    for a, b in zip(plain[0] + plain[1], doubled[0] + doubled[1]):
        assert all(torch.equal(a[n], b[n]) for n in a)


def _hello_frames(node: InProcess, client: str, token: str) -> list:
    from split.partition import load_config

    config = load_config(node.path, "classification", 3, True)
    hello = Hello(ModelInfo.of(node.path, config), LoraSpec(4, 8.0), "classification", seed=3)
    return node.frames(hello.to_message(), client, token)


def _pair(node: InProcess, client: str, token: str, step: int) -> None:
    """A forward and its backward at ``step``, from tensors drawn from the step."""
    gen = torch.Generator().manual_seed(step)
    tensors = {"hidden": torch.randn(2, 5, 32, generator=gen), "attention_mask": torch.ones(2, 5, dtype=torch.uint8)}
    for msg in (Message("forward", step=step, tensors=tensors),
                Message("backward", step=step, tensors={"grad": torch.randn(2, 5, 32, generator=gen)})):
        reply = node.send(node.frames(msg, client, token))
        assert reply.op == "ok", reply.meta


def test_a_restored_adapter_continues_exactly_where_the_saved_one_was(tiny_models, tmp_path):
    path = tiny_models("bert")
    first = InProcess(path, checkpoint_dir=str(tmp_path), save_every=1)
    token = first.hello("c")
    for step in range(4):  # the save at the start of step 3 holds the three steps before it
        _pair(first, "c", token, step)
    assert sorted(p.name for p in (tmp_path / "clients").iterdir()) == [p.name for p in (tmp_path / "clients").glob(
        "*.safetensors")], "a temporary file was left behind"
    record = next((tmp_path / "clients").iterdir())
    assert token not in record.read_bytes().decode("latin-1")  # only the token's hash is stored

    second = InProcess(path, checkpoint_dir=str(tmp_path), save_every=1, resume=True)
    for stranger in ("", "0" * 32):  # no proof, a wrong token: a fresh adapter, not c's
        welcome = Welcome.from_message(second.send(_hello_frames(second, "c", stranger)))
        assert welcome.restored is None and welcome.token != token
        assert second.send(second.frames(Message("bye"), "c", welcome.token)).op == "ok"
    welcome = Welcome.from_message(second.send(_hello_frames(second, "c", token)))
    assert welcome.restored == 3 and welcome.token == token
    _pair(second, "c", token, 3)  # step 3 again, on the restored adapter and AdamW state
    adapters = [node.send(node.frames(Message("adapter"), "c", token)).tensors for node in (first, second)]
    assert adapters[0].keys() == adapters[1].keys()
    for key in adapters[0]:
        assert torch.equal(adapters[0][key], adapters[1][key]), key


def test_a_step_id_reused_by_a_new_request_is_refused(tiny_models):
    node = InProcess(tiny_models("bert"))
    token = node.hello("c")
    tensors = {"hidden": torch.zeros(1, 2, 32), "attention_mask": torch.ones(1, 2, dtype=torch.uint8)}
    assert node.send(node.frames(Message("forward", step=0, tensors=tensors), "c", token)).op == "ok"
    reply = node.send(node.frames(Message("forward", step=0, tensors=tensors), "c", token))
    assert reply.op == "error" and "already served for another request" in reply.meta["error"]
    assert len(node.server.sessions.by_client["c"].graphs) == 1


def test_a_resent_hello_gets_the_same_welcome(tiny_models):
    node = InProcess(tiny_models("bert"))
    token = node.hello("c")
    from split.partition import load_config

    config = load_config(node.path, "classification", 3, True)
    hello = Hello(ModelInfo.of(node.path, config), LoraSpec(4, 8.0), "classification", seed=3)
    frames = node.frames(hello.to_message(), "c", token)
    first, again = node.send(frames), node.send(frames)
    assert first.op == again.op == "ok"
    assert first.meta["token"] == again.meta["token"]  # the second copy opened no other session
    assert node.server.sessions.by_client["c"].token == first.meta["token"]


# ---------------------------------------------------------------- heartbeat


def test_the_heartbeat_keeps_a_session_alive_while_the_client_works_locally(tiny_models):
    path = tiny_models("bert")
    with threaded_server(path, "1,1", num_labels=3, session_timeout=2.0) as (endpoint, server):
        client = SplitClient(ClientConfig(server=endpoint, model=str(path), num_labels=3, timeout=30))
        try:
            client.train_step(random_batch(0, VOCAB))
            time.sleep(5.0)  # "local work": two and a half session timeouts without a request of its own
            assert client.conn.client_id in server.sessions.by_client
            assert client.heartbeat.pings >= 4  # one every 0.5 s of silence
            client.train_step(random_batch(1, VOCAB))
            assert client.registrations == 0
        finally:
            client.close()


# ---------------------------------------------------------------- the coordinator after a lost session


def test_a_client_joining_again_mid_round_gets_the_round_again_and_returning_counts_apply():
    from server.rounds import Coordinator, FederationConfig
    from server.strategies.base import ClientInfo
    from round_helpers import CLIENT_MODULE, LAYOUT, FakeServer

    def join(coord, client):
        coord.join(client, ClientInfo(client, 4, 8.0, None, 10), {CLIENT_MODULE: (6, 5)})

    coord = Coordinator(FederationConfig(min_clients=2, client_init="local"), FakeServer(), LAYOUT)
    for client in ("c0", "c1"):
        join(coord, client)
    coord.tick(now=0.0)
    first = coord.poll("c0")
    assert first.status == "train" and coord.poll("c0").status == "wait"
    loads = len(coord.server.loads)
    join(coord, "c0")  # its session was lost after it took the round: it joins again
    again = coord.poll("c0")
    assert again.status == "train" and again.round == first.round
    assert len(coord.server.loads) == loads + 1  # its server-side adapter was set up for the round again
    assert coord.members["c0"].rounds == 1  # the round counts once
    # A resumed coordinator takes a restored client's counts; a fresh client starts from zero.
    resumed = Coordinator(FederationConfig(min_clients=2), FakeServer(), LAYOUT)
    resumed.returning["c0"] = (3, 2)
    join(resumed, "c0")
    join(resumed, "c1")
    assert (resumed.members["c0"].synced, resumed.members["c0"].rounds) == (3, 2)
    assert (resumed.members["c1"].synced, resumed.members["c1"].rounds) == (0, 0)
