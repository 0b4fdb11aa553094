"""The loop keeps answering while the model works, and clients take turns.

The loop thread answers status, ping and refusals itself; model work runs on
one compute thread, a turn per connection. Durations are compared with the
heavy request's own duration in the same run, never with fixed thresholds."""

from __future__ import annotations

import resource
import subprocess
import sys
import threading
import time

import msgpack
import pytest
import torch
import zmq

from conftest import VOCAB, dealer, random_batch, threaded_server
from edge.client import ClientConfig, SplitClient
from server.scheduler import Scheduler
from server.service import BackboneServer, ServerConfig
from split.launch import child_env, fedsplit_command, free_port, stop, wait_ready
from split.lora import LoraSpec
from split.partition import Cut, load_config
from split.protocol import Hello, ModelInfo, OptimizerSettings
from split.transport import Connection
from split.wire import Limits, Message, decode, encode

WIDTH = 32
HEAVY = (4096, 64)  # an eval forward of 262,144 tokens: a second or more on the tiny model
BIG = 1 << 20  # a --max-tokens that lets it through


class Raw:
    """A session on its own DEALER that can send requests without waiting for replies."""

    def __init__(self, endpoint: str, path, client: str):
        conn = Connection(endpoint, client, timeout=60)
        cfg = load_config(path, "classification", 3, True)
        hello = Hello(ModelInfo.of(path, cfg), LoraSpec(4, 8.0), "classification", 0, None, OptimizerSettings(),
                      num_labels=3)
        self.token = conn.request(hello.to_message()).meta["token"]
        self.conn, self.client, self.rid = conn, client, 1000

    def send(self, op: str, step: int = 0, tensors: dict | None = None, **meta) -> int:
        self.rid += 1
        msg = Message(op, self.client, step, meta={"token": self.token, "rid": self.rid, **meta}, tensors=tensors or {})
        self.conn.socket.send_multipart(encode(msg), copy=False)
        return self.rid

    def forward(self, batch: int, length: int, step: int = 0, train: bool = False) -> int:
        return self.send("forward", step, {"hidden": torch.randn(batch, length, WIDTH),
                                           "attention_mask": torch.ones(batch, length, dtype=torch.uint8)},
                         train=train)

    def receive(self, timeout: float = 120.0) -> Message:
        assert self.conn.socket.poll(int(timeout * 1000)), "no reply"
        return decode(self.conn.socket.recv_multipart())

    def request(self, op: str, **kw) -> tuple[Message, float]:
        start = time.perf_counter()
        rid = self.send(op, **kw)
        reply = self.receive()
        assert reply.meta["rid"] == rid
        return reply, time.perf_counter() - start

    def close(self) -> None:
        self.conn.close()


def timed_status(endpoint: str) -> float:
    conn = Connection(endpoint, "probe", timeout=120)
    try:
        start = time.perf_counter()
        conn.request(Message("status"))
        return time.perf_counter() - start
    finally:
        conn.close()


# ---------------------------------------------------------------- the scheduler itself


def test_the_scheduler_serves_connections_in_turn_and_bounds_each_queue():
    turns = Scheduler(max_queued=3)
    assert all(turns.put("a", f"a{i}") for i in range(3))
    assert not turns.put("a", "a3")  # a's queue is full
    assert turns.put("b", "b0") and turns.put("c", "c0") and turns.put("b", "b1")
    order = [turns.take(0) for _ in range(6)]
    assert order == ["a0", "b0", "c0", "a1", "b1", "a2"]
    assert turns.take(0.01) is None and not turns.busy("a")
    turns.close()
    assert turns.closed


# ---------------------------------------------------------------- a responsive loop


def test_status_and_ping_answer_while_a_long_forward_runs(tiny_models):
    path = tiny_models("bert")
    with threaded_server(path, "1,1", num_labels=3) as (endpoint, server):
        server.compute.max_tokens = BIG
        heavy, pinger = Raw(endpoint, path, "heavy"), Raw(endpoint, path, "pinger")
        try:
            start = time.perf_counter()
            heavy.forward(*HEAVY)
            waits = []
            while not heavy.conn.socket.poll(0):
                waits.append(timed_status(endpoint))
                reply, spent = pinger.request("ping")
                assert reply.op == "ok"
                waits.append(spent)
                time.sleep(0.02)
            assert heavy.receive().op == "ok"
            duration = time.perf_counter() - start
            print(f"a {HEAVY[0]} x {HEAVY[1]} eval forward took {duration:.2f} s; {len(waits)} status and ping "
                  f"answers meanwhile, the slowest in {max(waits) * 1000:.0f} ms")
            assert len(waits) >= 4
            assert max(waits) < duration / 4
            # ping refreshes only a session the caller holds.
            stranger = Connection(endpoint, "pinger", timeout=10)
            with pytest.raises(Exception, match="no session for client 'pinger' with this token"):
                stranger.request(Message("ping"))
            stranger.close()
        finally:
            heavy.close()
            pinger.close()


