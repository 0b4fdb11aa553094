"""``fedsplit demo --devices laptop,orin-nano,pi5,jetson-nano``: a federated
session on this machine with one emulated client per device, planned by the
planner, ending with a per-device summary and the plots of ``fedsplit report``.

What it runs, in the output folder (``--out``):

1. ``plan.json``: ``fedsplit plan`` in-process for the devices, the model's
   config and the strategy (one that trains one rank gives every device the
   same rank);
2. a server with that plan (``--plan``), the strategy and the layer allocation;
3. one client per device, ``fedsplit client --profile NAME --emulate NAME``:
   it takes its cut, rank, batch and blocks from the plan and runs under the
   device's speed, link and memory budget. This host's speed is measured once
   here and handed to every client (clients measuring at the same moment
   would measure each other's load), and every process computes on one
   thread, timed by its CPU time (``--emulate-clock cpu``), so that sharing
   the cores does not slow the emulated devices down. The device with the
   fastest link evaluates the global model every round, at host speed
   (``--emulate-evaluation host``): a measurement of the demo, which would
   otherwise keep every device waiting for a test set sent over its link;
4. the summary table and the plots.

Every process's log, summary and run folder stay in the output folder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from profiles.schema import ProfileError, resolve_profile
from split.argtypes import int_at_least
from split.launch import child_env, fedsplit_command, free_port, start_server, stop

DEFAULT_ROUNDS = 3
DEFAULT_STEPS = 5
SERVER_CUT = "1,1"
PLAN_FILE = "plan.json"
MAX_RANK = 64  # the planner's default candidates: 4..64
CLIENT_TIMEOUT = 1800.0  # seconds a client may run before the demo gives up on it


def device_list(text: str) -> list[str]:
    """An argparse type: comma-separated device profiles (built-in names or
    .toml files), each listed once; an unknown name is an error listing the
    built-in ones."""
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated device names such as laptop,pi5, got {text!r}")
    seen = {}
    for name in names:
        try:
            profile = resolve_profile(name)
        except ProfileError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if profile.name in seen:
            raise argparse.ArgumentTypeError(f"{name!r} and {seen[profile.name]!r} are the same device "
                                             f"({profile.name}); each device gets one plan and one client: list "
                                             "it once")
        seen[profile.name] = name
    return names


def add_arguments(d: argparse.ArgumentParser) -> None:
    """The device demo's options of ``fedsplit demo``."""
    g = d.add_argument_group("device demo (--devices: one emulated client per device, planned)")
    g.add_argument("--devices", type=device_list, default=None, metavar="NAME,NAME,...",
                   help="device profiles, built-in names (jetson-nano, orin-nano, agx-orin, pi4, pi5, laptop, "
                        "workstation) or .toml files: one emulated client each, planned by the planner, with "
                        f"Fed-piLot layer allocation. With the defaults ({DEFAULT_ROUNDS} rounds of "
                        f"{DEFAULT_STEPS} steps) the four devices of the example take 3 to 5 minutes on 2 cores")
    g.add_argument("--seq-len", type=int_at_least(2), default=64,
                   help="--devices: tokens per sample the plan is made for (the clients' --max-length)")
    g.add_argument("--allocation", choices=["fixed", "fedra", "fedpilot", "fisher"], default="fedpilot",
                   help="--devices: the server's layer allocation (fixed: each device trains its planned blocks)")


@dataclass
class DeviceDemo:
    """The settings of a device demo."""

    devices: list[str]
    out: Path
    strategy: str = "layermean"
    allocation: str = "fedpilot"
    rounds: int = DEFAULT_ROUNDS
    local_steps: int = DEFAULT_STEPS
    seq_len: int = 64
    alpha: float = 0.5
    lr: float = 5e-3
    head_lr: float = 2e-2
    seed: int = 0
    model: str | None = None
    tokenizer: str | None = None
    memory: str = "enforce"  # the clients' --emulate-memory
    server_threads: int = 1
    server_args: list[str] = field(default_factory=list)


@dataclass
class DeviceRun:
    """What one device's client did: its profile, its plan entry, its summary."""

    name: str  # as given on the command line
    client_id: str
    profile: object  # profiles.schema.DeviceProfile
    plan: object  # profiles.planner.ClientPlan
    summary: dict
    evaluator: bool


def rank_range(shape, highest: int = MAX_RANK) -> str:
    """The planner's candidate ranks for ``shape``: powers of two from 4 (less
    for a very narrow model) up to ``highest``, and never above a LoRA
    module's smaller dimension, which the server refuses."""
    widest = min([highest] + [min(d_out, d_in) for _, d_out, d_in in shape.lora_targets])
    top = 1 << (widest.bit_length() - 1)
    return f"{min(4, top)}..{top}"


