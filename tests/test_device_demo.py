"""``fedsplit demo --devices`` (edge/device_demo.py): its options, the plan it
makes, the commands it starts, and one short real run with two emulated
devices on a tiny model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from conftest import minilm_path, save_tiny
from edge.device_demo import (DeviceDemo, client_arguments, device_list, evaluator_index, make_plan,
                              server_arguments)
from profiles.schema import DEVICES_DIR, builtin_profiles, resolve_profile
from split.cli import build_parser, main


def test_devices_are_builtin_names_or_profile_files(tmp_path):
    assert device_list("laptop, pi5,jetson-nano") == ["laptop", "pi5", "jetson-nano"]
    custom = tmp_path / "board.toml"
    custom.write_text((DEVICES_DIR / "pi5.toml").read_text().replace('name = "Raspberry Pi 5 (8 GB)"',
                                                                     'name = "my board"'))
    assert device_list(f"laptop,{custom}") == ["laptop", str(custom)]


def test_an_unknown_device_is_refused_with_the_builtin_names(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--devices", "laptop,pi6"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown device profile 'pi6'" in err
    for name in builtin_profiles():
        assert name in err


@pytest.mark.parametrize("text, message", [
    ("pi5,pi5", "'pi5' and 'pi5' are the same device"),
    ("laptop,,pi5", "expected comma-separated device names"),
])
def test_a_device_list_twice_or_with_a_gap_is_refused(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        device_list(text)


def test_options_for_plain_demo_clients_are_refused_with_devices(capsys):
    assert main(["demo", "--devices", "laptop,pi5", "--clients", "3", "--rank", "4"]) == 2
    err = capsys.readouterr().err
    assert "--clients, --rank do(es) not apply with --devices" in err


def test_the_demo_defaults_depend_on_the_mode():
    args = build_parser().parse_args(["demo", "--devices", "laptop,pi5"])
    assert args.devices == ["laptop", "pi5"] and args.allocation == "fedpilot" and args.seq_len == 64
    assert args.rounds is None and args.local_steps is None and args.strategy is None  # resolved per mode
    from edge.device_demo import settings

    args.lr = args.head_lr = 1e-3
    demo = settings(args)
    assert (demo.strategy, demo.rounds, demo.local_steps) == ("layermean", 3, 5)
    assert demo.out.parent == Path("fedsplit-demo") and demo.out.name.startswith("devices-")


def test_the_plan_is_made_in_process_for_the_strategy(tmp_path, capsys):
    demo = DeviceDemo(devices=["laptop", "pi5", "jetson-nano"], out=tmp_path / "run", seq_len=32)
    plan = make_plan(demo, num_labels=10)
    printed = capsys.readouterr().out
    assert (tmp_path / "run" / "plan.json").is_file() and "fedsplit plan" in printed
    names = [resolve_profile(n).name for n in demo.devices]
    assert list(plan.clients) == names
    assert len({p.rank for p in plan.clients.values()}) == 1  # layermean trains one rank
    assert all(p.seq_len == 32 and (p.k1, p.k2) == (1, 1) for p in plan.clients.values())
    assert plan.same_rank


def test_an_impossible_plan_stops_the_demo_with_the_planners_reason(tmp_path, capsys):
    tiny = tmp_path / "tiny.toml"
    tiny.write_text((DEVICES_DIR / "pi4.toml").read_text().replace("memory_gb = 3.0", "memory_gb = 0.01")
                    .replace('name = "Raspberry Pi 4 (4 GB)"', 'name = "tiny board"'))
    demo = DeviceDemo(devices=["laptop", str(tiny)], out=tmp_path / "run")
    with pytest.raises(RuntimeError, match="planning failed"):
        make_plan(demo, num_labels=10)
    assert "device 'tiny board' cannot fit even the smallest plan" in capsys.readouterr().err


def test_the_fastest_link_evaluates():
    profiles = [resolve_profile(n) for n in ("pi5", "laptop", "agx-orin", "workstation")]
    assert profiles[evaluator_index(profiles)].name == "GPU workstation (24 GB GPU)"  # 940 Mbit/s, most GFLOP/s
    same_link = [resolve_profile(n) for n in ("jetson-nano", "orin-nano", "laptop")]
    assert same_link[evaluator_index(same_link)].name == "Jetson Orin Nano 8 GB"


def test_the_commands_the_demo_starts(tmp_path):
    demo = DeviceDemo(devices=["laptop", "jetson-nano"], out=tmp_path, rounds=2, local_steps=3)
    server = server_arguments(demo, 10, tmp_path / "server")
    for pair in (["--strategy", "layermean"], ["--allocation", "fedpilot"], ["--rounds", "2"], ["--min-clients", "2"],
                 ["--local-steps", "3"], ["--num-labels", "10"], ["--plan", str(tmp_path / "plan.json")],
                 ["--threads", "1"], ["--run-dir", str(tmp_path / "server")]):
        assert server[server.index(pair[0]) + 1] == pair[1]
    judge = client_arguments(demo, 0, "tcp://127.0.0.1:1", 80.0, evaluator=True)
    other = client_arguments(demo, 1, "tcp://127.0.0.1:1", 80.0, evaluator=False)
    for cmd, name in ((judge, "laptop"), (other, "jetson-nano")):
        assert cmd[cmd.index("--profile") + 1] == name and cmd[cmd.index("--emulate") + 1] == name
        for option, value in (("--emulate-clock", "cpu"), ("--threads", "1"), ("--emulate-host-gflops", "80.000"),
                              ("--emulate-evaluation", "host"), ("--emulate-memory", "enforce"),
                              ("--num-clients", "2")):
            assert cmd[cmd.index(option) + 1] == value
        # The plan decides these: a client given them as well would conflict with it.
        assert not {"--cut", "--rank", "--batch-size", "--max-length", "--blocks"} & set(cmd)
    assert "--eval-rounds" in judge and "--eval-rounds" not in other
    assert judge[judge.index("--client-index") + 1] == "0" and other[other.index("--client-index") + 1] == "1"


def test_the_round_log_names_the_blocks_each_client_was_allocated():
    """What the device demo's summary reads back (rounds.jsonl): each closed
    round's allocation, kept through a checkpoint's snapshot."""
    from round_helpers import CLIENT_MODULE, LAYOUT, FakeServer, payload
    from server.allocation import Resources
    from server.rounds import Coordinator, FederationConfig
    from server.strategies.base import ClientInfo

    coord = Coordinator(FederationConfig(min_clients=1, strategy="layermean", allocation="fedra", rounds=2),
                        FakeServer(), LAYOUT)
    coord.join("c0", ClientInfo("c0", 4, 8.0, None, 10), {CLIENT_MODULE: (6, 5)}, resources=Resources(capacity=2))
    coord.tick(0.0)
    assert coord.poll("c0").blocks == {0, 1}
    coord.upload("c0", payload(coord, "c0"))
    coord.tick(1.0)
    assert coord.history[0].allocation == {"c0": [0, 1]}
    resumed = Coordinator(FederationConfig(min_clients=1, strategy="layermean", allocation="fedra", rounds=2),
                          FakeServer(), LAYOUT)
    snap = coord.snapshot()
    resumed.restore({**snap, "history": json.loads(json.dumps(snap["history"]))})  # as a checkpoint holds it
    assert resumed.history[0].allocation == {"c0": [0, 1]}
    plain = Coordinator(FederationConfig(min_clients=1, strategy="layermean", rounds=1), FakeServer(), LAYOUT)
    plain.join("c0", ClientInfo("c0", 4, 8.0, None, 10), {CLIENT_MODULE: (6, 5)})
    plain.tick(0.0)
    plain.poll("c0")
    plain.upload("c0", payload(plain, "c0"))
    plain.tick(1.0)
    assert plain.history[0].allocation == {}  # no allocation: the clients train their own blocks


def tiny_for_the_builtin_task(folder: Path) -> Path:
    """A tiny BERT with the built-in MiniLM tokenizer and a head of the built-in task's 10 classes."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    tok.save_pretrained(folder)
    return save_tiny("bert", folder, vocab_size=len(tok), num_labels=10)