def test_a_large_header_is_decoded_in_its_turn_not_by_the_loop(tiny_models):
    path = tiny_models("bert")
    # Nearly a MiB of empty lists, under the header limit and, here, the item
    # limit: validating it takes a while.
    header = msgpack.packb({"v": 1, "op": "status", "client": "", "step": 0, "meta": {"x": [[]] * (15 << 16)},
                            "tensors": []})
    with threaded_server(path, "1,1", num_labels=3, limits=Limits(max_header_items=1 << 21)) as (endpoint, _):
        slow = dealer(endpoint)
        try:
            start = time.perf_counter()
            slow.send_multipart([header])
            time.sleep(0.05)
            waits = []
            while not slow.poll(0):
                waits.append(timed_status(endpoint))
            assert decode(slow.recv_multipart()).op == "ok"
            duration = time.perf_counter() - start
        finally:
            slow.close()
    print(f"a {len(header) / 1e6:.1f} MB header took {duration:.2f} s to answer; status meanwhile within "
          f"{max(waits) * 1000:.0f} ms ({len(waits)} answers)")
    # The loop answered all along: never held for as long as half the decode.
    assert len(waits) >= 3
    assert max(waits) < duration / 2


def test_a_light_clients_steps_interleave_with_a_heavy_clients_forwards(tiny_models):
    path = tiny_models("bert")
    with threaded_server(path, "1,1", num_labels=3) as (endpoint, server):
        server.compute.max_tokens = BIG
        heavy = Raw(endpoint, path, "heavy")
        light = SplitClient(ClientConfig(server=endpoint, model=str(path), num_labels=3, timeout=120))
        durations = []

        def hammer():
            for _ in range(3):
                durations.append(heavy.request("forward", tensors={
                    "hidden": torch.randn(*HEAVY, WIDTH), "attention_mask": torch.ones(*HEAVY, dtype=torch.uint8)},
                    train=False)[1])

        try:
            thread = threading.Thread(target=hammer)
            thread.start()
            steps, step_times = 0, []
            while thread.is_alive():
                start = time.perf_counter()
                light.train_step(random_batch(steps, VOCAB))
                step_times.append(time.perf_counter() - start)
                steps += 1
            thread.join()
            print(f"heavy forwards {[f'{d:.2f}' for d in durations]} s; the light client took {steps} steps "
                  f"meanwhile, the slowest in {max(step_times):.2f} s")
            # Each light step (a forward and a backward) waits for at most one heavy turn.
            assert steps >= 2
            assert max(step_times) < 2.5 * max(durations)
        finally:
            light.close()
            heavy.close()


# ---------------------------------------------------------------- fairness


def test_a_flooding_client_delays_another_by_about_one_turn(tiny_models):
    path = tiny_models("bert")
    with threaded_server(path, "1,1", num_labels=3) as (endpoint, server):
        server.compute.max_tokens = BIG
        started = []  # (client, when) of each forward the server starts
        run_forward = server.compute.forward

        def watched(session, *args):
            started.append((session.client, time.perf_counter()))
            return run_forward(session, *args)

        server.compute.forward = watched
        flood, other = Raw(endpoint, path, "flood"), Raw(endpoint, path, "other")
        try:
            for _ in range(8):
                flood.forward(1024, 64)
            time.sleep(0.3)  # the flood arrives and waits its turns
            sent = time.perf_counter()
            mine = other.forward(2, 8)
            assert other.receive().meta["rid"] == mine
            waited = time.perf_counter() - sent
            assert all(flood.receive().op == "ok" for _ in range(8))
            total = time.perf_counter() - sent
            turn = next(t for client, t in started if client == "other")
            ahead = sum(1 for client, t in started if client == "flood" and sent < t < turn)
            behind = sum(1 for client, t in started if client == "flood" and t > turn)
            print(f"the other client waited {waited:.2f} s: {ahead} of the flood's forwards started after it asked "
                  f"and before it ran, {behind} after it (the flood took {total:.2f} s from then on)")
            assert ahead <= 2 and behind >= 3
            assert waited < total / 2
        finally:
            flood.close()
            other.close()