def plan_arguments(demo: DeviceDemo, num_labels: int, ranks: str) -> list[str]:
    """The ``fedsplit plan`` command line (less ``plan``) the demo plans with."""
    args = ["--profiles", *demo.devices, "--seq-len", str(demo.seq_len), "--cut", SERVER_CUT, "--ranks", ranks,
            "--strategy", demo.strategy, "--num-labels", str(num_labels), "--json", str(demo.out / PLAN_FILE)]
    return args + (["--model", demo.model] if demo.model else [])


def make_plan(demo: DeviceDemo, num_labels: int):
    """Plan the devices in-process (printing the plan's table) and read the
    plan file back (a ``profiles.planfile.PlanFile``: ``clients`` maps each
    profile's name to its ``ClientPlan``)."""
    from profiles.cost import ModelShape
    from profiles.planfile import read_plan
    from split.cli import main
    from split.partition import load_config, resolve_model_path

    demo.out.mkdir(parents=True, exist_ok=True)
    shape = ModelShape.from_config(load_config(resolve_model_path(demo.model), "classification", num_labels, True),
                                   num_labels=num_labels)
    if main(["plan", *plan_arguments(demo, num_labels, rank_range(shape))]) != 0:
        raise RuntimeError("planning failed (the reason is printed above)")
    return read_plan(demo.out / PLAN_FILE)


def evaluator_index(profiles: list) -> int:
    """The device that evaluates the global model every round: the one with
    the fastest link (evaluation moves the whole test set's hidden states
    both ways), then the fastest compute; the first listed on a tie."""
    keys = [(min(p.uplink_mbps, p.downlink_mbps), p.gflops_fp32) for p in profiles]
    return max(range(len(profiles)), key=lambda i: (keys[i], -i))


def server_arguments(demo: DeviceDemo, num_labels: int, run_dir: Path) -> list[str]:
    """The server's options after ``--cut`` and ``--bind``."""
    return ["--strategy", demo.strategy, "--rounds", str(demo.rounds), "--min-clients", str(len(demo.devices)),
            "--local-steps", str(demo.local_steps), "--num-labels", str(num_labels), "--seed", str(demo.seed),
            "--plan", str(demo.out / PLAN_FILE), "--threads", str(demo.server_threads),
            "--allocation", demo.allocation,
            "--run-dir", str(run_dir), *demo.server_args]


def client_id(demo: DeviceDemo, index: int) -> str:
    """Device ``index``'s client id: its place and its profile's file stem."""
    return f"{index}-{Path(demo.devices[index]).stem}"


def client_arguments(demo: DeviceDemo, index: int, endpoint: str, host_gflops: float, evaluator: bool) -> list[str]:
    """The ``fedsplit client`` command line of device ``index``."""
    name = demo.devices[index]
    folder = demo.out / f"client{index}"
    cmd = ["client", "--server", endpoint, "--data", "builtin", "--num-clients", str(len(demo.devices)),
           "--client-index", str(index), "--partition", "dirichlet", "--partition-alpha", str(demo.alpha),
           "--profile", name, "--emulate", name, "--emulate-clock", "cpu", "--threads", "1",
           "--emulate-host-gflops", f"{host_gflops:.3f}", "--emulate-evaluation", "host",
           "--emulate-memory", demo.memory,
           "--lr", str(demo.lr), "--head-lr", str(demo.head_lr), "--seed", str(demo.seed),
           "--id", client_id(demo, index), "--summary-json", str(folder / "summary.json"),
           "--run-dir", str(folder / "run"), "--connect-timeout", "300", "--no-progress"]
    if evaluator:
        cmd.append("--eval-rounds")
    if demo.model:
        cmd += ["--model", demo.model]
    if demo.tokenizer:
        cmd += ["--tokenizer", demo.tokenizer]
    return cmd


