"""Device emulation's modes for several clients on a shared machine
(edge/emulate.py, edge/emulate_cli.py): the CPU-time clock, the host's speed
given once, device-equivalent and training-only counters, evaluation left to
the host, and a memory budget that is only reported."""

from __future__ import annotations

import time

import pytest
import torch

from edge.emulate import GIB, Counters, EmulatedDevice, MemoryBudgetExceeded, host_speed
from edge.meter import current_rss, peak_rss
from profiles.schema import FIGURES, DeviceProfile
from split.cli import main

HOST = 100.0  # a fake host speed (GFLOP/s): dilation factors are set exactly


def profile(name="test-device", memory_gb=64.0, gflops=HOST, uplink=1e4, downlink=1e4, rtt=0.0) -> DeviceProfile:
    return DeviceProfile(name=name, memory_gb=memory_gb, gflops_fp32=gflops, gflops_fp16=None, accelerator="cpu",
                         uplink_mbps=uplink, downlink_mbps=downlink, rtt_ms=rtt, bitsandbytes=False,
                         sources={k: "a test's figure" for k in FIGURES if k != "gflops_fp16"})


def spin(seconds: float) -> None:
    """Busy this thread for ``seconds`` of its own CPU time."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_cpu_clock_counts_the_threads_work_not_its_waiting(one_thread):
    """Under the cpu clock a stretch is its thread's CPU time: 0.1 s of work and
    0.2 s asleep (a core taken by someone else) is 0.1 s on the host, 0.4 s on
    a device 4x slower, and the dilation tops the stretch up to those 0.4 s."""
    emulator = EmulatedDevice(profile(gflops=HOST / 4), HOST, clock="cpu")
    start = time.perf_counter()
    with emulator.computing("a stretch"):
        spin(0.1)
        time.sleep(0.2)
    elapsed = time.perf_counter() - start
    assert emulator.host_compute_s == pytest.approx(0.1, rel=0.15)
    assert emulator.compute_s == pytest.approx(4 * emulator.host_compute_s)
    assert elapsed == pytest.approx(4 * emulator.host_compute_s, rel=0.1)
    # The wall clock counts the sleep as compute, and dilates it.
    wall = EmulatedDevice(profile(gflops=HOST / 4), HOST)
    with wall.computing("a stretch"):
        time.sleep(0.05)
    assert wall.host_compute_s == pytest.approx(0.05, rel=0.3)


def test_the_cpu_clock_needs_one_thread_on_the_cpu():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(ValueError, match="--threads 1"):
            EmulatedDevice(profile(), HOST, clock="cpu")
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="clock must be one of wall, cpu"):
        EmulatedDevice(profile(), HOST, clock="sundial")


def test_host_speed_on_one_thread_by_cpu_time_leaves_the_thread_count_alone():
    threads = torch.get_num_threads()
    speed = host_speed(clock="cpu", seconds=0.1)
    assert speed > 0.1 and torch.get_num_threads() == threads
    with pytest.raises(ValueError, match="clock must be one of"):
        host_speed(clock="sundial")


def test_device_equivalent_compute_has_no_floor_at_the_hosts_speed(one_thread):
    """A device 4x faster than this host: the stretch runs at host speed (it
    cannot be sped up), but its device-equivalent time is a quarter of it."""
    emulator = EmulatedDevice(profile(gflops=HOST * 4), HOST, clock="cpu")
    with emulator.computing("a stretch"):
        spin(0.08)
    assert emulator.compute_s == emulator.host_compute_s
    assert emulator.device_compute_s == pytest.approx(emulator.host_compute_s / 4)


def test_training_steps_are_counted_apart_from_other_work(one_thread):
    """Compute and link delays inside a "training step" block count as
    training; a message outside any block (a poll) and an evaluation batch do not."""
    emulator = EmulatedDevice(profile(gflops=HOST / 2, uplink=8.0, downlink=8.0, rtt=10.0), HOST, clock="cpu")
    emulator.on_send(1000)  # a poll: 1 ms + 5 ms
    emulator.on_receive(1000)
    polls = emulator.counters()
    assert polls.network_s == pytest.approx(0.012) and polls.train_s == 0
    with emulator.computing("training step 1"):
        spin(0.02)
        emulator.on_send(10_000)  # 10 ms + 5 ms
        emulator.on_receive(10_000)
        spin(0.02)
    step = emulator.counters() - polls
    assert step.train_network_s == pytest.approx(0.03)
    assert step.train_compute_s == pytest.approx(step.device_compute_s) and step.device_compute_s > 0.06
    assert step.train_s == pytest.approx(step.busy_s)
    with emulator.computing("an evaluation batch"):
        spin(0.01)
    evaluation = emulator.counters() - polls - step
    assert evaluation.device_compute_s > 0 and evaluation.train_s == pytest.approx(0, abs=1e-12)
    assert Counters() - Counters() == Counters()


def test_evaluation_left_to_the_host_is_neither_dilated_nor_delayed_nor_counted(one_thread):
    emulator = EmulatedDevice(profile(gflops=HOST / 10, uplink=1.0, downlink=1.0, rtt=100.0), HOST, clock="cpu",
                              evaluation="host")
    start = time.perf_counter()
    with emulator.computing("an evaluation batch"):
        spin(0.05)
        emulator.on_send(100_000)  # 0.85 s on the device's link
        emulator.on_receive(100_000)
        spin(0.05)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5  # not 1 s of compute and 1.7 s of link
    assert emulator.counters() == Counters() and emulator.slept_s == 0
    assert emulator.eval_host_s == pytest.approx(0.1, rel=0.2)
    with emulator.computing("training step 1"):  # training is emulated as ever
        spin(0.01)
    assert emulator.train_compute_s > 0
    summary = emulator.summary()
    assert summary["evaluation"] == "host" and summary["eval_host_s"] == emulator.eval_host_s
    with pytest.raises(ValueError, match="evaluation must be one of device, host"):
        EmulatedDevice(profile(), HOST, evaluation="never")


def test_a_budget_that_is_only_reported_lets_the_client_go_on(caplog):
    below = (max(current_rss(), peak_rss()) / 2) / GIB  # a budget the process is over already
    reporting = EmulatedDevice(profile(name="tight-board", memory_gb=below), HOST, memory="report")
    with reporting.computing("a block"):
        pass
    assert "tight-board" in reporting.over_budget and "over its budget" in reporting.over_budget
    assert reporting.peak_bytes > reporting.budget_bytes
    assert "going on, as --emulate-memory report asks" in caplog.text
    summary = reporting.summary()
    assert summary["memory"] == "report" and summary["over_budget"] == reporting.over_budget
    enforcing = EmulatedDevice(profile(name="tight-board", memory_gb=below), HOST)
    with pytest.raises(MemoryBudgetExceeded, match="tight-board"):
        enforcing.check_memory()
    assert enforcing.over_budget is None
    with pytest.raises(ValueError, match="memory must be one of enforce, report"):
        EmulatedDevice(profile(), HOST, memory="ignore")


@pytest.mark.parametrize("argv, named", [
    (["--emulate-clock", "cpu"], "--emulate-clock"),
    (["--emulate-host-gflops", "50", "--emulate-memory", "report"], "--emulate-host-gflops, --emulate-memory"),
    (["--emulate-evaluation", "host"], "--emulate-evaluation"),
])
def test_emulation_options_without_emulate_are_refused_by_name(argv, named, capsys):
    assert main(["client", "--server", "tcp://127.0.0.1:9", *argv]) == 2
    err = capsys.readouterr().err
    assert f"{named} set(s) how a device is emulated: add --emulate PROFILE" in err


def test_a_bad_host_speed_is_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit):
        main(["client", "--emulate", "pi5", "--emulate-host-gflops", "0"])
    assert "--emulate-host-gflops: must be > 0" in capsys.readouterr().err


def test_each_round_record_carries_the_rounds_emulated_times(one_thread):
    """The observer reports what the emulator's counters moved since the
    previous record, under keys the server's record check accepts."""
    from edge.emulate_record import KEYS, emulated_rounds
    from split.records import check_record

    emulator = EmulatedDevice(profile(gflops=HOST / 2, uplink=8.0, downlink=8.0, rtt=0.0), HOST, clock="cpu")
    assert emulated_rounds(None) == []
    (observer,) = emulated_rounds(emulator)
    emulator.on_receive(10_000)  # the round's download: 10 ms
    with emulator.computing("training step 1"):
        spin(0.02)
        emulator.on_send(10_000)
        emulator.on_receive(10_000)
    first = observer.record_extra()
    assert set(first) == set(KEYS) and check_record(first) == first
    assert first["emulated_link_s"] == pytest.approx(0.03)
    assert first["emulated_train_s"] == pytest.approx(first["emulated_compute_s"] + 0.02)
    assert first["emulated_compute_s"] == pytest.approx(2 * emulator.host_compute_s)
    emulator.on_send(10_000)  # the upload, then the next round's polls: counted in the next record
    second = observer.record_extra()
    assert second == {"emulated_compute_s": 0.0, "emulated_link_s": pytest.approx(0.01), "emulated_train_s": 0.0}