def test_a_connection_queueing_beyond_its_limit_gets_busy_and_the_rest_is_served(tiny_models):
    path = tiny_models("bert")
    with threaded_server(path, "1,1", num_labels=3, max_queued=3) as (endpoint, server):
        server.compute.max_tokens = BIG
        flood = Raw(endpoint, path, "flood")
        try:
            for _ in range(12):
                flood.forward(512, 64)
            replies = [flood.receive() for _ in range(12)]
            busy = [r for r in replies if r.op == "error"]
            print(f"12 forwards at once, 3 may queue: {12 - len(busy)} served, {len(busy)} busy")
            assert busy and all(r.meta["code"] == "busy" and "(--max-queued)" in r.meta["error"] for r in busy)
            assert 12 - len(busy) >= 4  # the running one and a full queue at least
            assert flood.request("ping")[0].op == "ok"
        finally:
            flood.close()


# ---------------------------------------------------------------- expiry


def test_expiry_spares_sessions_whose_work_waits_or_just_ran(tiny_models):
    path = tiny_models("bert")
    with threaded_server(path, "1,1", num_labels=3) as (endpoint, server):
        server.compute.max_tokens = BIG
        heavy, light = Raw(endpoint, path, "heavy"), Raw(endpoint, path, "light")
        try:
            duration = heavy.request("forward", tensors={
                "hidden": torch.randn(*HEAVY, WIDTH), "attention_mask": torch.ones(*HEAVY, dtype=torch.uint8)},
                train=False)[1]
            started = threading.Event()
            run_forward = server.compute.forward

            def watched(session, *args):
                if session.client == "heavy":
                    started.set()
                return run_forward(session, *args)

            server.compute.forward = watched
            # Sessions now expire after a third of a heavy forward: light's forward waits
            # longer than that behind heavy's, and heavy's own takes longer.
            light.request("ping")
            server.sessions.timeout = duration / 3
            heavy.forward(*HEAVY)
            assert started.wait(30)
            light.forward(2, 8, step=0, train=True)
            assert heavy.receive().op == "ok"
            reply = light.receive()
            assert reply.op == "ok", reply.meta
            assert heavy.request("ping")[0].op == "ok"
            assert light.request("backward", step=0, tensors={"grad": torch.randn(2, 8, WIDTH)})[0].op == "ok"
            server.sessions.timeout = 120.0
            print(f"sessions expiring after {duration / 3:.2f} s survived a {duration:.2f} s forward ahead of them")
        finally:
            heavy.close()
            light.close()


def test_a_failing_compute_thread_stops_the_server_with_its_error(tiny_models):
    server = BackboneServer(ServerConfig(model=str(tiny_models("bert")), cut=Cut(1, 1), num_labels=3,
                                         bind="tcp://127.0.0.1:*"))
    server.bind()

    def broken_tick():
        raise OSError("no space left on device")

    server.tick = broken_tick
    try:
        with pytest.raises(RuntimeError, match="compute thread stopped") as stopped:
            server.serve(poll_ms=20)
        assert "no space left" in str(stopped.value.__cause__)
    finally:
        server.socket.close(linger=0)


# ---------------------------------------------------------------- idle connections


def _low_open_files():
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="file-descriptor limits as Linux sets them")
def test_1100_idle_connections_do_not_lock_a_new_client_out(tiny_models):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 4096:
        pytest.skip(f"the hard limit on open files is {hard}: too low to show the soft limit being raised")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))  # this process opens the 1100
    path = tiny_models("bert")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    # Started as under a login shell's usual soft limit of 1024 open files.
    proc = subprocess.Popen(fedsplit_command("server", "--model", str(path), "--num-labels", "3", "--bind", endpoint),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(),
                            preexec_fn=_low_open_files)
    # Idle peers that complete the ZeroMQ handshake and answer heartbeats: neither
    # the handshake timeout nor heartbeats close them, so only a higher limit helps.
    context = zmq.Context()
    context.set(zmq.MAX_SOCKETS, 2048)
    idle = []
    try:
        wait_ready(endpoint, proc)
        for _ in range(1100):
            peer = context.socket(zmq.DEALER)
            peer.setsockopt(zmq.LINGER, 0)
            peer.connect(endpoint)
            idle.append(peer)
        time.sleep(2.0)  # they connect in the background
        client = SplitClient(ClientConfig(server=endpoint, model=str(path), num_labels=3, connect_timeout=20,
                                          timeout=20))
        try:
            assert client.train_step(random_batch(0, VOCAB)) > 0
        finally:
            client.close()
    finally:
        for peer in idle:
            peer.close()
        context.term()
        stop(proc)