def run_devices(demo: DeviceDemo, plans: dict, host_gflops: float, num_labels: int, say=print) -> list[DeviceRun]:
    """Start the server and one emulated client per device, wait for the
    federation to end, and return each device's run. A client that fails
    ends the demo with its log's tail and the server's."""
    profiles = [resolve_profile(n) for n in demo.devices]
    judge = evaluator_index(profiles)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    server_log = open(demo.out / "server.log", "w+")
    server = start_server(demo.model, SERVER_CUT, endpoint,
                          *server_arguments(demo, num_labels, demo.out / "server"), output=server_log)
    clients, logs = [], []
    try:
        for k, name in enumerate(demo.devices):
            (demo.out / f"client{k}").mkdir(parents=True, exist_ok=True)
            logs.append(demo.out / f"client{k}" / "client.log")
            cmd = fedsplit_command(*client_arguments(demo, k, endpoint, host_gflops, k == judge))
            with open(logs[-1], "w") as log:
                clients.append(subprocess.Popen(cmd, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL))
        say(f"started the server and {len(clients)} emulated clients; logs in {demo.out}")
        codes = _wait(clients, server, CLIENT_TIMEOUT)
        server_code = server.poll()
    finally:
        for c in clients:
            stop(c)
        stop(server)
        server_log.close()
    server_tail = (demo.out / "server.log").read_text()[-2000:]
    failed = [k for k, code in enumerate(codes) if code not in (None, 0)]
    if failed:
        k = failed[0]
        raise RuntimeError(f"the client of {demo.devices[k]} failed (exit {codes[k]}):\n"
                           f"{logs[k].read_text()[-3000:]}\nserver log:\n{server_tail}")
    if None in codes:
        why = (f"the server exited (code {server_code})" if server_code is not None
               else f"the clients did not finish within {CLIENT_TIMEOUT:.0f} s")
        raise RuntimeError(f"{why}; server log:\n{server_tail}")
    runs = []
    for k, (name, profile) in enumerate(zip(demo.devices, profiles)):
        summary = json.loads((demo.out / f"client{k}" / "summary.json").read_text())
        runs.append(DeviceRun(name, client_id(demo, k), profile, plans[profile.name], summary, k == judge))
    return runs


def _wait(procs: list[subprocess.Popen], server: subprocess.Popen, timeout: float,
          poll: float = 0.5, grace: float = 60.0) -> list[int | None]:
    """Every client's exit code, once all have ended. When one fails, the
    server fails, or ``timeout`` seconds pass, the clients still running are
    stopped at once (code None): a federation would otherwise wait out its
    deadline for a failed client, and clients their timeout for a server gone.
    A server that ended cleanly has finished the federation: its clients get
    ``grace`` seconds to write their summaries."""
    deadline = time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in procs]
        failed = any(c not in (None, 0) for c in codes)
        server_code = server.poll()
        if server_code == 0:
            deadline = min(deadline, time.monotonic() + grace)
        if all(c is not None for c in codes) or failed or server_code not in (None, 0) or \
                time.monotonic() > deadline:
            break
        time.sleep(poll)
    for p, code in zip(procs, codes):
        if code is None:
            stop(p)
    return codes


# ---------------------------------------------------------------- the summary

GIB = 1 << 30
WIDE = 180  # columns of the summary when the output is not a terminal


def allocations(server_run: Path) -> dict[str, list[list[int]]]:
    """Each client's allocated blocks per round, from the server's
    ``rounds.jsonl`` (empty where the server does not allocate)."""
    from split.runfolder import ROUNDS

    out: dict[str, list[list[int]]] = {}
    path = server_run / ROUNDS
    if path.is_file():
        for line in path.read_text().splitlines():
            for client, blocks in json.loads(line).get("allocation", {}).items():
                out.setdefault(client, []).append(blocks)
    return out


def blocks_cell(planned: list[int], capacity: int, rounds: list[list[int]] | None) -> str:
    """The blocks a device trained: its plan's, or each round's allocation."""
    from profiles.plan_table import blocks_text

    if not rounds:
        return f"{blocks_text(planned)} ({capacity})"
    return " | ".join(blocks_text(b) for b in rounds) + f" ({capacity})"


def device_rows(runs: list[DeviceRun], allocated: dict[str, list[list[int]]]) -> list[dict]:
    """One row of figures per device (the table's, unformatted). Traffic is
    the training's (polls, downloads, steps, uploads), evaluation left out."""
    from split.summary import client_totals

    rows = []
    for run in runs:
        emu, s, plan = run.summary["emulation"], run.summary, run.plan
        totals = client_totals([{"client": run.client_id, **r} for r in s["round_records"]])[run.client_id]
        rows.append({
            "device": run.name, "cut": f"{plan.k1},{plan.k2}", "rank": plan.rank,
            "blocks": blocks_cell(plan.trainable, plan.capacity, allocated.get(run.client_id)),
            "batch": plan.batch, "steps": s["steps"], "compute_s": emu["device_compute_s"],
            "network_s": emu["network_s"], "server_s": totals.server_s, "wall_s": emu["wall_s"],
            "peak_bytes": emu["peak_memory_bytes"], "budget_bytes": emu["memory_budget_bytes"],
            "bytes_up": totals.bytes_up, "bytes_down": totals.bytes_down,
            "accuracy": s.get("final_accuracy") if run.evaluator else None})
    return rows


