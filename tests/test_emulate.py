"""Device emulation (edge/emulate.py): the link's delays measured on real
messages, time dilation of compute stretches, the memory budget, and the
`fedsplit client --emulate` command."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace

import pytest
import torch

from conftest import random_batch, save_tiny_with_tokenizer, threaded_server
from edge.client import ClientConfig, SplitClient
from edge.emulate import GIB, EmulatedDevice, MemoryBudgetExceeded, link_seconds
from edge.meter import current_rss, peak_rss, reset_peak
from profiles.schema import FIGURES, DeviceProfile, profile_to_toml
from split.cli import main
from split.transport import Connection
from split.wire import Message

HOST = 100.0  # a fake host speed (GFLOP/s): dilation factors are set exactly, not measured


def profile(name="test-device", memory_gb=64.0, gflops=HOST, uplink=1e4, downlink=1e4, rtt=0.0) -> DeviceProfile:
    """A custom device; the defaults impose nothing (host speed, a fast link, a large budget)."""
    return DeviceProfile(name=name, memory_gb=memory_gb, gflops_fp32=gflops, gflops_fp16=None, accelerator="cpu",
                         uplink_mbps=uplink, downlink_mbps=downlink, rtt_ms=rtt, bitsandbytes=False,
                         sources={k: "a test's figure" for k in FIGURES if k != "gflops_fp16"})


SLOW_LINK = dict(uplink=8.0, downlink=4.0, rtt=40.0)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny BERT with the built-in tokenizer (the CLI client tokenizes)."""
    return save_tiny_with_tokenizer("bert", tmp_path_factory.mktemp("emulate-bert"))


