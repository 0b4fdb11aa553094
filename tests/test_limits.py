"""What one client may ask of the server: the rank of its LoRA, the tokens of a
forward, sessions, forwards waiting for their backward and the memory they
hold, the size of a header and of a frame; and that a refused hello leaves
nothing behind. Each refusal says what was wrong, with the code "refused"
(the request itself is out of bounds) or "busy" (a load that may pass)."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap
import time

import msgpack
import psutil
import pytest
import torch
import zmq

from conftest import VOCAB, dealer, random_batch, status, threaded_server
from edge.client import ClientConfig, SplitClient
from server.service import BackboneServer, ServerConfig, gc_paused
from split.launch import child_env
from split.lora import LoraSpec
from split.partition import Cut, load_config, resolve_model_path
from split.protocol import Hello, ModelInfo, OptimizerSettings
from split.wire import Limits, Message, decode, encode

WIDTH = 32  # the tiny models' hidden size


def make_server(path, **config) -> BackboneServer:
    return BackboneServer(ServerConfig(model=str(path), cut=Cut(1, 1), num_labels=3, **config))


def hello(path, client: str, spec: LoraSpec = LoraSpec(4, 8.0), cut: Cut | None = None, num_labels: int = 3) -> list:
    cfg = load_config(path, "classification", num_labels, True)
    msg = Hello(ModelInfo.of(path, cfg), spec, "classification", 0, cut, OptimizerSettings(),
                num_labels=num_labels).to_message()
    msg.client = client
    return encode(msg)


def open_session(server: BackboneServer, path, client: str) -> str:
    reply = server.handle(b"conn", hello(path, client))
    assert reply.op == "ok", reply.meta
    return reply.meta["token"]


def forward(client: str, token: str, step: int, batch: int, length: int, train: bool = True) -> list:
    return encode(Message("forward", client, step, meta={"token": token, "train": train},
                          tensors={"hidden": torch.randn(batch, length, WIDTH),
                                   "attention_mask": torch.ones(batch, length, dtype=torch.uint8)}))


def backward(client: str, token: str, step: int, batch: int, length: int) -> list:
    return encode(Message("backward", client, step, meta={"token": token},
                          tensors={"grad": torch.randn(batch, length, WIDTH)}))


def refusal(reply: Message, code: str, text: str) -> None:
    assert reply.op == "error", reply.meta
    assert reply.meta["code"] == code, reply.meta
    assert text in reply.meta["error"], reply.meta["error"]


def lora_entries(server: BackboneServer) -> int:
    """Adapters summed over the LoRA layers: a leaked partial adapter shows here."""
    return sum(len(m.lora_A) for m in server.sessions.model.modules() if hasattr(m, "lora_A"))


def parameters(server: BackboneServer) -> int:
    return sum(p.numel() for p in server.sessions.model.parameters())


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def median_seconds(fn, times: int = 5) -> float:
    spent = []
    for _ in range(times):
        start = time.perf_counter()
        fn()
        spent.append(time.perf_counter() - start)
    return sorted(spent)[times // 2]


# ---------------------------------------------------------------- rank


def test_a_rank_50000_hello_is_refused_before_anything_is_allocated():
    # MiniLM: before this limit, the hello built a 1.2 GB adapter.
    path = resolve_model_path(None)
    server = BackboneServer(ServerConfig(model=str(path), cut=Cut(1, 1)))
    good = iter(range(100))

    def good_hello():
        reply = server.handle(b"conn", hello(path, f"good{next(good)}", num_labels=2))
        assert reply.op == "ok", reply.meta
        server.sessions.drop(reply.client)

    usual = median_seconds(good_hello, 3)
    entries, before = lora_entries(server), rss()
    start = time.perf_counter()
    reply = server.handle(b"conn", hello(path, "greedy", LoraSpec(50_000, 16.0), num_labels=2))
    spent = time.perf_counter() - start
    grown = rss() - before
    print(f"rank 50000 hello refused in {spent * 1000:.1f} ms (a rank-4 hello takes {usual * 1000:.1f} ms); "
          f"RSS grew {grown / 1e6:.1f} MB")
    refusal(reply, "refused", "LoRA rank 50000 exceeds this server's limit of 256 (--max-rank)")
    assert lora_entries(server) == entries and not server.sessions.by_client
    assert grown < 50e6
    assert spent < 3 * usual


def test_a_rank_above_a_modules_smaller_dimension_is_refused(tiny_models):
    path = tiny_models("bert")
    server = make_server(path)
    reply = server.handle(b"conn", hello(path, "wide", LoraSpec(WIDTH + 1, 8.0)))
    refusal(reply, "refused", f"LoRA rank {WIDTH + 1} exceeds the smaller dimension of")
    assert f"at most {WIDTH}" in reply.meta["error"]
    assert server.handle(b"conn", hello(path, "fits", LoraSpec(WIDTH, 8.0))).op == "ok"


def test_too_many_lora_targets_are_refused_before_any_matching(tiny_models):
    path = tiny_models("bert")
    server = make_server(path)
    targets = tuple(f"module{i}" for i in range(10_000)) + ("query",)
    reply = server.handle(b"conn", hello(path, "many", LoraSpec(4, 8.0, 0.0, targets)))
    refusal(reply, "malformed", "at most 64 LoRA targets")


# ---------------------------------------------------------------- a refused hello leaves nothing


def test_300_refused_hellos_leave_no_adapter_and_hello_stays_as_fast(tiny_models):
    path = tiny_models("bert")
    server = make_server(path)
    open_session(server, path, "resident")
    kinds = [  # (spec, cut, what the refusal says)
        (LoraSpec(4, 8.0, 0.0, ("query", "LayerNorm")), None, "is a LayerNorm, not a linear layer"),
        (LoraSpec(4, 8.0, 0.0, ("value", "output")), None, "is a BertSelfOutput, not a linear layer"),
        (LoraSpec(4, 8.0, 0.0, ("nothing",)), None, "match no module"),
        (LoraSpec(WIDTH + 8, 8.0), None, "exceeds the smaller dimension"),
        (LoraSpec(300, 8.0), None, "exceeds this server's limit"),
        (LoraSpec(4, 8.0), Cut(0, 1), "bad cut"),
    ]
    counter = iter(range(10_000))

    def good_hello():
        reply = server.handle(b"conn", hello(path, f"good{next(counter)}"))
        assert reply.op == "ok", reply.meta
        server.sessions.drop(reply.client)

    usual = median_seconds(good_hello)
    entries, params, before = lora_entries(server), parameters(server), rss()
    config = len(server.sessions.model.peft_config)
    replies = []
    for i in range(300):
        spec, cut, text = kinds[i % len(kinds)]
        replies.append((server.handle(b"conn", hello(path, f"refused{i}", spec, cut)), text))
    after = median_seconds(good_hello)
    grown = rss() - before
    print(f"after 300 refused hellos: LoRA entries {entries} -> {lora_entries(server)}, parameters {params} -> "
          f"{parameters(server)}, RSS +{grown / 1e6:.1f} MB, a good hello {usual * 1000:.1f} -> {after * 1000:.1f} ms")
    assert lora_entries(server) == entries
    assert parameters(server) == params
    assert len(server.sessions.model.peft_config) == config
    assert set(server.sessions.by_client) == {"resident"}
    assert grown < 50e6
    assert after < 3 * usual
    for reply, text in replies:
        refusal(reply, "refused", text)


# ---------------------------------------------------------------- tokens per request


def test_a_forward_over_the_token_limit_or_the_models_positions_is_refused(tiny_models):
    path = tiny_models("bert")  # 72 positions
    server = make_server(path)
    server.compute.max_tokens = 256
    token = open_session(server, path, "c")
    refusal(server.handle(b"conn", forward("c", token, 0, 8, 40, train=False)), "refused",
            "a forward of 8 x 40 = 320 tokens exceeds the server's limit of 256 tokens per request (--max-tokens)")
    refusal(server.handle(b"conn", forward("c", token, 0, 1, 80, train=False)), "refused",
            "sequences of 80 tokens exceed the model's 72 positions")
    assert server.handle(b"conn", forward("c", token, 0, 4, 64)).op == "ok"
    assert server.sessions.status()["pending"] == 1


# ---------------------------------------------------------------- sessions


def test_sessions_beyond_the_limit_are_busy_until_one_leaves(tiny_models):
    path = tiny_models("bert")
    server = make_server(path)
    server.sessions.max_sessions = 2
    token_a = open_session(server, path, "a")
    open_session(server, path, "b")
    entries = lora_entries(server)
    refusal(server.handle(b"conn", hello(path, "c")), "busy", "holds its limit of 2 sessions (--max-sessions)")
    assert lora_entries(server) == entries
    # Registering again replaces a session: no room is needed for it.
    again = encode(Message("hello", "a", meta={**decode(hello(path, "a")).meta, "token": token_a}))
    assert server.handle(b"conn", again).op == "ok"
    server.sessions.drop("b")
    assert server.handle(b"conn", hello(path, "c")).op == "ok"


# ---------------------------------------------------------------- waiting forwards


def test_forwards_beyond_the_pending_limit_are_busy_until_a_backward(tiny_models):
    path = tiny_models("bert")
    server = make_server(path, max_pending=2)
    token = open_session(server, path, "c")
    for step in range(2):
        assert server.handle(b"conn", forward("c", token, step, 2, 8)).op == "ok"
    refusal(server.handle(b"conn", forward("c", token, 2, 2, 8)), "busy", "(--max-pending)")
    assert server.handle(b"conn", backward("c", token, 0, 2, 8)).op == "ok"
    assert server.handle(b"conn", forward("c", token, 2, 2, 8)).op == "ok"
    assert server.sessions.status()["pending"] == 2


def test_the_pending_memory_budget_is_busy_until_a_backward_frees_it(tiny_models):
    path = tiny_models("bert")
    server = make_server(path, max_pending=16)
    token = open_session(server, path, "c")
    assert server.handle(b"conn", forward("c", token, 0, 16, 64)).op == "ok"
    one = server.sessions.pending.totals()[1]
    assert one > 1e6  # the graph of 16 x 64 tokens, measured
    server.handle(b"conn", backward("c", token, 0, 16, 64))
    assert server.sessions.status()["pending"] == 0 and server.sessions.pending.totals()[1] == 0

    # Room for one such graph and a half: the second waits for the first one's backward.
    server.sessions.pending.budget = int(1.5 * one)
    assert server.handle(b"conn", forward("c", token, 1, 16, 64)).op == "ok"
    refusal(server.handle(b"conn", forward("c", token, 2, 16, 64)), "busy", "(--max-pending-mb)")
    assert server.sessions.status()["pending"] == 1  # the refused graph was not kept
    assert server.handle(b"conn", backward("c", token, 1, 16, 64)).op == "ok"
    assert server.handle(b"conn", forward("c", token, 2, 16, 64)).op == "ok"
    # A forward whose graph alone is over the budget can never pass: refused, not busy.
    server.handle(b"conn", backward("c", token, 2, 16, 64))
    refusal(server.handle(b"conn", forward("c", token, 3, 32, 64)), "refused",
            "the server keeps for all waiting forwards (--max-pending-mb): send smaller batches")
    assert server.sessions.pending.totals() == (0, 0)


MEASURE_GRAPH = textwrap.dedent("""
    import gc, json, sys, psutil, torch
    sys.path.insert(0, sys.argv[2])
    from test_limits import backward, forward, make_server, open_session
    server = make_server(sys.argv[1], max_pending=16)
    token = open_session(server, sys.argv[1], "c")
    out = []
    for step, (batch, length) in enumerate([(2, 8), (64, 64), (256, 16), (32, 72)]):
        gc.collect()
        before = psutil.Process().memory_info().rss
        assert server.handle(b"conn", forward("c", token, step, batch, length)).op == "ok"
        gc.collect()
        grown = psutil.Process().memory_info().rss - before
        out.append({"tokens": batch * length, "rss": grown, "measured": server.sessions.pending.totals()[1]})
        server.handle(b"conn", backward("c", token, step, batch, length))
    print(json.dumps(out))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc options")