def summary_table(rows: list[dict], title: str):
    """The per-device summary as a rich Table."""
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for name in ("device", "cut", "rank", "blocks (L_i)", "batch", "steps", "compute s", "link s", "server s",
                 "wall s", "peak / budget GiB", "MB up / down", "accuracy"):
        t.add_column(name, justify="left" if name in ("device", "blocks (L_i)") else "right", no_wrap=True)
    for r in rows:
        t.add_row(r["device"], r["cut"], str(r["rank"]), r["blocks"], str(r["batch"]), str(r["steps"]),
                  f"{r['compute_s']:.1f}", f"{r['network_s']:.1f}", f"{r['server_s']:.1f}", f"{r['wall_s']:.0f}",
                  f"{r['peak_bytes'] / GIB:.2f} / {r['budget_bytes'] / GIB:.2f}",
                  f"{r['bytes_up'] / 1e6:.1f} / {r['bytes_down'] / 1e6:.1f}",
                  "-" if r["accuracy"] is None else f"{r['accuracy']:.1%}")
    return t


# ---------------------------------------------------------------- the command

# Demo options for client processes the device demo does not start (dest -> option).
NOT_WITH_DEVICES = {"clients": "--clients", "ranks": "--ranks", "rank": "--rank", "personal": "--personal",
                    "epochs": "--epochs", "steps": "--steps", "cut": "--cut", "codec_up": "--codec-up",
                    "codec_down": "--codec-down"}


def check_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse the demo options that mean nothing with ``--devices`` (the plan
    decides each client's cut and rank, and there is one client per device)."""
    given = [opt for dest, opt in NOT_WITH_DEVICES.items() if getattr(args, dest) != parser.get_default(dest)]
    if given:
        raise ValueError(f"{', '.join(given)} do(es) not apply with --devices: there is one client per device, and "
                         "the plan gives each its cut, rank, batch and blocks; leave them out")


def settings(args: argparse.Namespace) -> DeviceDemo:
    """The demo's settings from ``fedsplit demo`` options (defaults resolved)."""
    folder = Path(args.out) / f"devices-{time.strftime('%Y%m%d-%H%M%S')}"
    return DeviceDemo(devices=args.devices, out=folder, strategy=args.strategy or "layermean",
                      allocation=args.allocation, rounds=args.rounds or DEFAULT_ROUNDS,
                      local_steps=args.local_steps or DEFAULT_STEPS, seq_len=args.seq_len, alpha=args.alpha,
                      lr=args.lr, head_lr=args.head_lr, model=args.model,
                      tokenizer=args.tokenizer)


def run(args: argparse.Namespace) -> int:
    """``fedsplit demo --devices ...``: plan, run, summarise, plot."""
    import torch

    from rich.console import Console

    from split.console import table_console

    from .data import load_dataset
    from .emulate import host_speed

    check_options(args, args.demo_parser)
    demo = settings(args)
    console = table_console()
    if not console.is_terminal:
        console = Console(width=WIDE)  # a file or a pipe: the summary's rows stay whole
    started = time.perf_counter()
    labels = load_dataset(None).labels
    console.print(f"[bold]fedsplit demo[/]: {len(demo.devices)} emulated devices ({', '.join(demo.devices)}), "
                  f"{demo.strategy} with {demo.allocation} allocation, {demo.rounds} rounds of {demo.local_steps} "
                  f"steps, Dirichlet({demo.alpha}) split of the built-in task; output in {demo.out}")
    plans = make_plan(demo, len(labels)).clients
    torch.set_num_threads(1)
    host = host_speed(clock="cpu", seconds=0.5)
    console.print(f"this host: {host:.1f} GFLOP/s on one thread (by its CPU time); every process computes on one "
                  "thread and each emulated device's compute is dilated from its CPU time")
    try:
        runs = run_devices(demo, plans, host, len(labels), say=console.print)
    except RuntimeError as exc:
        console.print(f"[red]{exc}[/]")
        return 1
    rows = device_rows(runs, allocations(demo.out / "server"))
    (demo.out / "devices.json").write_text(json.dumps(rows, indent=2) + "\n")
    judge = next(r for r in runs if r.evaluator)
    accuracies = [f"{r['accuracy']:.1%}" for r in judge.summary["rounds"] if r.get("accuracy") is not None]
    console.print(summary_table(rows, f"fedsplit device demo: {demo.strategy}, {demo.allocation} allocation"))
    console.print("compute s: as long as the device computes (this host's CPU time x host / device GFLOP/s); link s: "
                  "the delays its link imposed; server s: the server's compute for its steps; wall s: the client's "
                  f"real time here, sleeps included. Accuracy: the global model's, measured by {judge.profile.name} "
                  f"at each round's start ({' -> '.join(accuracies)}) and at the end, at host speed and not "
                  "counted in its times")
    for path in write_report(demo.out):
        console.print(f"plot: {path}")
    console.print(f"plan {demo.out / PLAN_FILE}, run records in {demo.out}; {time.perf_counter() - started:.0f} s")
    return 0


def write_report(out: Path) -> list[Path]:
    """``fedsplit report`` of the server's run folder, its plots written into ``out``."""
    from .report import load_rows, write_plots

    return list(write_plots(load_rows(out / "server"), out))