def spin(seconds: float) -> None:
    """Busy the CPU for ``seconds`` of wall-clock: a compute stretch of known length."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def implied(sent: int, received: int, messages: int, p: DeviceProfile) -> float:
    """The link time the profile implies for ``messages`` request/reply pairs of these byte totals."""
    return sent * 8 / (p.uplink_mbps * 1e6) + received * 8 / (p.downlink_mbps * 1e6) + messages * p.rtt_ms / 1000


def test_link_seconds():
    # 1 MB at 8 Mbit/s is 1 s; half the round trip each way.
    assert link_seconds(1_000_000, 8.0, 40.0) == pytest.approx(1.02)
    assert link_seconds(0, 8.0, 0.0) == 0


def alternating(conn: Connection, emulator: EmulatedDevice, send, n: int) -> tuple[float, float, int, int]:
    """``send()`` ``n`` times plain and ``n`` times through the emulated link,
    alternating (so a change in the machine's load falls on both alike).
    Returns the plain and the emulated seconds and the bytes the emulated
    ones sent and received."""
    plain = slow = 0.0
    sent = received = 0
    for _ in range(n):
        conn.shaper = None
        start = time.perf_counter()
        send()
        plain += time.perf_counter() - start
        conn.shaper = emulator
        before = conn.bytes_sent, conn.bytes_received
        start = time.perf_counter()
        send()
        slow += time.perf_counter() - start
        sent, received = sent + conn.bytes_sent - before[0], received + conn.bytes_received - before[1]
    conn.shaper = None
    return plain, slow, sent, received


def test_link_delays_on_real_messages_match_the_profile(model, capsys):
    """Status requests (RTT-bound) and forward requests of a 16x48x32 hidden
    state (bandwidth-bound) against a real server: the time the emulated link
    adds is within 10% of what 8 Mbit/s up, 4 down and 40 ms RTT imply."""
    p = profile(**SLOW_LINK)
    batch = random_batch(0, 96, batch=16, max_len=48)
    with threaded_server(model, "1,1") as (endpoint, _):
        conn = Connection(endpoint, "probe", timeout=10.0)
        try:
            conn.request(Message("status"))  # connected
            emulator = EmulatedDevice(p, HOST)
            plain, slow, sent, received = alternating(conn, emulator, lambda: conn.request(Message("status")), 10)
        finally:
            conn.close()
        status_implied = implied(sent, received, 10, p)
        assert emulator.network_s == pytest.approx(status_implied)
        status_measured = slow - plain

        client = SplitClient(ClientConfig(server=endpoint, model=str(model), num_labels=3, reconnect_for=0))
        try:
            client.predict(batch)  # warm-up: the first forward builds caches on both sides
            emulator = EmulatedDevice(p, HOST)
            plain, slow, sent, received = alternating(client.conn, emulator, lambda: client.predict(batch), 3)
        finally:
            client.close(say_bye=False)
        forward_implied = implied(sent, received, 3, p)
        forward_measured = slow - plain
    assert sent > 3 * 16 * 48 * 32 * 4 and received > 3 * 16 * 48 * 32 * 4  # the hidden states crossed the link
    with capsys.disabled():
        print(f"\nemulated link, status x10: measured {status_measured:.3f}s, implied {status_implied:.3f}s; "
              f"forward x3 ({sent} B up, {received} B down): measured {forward_measured:.3f}s, "
              f"implied {forward_implied:.3f}s")
    assert status_measured == pytest.approx(status_implied, rel=0.1)
    assert forward_measured == pytest.approx(forward_implied, rel=0.1)


def test_a_compute_stretch_lasts_slowdown_times_as_long():
    emulator = EmulatedDevice(profile(gflops=HOST / 4), HOST)
    assert emulator.slowdown == 4
    start = time.perf_counter()
    with emulator.computing("a stretch"):
        spin(0.15)
    elapsed = time.perf_counter() - start
    assert elapsed == pytest.approx(0.6, rel=0.1)
    assert emulator.host_compute_s == pytest.approx(0.15, rel=0.1)
    assert emulator.compute_s == pytest.approx(4 * emulator.host_compute_s)
    assert emulator.slept_s == pytest.approx(3 * emulator.host_compute_s, rel=0.1)


def test_messages_split_stretches_and_are_not_dilated(model):
    """A block of two 100 ms stretches around a real request: the stretches are
    dilated 4x, the request's own time is not."""
    with threaded_server(model, "1,1") as (endpoint, _):
        conn = Connection(endpoint, "probe", timeout=10.0)
        try:
            times = []
            for _ in range(3):  # the connection warmed up, and a plain request timed
                start = time.perf_counter()
                conn.request(Message("status"))
                times.append(time.perf_counter() - start)
            plain = sorted(times)[1]
            emulator = EmulatedDevice(profile(gflops=HOST / 4), HOST)
            conn.shaper = emulator
            start = time.perf_counter()
            with emulator.computing("a block"):
                spin(0.1)
                conn.request(Message("status"))
                spin(0.1)
            elapsed = time.perf_counter() - start
        finally:
            conn.close()
    assert elapsed == pytest.approx(4 * 0.2 + plain, rel=0.1)
    assert emulator.host_compute_s == pytest.approx(0.2, rel=0.1)


def test_a_training_step_is_three_dilated_stretches(model):
    """A real U-shaped training step is three compute stretches (the bottom
    forward; the top forward and backward; the bottom backward and the
    optimizer step), an evaluation batch two; each sleeps 3x its length
    (slowdown 4), never less (a late wake-up only lengthens it)."""
    with threaded_server(model, "1,1") as (endpoint, _):
        emulator = EmulatedDevice(profile(gflops=HOST / 4), HOST)
        client = SplitClient(ClientConfig(server=endpoint, model=str(model), num_labels=3, reconnect_for=0),
                             emulator)
        try:
            start = time.perf_counter()
            client.train_step(random_batch(1, 96, batch=8, max_len=24))
            elapsed = time.perf_counter() - start
            assert emulator.stretches == 3
            assert elapsed >= emulator.compute_s  # the step lasted its compute on the device, at least
            client.predict(random_batch(2, 96, batch=8, max_len=24))
            assert emulator.stretches == 5
        finally:
            client.close()
    assert emulator.host_compute_s > 0
    assert emulator.slept_s >= 3 * emulator.host_compute_s * (1 - 1e-9)
    assert emulator.compute_s == pytest.approx(4 * emulator.host_compute_s)


def test_a_device_faster_than_the_host_warns_and_runs_at_host_speed(caplog):
    with caplog.at_level(logging.WARNING, logger="edge.emulate"):
        emulator = EmulatedDevice(profile(name="fast-board", gflops=HOST * 10), HOST)
    assert "cannot emulate a device faster than this host" in caplog.text and "fast-board" in caplog.text
    assert emulator.slowdown == 1
    with emulator.computing("a stretch"):
        spin(0.02)
    assert emulator.slept_s == 0


def test_a_cpu_device_is_not_emulated_on_a_gpu():
    with pytest.raises(ValueError, match="without a GPU.*--device cpu"):
        EmulatedDevice(profile(), HOST, device="cuda")


def test_exceeding_the_budget_after_a_block_names_budget_and_peak():
    reset_peak()  # where it cannot, the budget still starts above the peak so far
    budget = (max(current_rss(), peak_rss()) + 100 * (1 << 20)) / GIB
    emulator = EmulatedDevice(profile(name="small-board", memory_gb=budget), HOST)
    with emulator.computing("a small block"):
        small = torch.ones(1 << 20)  # 4 MiB
    del small
    with pytest.raises(MemoryBudgetExceeded) as info:
        with emulator.computing("a big block"):
            big = torch.ones(48 << 20)  # 192 MiB, touched
            del big
    text = str(info.value)
    assert "'small-board'" in text and f"{budget:g} GiB" in text
    assert "peak RSS" in text and "after a big block" in text
    assert emulator.peak_bytes > emulator.budget_bytes


def test_on_cuda_the_budget_holds_the_gpu_memory_the_device_has(monkeypatch):
    """No GPU here: the meter's readings are stood in for, to check what is
    compared with the budget (a GPU's own memory, or a board's shared memory)."""
    monkeypatch.setattr("edge.emulate.peak_rss", lambda: 1 * GIB)
    monkeypatch.setattr("edge.emulate.cuda_peak", lambda device: 3 * GIB if device.type == "cuda" else None)
    board = replace(profile(name="board", memory_gb=3.5), accelerator="unified")
    workstation = replace(profile(name="ws", memory_gb=3.5), accelerator="cuda")
    assert EmulatedDevice(workstation, HOST, device="cuda").check_memory() == 3 * GIB
    with pytest.raises(MemoryBudgetExceeded, match=r"peak RSS 1.00 GiB \+ CUDA peak 3.00 GiB.*budget of 3.5 GiB"):
        EmulatedDevice(board, HOST, device="cuda").check_memory()
    assert EmulatedDevice(board, HOST).check_memory() == 1 * GIB  # a CPU client: its RSS


def client_args(endpoint, model, tmp_path, toml) -> list[str]:
    # Three labels: the tiny model's head has three.
    lines = [json.dumps({"text": f"{w} is a {'fruit' if i % 2 else 'colour'} word", "label": "abc"[i % 3]})
             for i, w in enumerate(["red", "apple", "blue", "pear", "green", "plum", "teal", "fig"] * 3)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    return ["client", "--server", endpoint, "--model", str(model), "--data", str(tmp_path / "train.jsonl"),
            "--steps", "2", "--batch-size", "4", "--max-length", "16", "--out", str(tmp_path / "adapter"),
            "--summary-json", str(tmp_path / "summary.json"), "--no-progress", "--reconnect-for", "0",
            "--emulate", str(toml)]


def test_cli_client_over_its_budget_exits_with_the_message(model, tmp_path, capsys):
    toml = tmp_path / "tiny.toml"
    toml.write_text(profile_to_toml(profile(name="tiny-board", memory_gb=0.01)))
    with threaded_server(model, "1,1") as (endpoint, _):
        code = main(client_args(endpoint, model, tmp_path, toml))
    err = capsys.readouterr().err
    assert code == 2
    assert "fedsplit client: error:" in err and "'tiny-board'" in err
    assert "budget of 0.01 GiB" in err and "peak RSS" in err and "after loading the model" in err
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "summary.json").exists()


def test_cli_client_reports_emulated_times(model, tmp_path, capsys):
    toml = tmp_path / "board.toml"
    toml.write_text(profile_to_toml(profile(name="board", gflops=1e6, uplink=100.0, downlink=100.0, rtt=10.0)))
    with threaded_server(model, "1,1") as (endpoint, _):
        code = main(client_args(endpoint, model, tmp_path, toml))
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "emulating board" in out.err and "emulated board:" in out.out
    emulation = json.loads((tmp_path / "summary.json").read_text())["emulation"]
    assert emulation["profile"] == "board" and emulation["slowdown"] == 1
    # hello, evaluation before and after, 2 steps of forward and backward, the adapter, bye: 10 ms RTT each
    assert emulation["network_s"] > 0.08
    assert emulation["wall_s"] >= emulation["network_s"] + emulation["host_compute_s"]
    assert 0 < emulation["peak_memory_bytes"] <= emulation["memory_budget_bytes"]