def test_the_measured_graph_size_matches_the_memory_it_holds(tiny_models, tmp_path):
    # With every allocation over 64 KiB mapped on its own, freed memory goes back
    # at once and RSS follows the live tensors: what the graph keeps after the forward.
    env = {**child_env(), "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    tests = str(__import__("pathlib").Path(__file__).parent)
    out = subprocess.run([sys.executable, "-c", MEASURE_GRAPH, str(tiny_models("bert")), tests], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    for row in rows[1:]:  # the first warms the allocator up
        print(f"{row['tokens']} tokens: graph measured {row['measured'] / 1e6:.1f} MB, "
              f"RSS grew {row['rss'] / 1e6:.1f} MB")
        assert 0.8 < row["measured"] / row["rss"] < 1.25, row


# ---------------------------------------------------------------- header and frame sizes


def test_a_header_over_the_limit_is_refused_without_decoding_it(tiny_models):
    path = tiny_models("bert")
    meta = {"x": [[] for _ in range(3 << 19)]}  # 1.5 MiB of empty lists: slow to validate, one by one
    header = msgpack.packb({"v": 1, "op": "status", "client": "", "step": 0, "meta": meta, "tensors": []})
    start = time.perf_counter()
    with gc_paused():  # the least it costs: with collections running it takes longer still
        decode([header], Limits(max_header_bytes=16 << 20, max_header_items=1 << 24))
    decoding = time.perf_counter() - start
    with threaded_server(path, "1,1", num_labels=3) as (endpoint, _):
        sock = dealer(endpoint)
        try:
            start = time.perf_counter()
            sock.send_multipart([header])
            assert sock.poll(30_000)
            reply = decode(sock.recv_multipart())
            spent = time.perf_counter() - start
        finally:
            sock.close()
    print(f"a {len(header) / 2**20:.1f} MiB header: refused in {spent * 1000:.0f} ms; validating it would take "
          f"{decoding:.2f} s")
    refusal(reply, "malformed", f"header of {len(header)} bytes exceeds the limit of {1 << 20}")
    assert spent < decoding / 4


def test_the_router_socket_limits_what_zeromq_buffers(tiny_models):
    path = tiny_models("bert")
    limits = Limits(max_tensor_bytes=64 << 10, max_message_bytes=64 << 10, max_header_bytes=32 << 10)
    with threaded_server(path, "1,1", num_labels=3, limits=limits, recv_hwm=5) as (endpoint, server):
        sock = server.socket
        assert sock.getsockopt(zmq.RCVHWM) == 5
        assert sock.getsockopt(zmq.MAXMSGSIZE) == 2 * (64 << 10)
        assert sock.getsockopt(zmq.HANDSHAKE_IVL) > 0 and sock.getsockopt(zmq.HEARTBEAT_IVL) > 0
        assert sock.getsockopt(zmq.HEARTBEAT_TIMEOUT) > 0

        seen = []
        admit = server._admit
        server._admit = lambda routing_id, frames, *rest, **kw: seen.append(frames) or admit(routing_id, frames,
                                                                                              *rest, **kw)
        big = dealer(endpoint)
        header = msgpack.packb({"v": 1, "op": "status", "client": "", "step": 0, "meta": {}, "tensors": []})
        try:
            # Over the wire's limit but within MAXMSGSIZE: read, and refused with the reason.
            padded = msgpack.packb({"v": 1, "op": "status", "client": "", "step": 0, "meta": {"pad": "x" * (40 << 10)},
                                    "tensors": []})
            big.send_multipart([padded])
            assert big.poll(10_000)
            assert f"exceeds the limit of {32 << 10}" in decode(big.recv_multipart()).meta["error"]
            # Over MAXMSGSIZE: ZeroMQ drops the connection; the server never sees the message.
            count = len(seen)
            big.send_multipart([header, bytes(3 * (64 << 10))])
            assert not big.poll(1500)
            assert len(seen) == count
        finally:
            big.close()
        assert status(endpoint)["sessions"] == 0  # everyone else is answered as before
        assert len(seen) == count + 1


# ---------------------------------------------------------------- options


def test_the_server_options_default_to_the_configs_limits_and_refuse_bad_values(tiny_models, capsys):
    from split.cli import build_parser

    args = build_parser().parse_args(["server"])
    config = ServerConfig.__dataclass_fields__
    for name in ("max_rank", "max_tokens", "max_sessions", "max_pending", "max_pending_mb", "max_queued",
                 "recv_hwm"):
        assert getattr(args, name) == config[name].default, name
    assert args.max_header_kb * 1024 == Limits().max_header_bytes
    for option in ("--max-rank", "--max-tokens", "--max-sessions", "--max-pending", "--max-pending-mb",
                   "--max-queued", "--max-header-kb", "--recv-hwm"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["server", option, "0"])
        assert f"argument {option}:" in capsys.readouterr().err
    server = make_server(tiny_models("bert"), max_rank=5, max_tokens=6, max_sessions=7, max_pending_mb=8.0)
    assert (server.sessions.max_rank, server.compute.max_tokens, server.sessions.max_sessions) == (5, 6, 7)
    assert server.sessions.pending.budget == 8 << 20
    with pytest.raises(ValueError, match="max_sessions must be an integer >= 1"):
        ServerConfig(max_sessions=0)
    with pytest.raises(ValueError, match="max_pending_mb must be > 0"):
        ServerConfig(max_pending_mb=float("nan"))


def test_a_client_within_the_limits_trains_as_before(tiny_models):
    path = tiny_models("bert")
    with threaded_server(path, "1,1", num_labels=3, max_tokens=64, max_sessions=1) as (endpoint, _):
        client = SplitClient(ClientConfig(server=endpoint, model=str(path), num_labels=3, timeout=30))
        try:
            losses = [client.train_step(random_batch(i, VOCAB, batch=4, max_len=12)) for i in range(3)]
            assert all(torch.isfinite(torch.tensor(losses)))
        finally:
            client.close()


def test_a_message_of_too_many_frames_is_refused_without_keeping_them(tiny_models):
    path = tiny_models("bert")
    with threaded_server(path, "1,1", num_labels=3, limits=Limits(max_tensors=16)) as (endpoint, server):
        sock = dealer(endpoint)
        try:
            header = msgpack.packb({"v": 1, "op": "status", "client": "", "step": 0, "meta": {}, "tensors": []})
            sock.send_multipart([header] + [b""] * 5000)
            assert sock.poll(30_000)
            reply = decode(sock.recv_multipart())
        finally:
            sock.close()
        assert reply.op == "error" and reply.meta["code"] == "malformed"
        assert "a message of 5001 frames exceeds the limit of 17" in reply.meta["error"]
        assert status(endpoint)["sessions"] == 0  # the server answers on