def test_a_short_device_demo_plans_runs_summarises_and_plots(tmp_path, capsys):
    """Two emulated devices, one round of two steps on a tiny BERT: the plan,
    the run folders, the per-device summary and the four plots."""
    model = tiny_for_the_builtin_task(tmp_path / "tiny")
    assert main(["demo", "--devices", "laptop,jetson-nano", "--rounds", "1", "--local-steps", "2", "--seq-len", "16",
                 "--model", str(model), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    (run,) = (tmp_path / "out").iterdir()
    assert (run / "plan.json").is_file() and (run / "server" / "rounds.jsonl").is_file()
    rows = {r["device"]: r for r in json.loads((run / "devices.json").read_text())}
    assert set(rows) == {"laptop", "jetson-nano"}
    for name, row in rows.items():
        assert row["steps"] == 2 and row["rank"] > 0 and row["batch"] > 0
        assert row["network_s"] > 0 and row["compute_s"] > 0 and row["server_s"] > 0
        assert 0 < row["peak_bytes"] <= row["budget_bytes"] == resolve_profile(name).memory_bytes
        assert row["bytes_up"] > 0 and row["bytes_down"] > 0
        assert row["blocks"].endswith(")")  # the round's allocated blocks, then the plan's capacity
    # The server's run folder holds both clients' records, with their emulated busy times.
    records = [json.loads(line) for line in (run / "server" / "clients.jsonl").read_text().splitlines()]
    assert sorted(r["client"] for r in records) == ["0-laptop", "1-jetson-nano"]
    assert all(r["emulated_link_s"] > 0 and r["emulated_train_s"] > 0 for r in records)
    # The laptop's link is as fast and its compute faster: it evaluates, at host speed.
    assert rows["laptop"]["accuracy"] is not None and rows["jetson-nano"]["accuracy"] is None
    # The Jetson Nano computes about 10x slower than the laptop: its device-equivalent compute says so.
    assert rows["jetson-nano"]["compute_s"] > 3 * rows["laptop"]["compute_s"]
    for plot in ("accuracy.png", "bytes.png", "memory.png", "time.png"):
        assert (run / plot).stat().st_size > 1000 and f"plot: {run / plot}" in printed
    assert "fedsplit device demo: layermean, fedpilot allocation" in printed


def test_a_failed_client_or_a_gone_server_stops_the_others_at_once():
    import subprocess
    import sys
    import time

    from edge.device_demo import _wait

    def proc(code: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", code])

    sleeper, server = proc("import time; time.sleep(60)"), proc("import time; time.sleep(60)")
    started = time.monotonic()
    try:
        assert _wait([proc("raise SystemExit(3)"), sleeper], server, timeout=60) == [3, None]
        assert time.monotonic() - started < 20 and sleeper.poll() is not None  # stopped, not waited for
        sleeper, gone = proc("import time; time.sleep(60)"), proc("raise SystemExit(1)")
        gone.wait()
        assert _wait([sleeper], gone, timeout=60) == [None] and sleeper.poll() is not None
        # A server that ended cleanly has finished: its clients may still write their summaries...
        done = proc("pass")
        done.wait()
        assert _wait([proc("import time; time.sleep(1)")], done, timeout=60) == [0]
        # ... within a grace period.
        sleeper = proc("import time; time.sleep(60)")
        assert _wait([sleeper], done, timeout=60, grace=1) == [None] and sleeper.poll() is not None
        assert _wait([proc("pass"), proc("pass")], server, timeout=60) == [0, 0]
    finally:
        for p in (sleeper, server):
            p.kill()
            p.wait()
