"""``fedsplit demo``: a server and a client as two processes on loopback."""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from split.console import table_console
from split.launch import child_env, fedsplit_command, free_port, start_server, stop
from split.summary import client_table

from .client_shares import client_shares, label_table
from .data import load_dataset
from .report import load_rows


def run_demo(args) -> int:
    # Rounds of few local steps need larger steps than one long run to get as far.
    federated = args.clients > 1 or args.devices is not None
    args.lr = args.lr or (5e-3 if federated else 2e-3)
    args.head_lr = args.head_lr or (2e-2 if federated else 5e-3)
    if args.devices is not None:
        from .device_demo import run

        return run(args)
    args.strategy, args.rounds, args.local_steps = args.strategy or "fedit", args.rounds or 5, args.local_steps or 10
    if federated:
        return run_federated_demo(args)
    return run_split_demo(args)


@dataclass
class FederationRun:
    """A federation of local processes: the settings."""

    strategy: str = "fedit"
    clients: int = 4
    rounds: int = 5
    local_steps: int = 10
    alpha: float = 0.5
    ranks: list[int] = field(default_factory=lambda: [8])
    lr: float = 5e-3
    head_lr: float = 2e-2
    model: str | None = None
    tokenizer: str | None = None  # None: the model folder's
    cut: str = "1,1"
    checkpoint_dir: str | None = None
    server_args: tuple[str, ...] = ()
    seed: int = 0
    personal: bool = False
    run_dir: str | None = None  # the run folder: server/ and clientK/ records, and every process's log
    codec_up: str = "fp32"  # every client's --codec-up and --codec-down (split/codecs.py)
    codec_down: str = "fp32"


def run_federation(run: FederationRun, num_labels: int) -> list[dict]:
    """Start a server and ``run.clients`` client processes on loopback, wait for
    the federation to end, and return each client's summary (client 0 evaluates
    the global model every round). With ``run.run_dir`` every process records
    its run there (``run_dir/server``, ``run_dir/clientK``) beside its log."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    ranks = [run.ranks[k % len(run.ranks)] for k in range(run.clients)]
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(run.run_dir or tmp)
        logs.mkdir(parents=True, exist_ok=True)
        server_log = open(logs / "server.log", "w+")
        extra = ["--checkpoint-dir", run.checkpoint_dir] if run.checkpoint_dir else []
        if run.run_dir:
            extra += ["--run-dir", str(logs / "server")]
        server = start_server(run.model, run.cut, endpoint, "--strategy", run.strategy, "--rounds", str(run.rounds),
                              "--min-clients", str(run.clients), "--local-steps", str(run.local_steps),
                              "--num-labels", str(num_labels), "--seed", str(run.seed), *extra, *run.server_args,
                              output=server_log)
        clients = []
        for k in range(run.clients):
            cmd = ["client", "--server", endpoint, "--data", "builtin", "--num-clients", str(run.clients),
                   "--client-index", str(k), "--partition", "dirichlet", "--partition-alpha", str(run.alpha),
                   "--rank", str(ranks[k]), "--lr", str(run.lr), "--head-lr", str(run.head_lr), "--seed",
                   str(run.seed), "--summary-json", str(Path(tmp) / f"client{k}.json"), "--id", f"client{k}",
                   "--connect-timeout", "300", "--no-progress", "--codec-up", run.codec_up,
                   "--codec-down", run.codec_down]
            if k == 0:
                cmd.append("--eval-rounds")
            if run.personal:
                cmd.append("--personal")
            if run.model:
                cmd += ["--model", run.model]
            if run.tokenizer:
                cmd += ["--tokenizer", run.tokenizer]
            if run.run_dir:
                cmd += ["--run-dir", str(logs / f"client{k}")]
            clients.append(subprocess.Popen(fedsplit_command(*cmd), env=child_env(), stdout=subprocess.DEVNULL,
                                            stderr=open(logs / f"client{k}.log", "w")))
        try:
            codes = [c.wait() for c in clients]
        finally:
            for c in clients:
                stop(c)
            stop(server)
        if any(codes):
            bad = next(k for k, c in enumerate(codes) if c)
            server_log.seek(0)
            raise RuntimeError(f"client {bad} failed (exit {codes[bad]}):\n"
                               f"{(logs / f'client{bad}.log').read_text()[-3000:]}\n"
                               f"server log:\n{server_log.read()[-2000:]}")
        return [json.loads((Path(tmp) / f"client{k}.json").read_text()) for k in range(run.clients)]


def run_federated_demo(args) -> int:
    """A server and ``args.clients`` client processes training in rounds."""
    console = table_console()
    run = FederationRun(strategy=args.strategy, clients=args.clients, rounds=args.rounds,
                        local_steps=args.local_steps, alpha=args.alpha,
                        ranks=args.ranks or [args.rank], lr=args.lr, head_lr=args.head_lr, model=args.model,
                        tokenizer=args.tokenizer, cut=args.cut, checkpoint_dir=args.out,
                        personal=args.personal, run_dir=str(Path(args.out) / "runs" / time.strftime("%Y%m%d-%H%M%S")),
                        codec_up=args.codec_up, codec_down=args.codec_down)
    console.print(f"[bold]fedsplit demo[/]: {run.clients} clients, {run.strategy}, {run.rounds} rounds of "
                  f"{run.local_steps} local steps, Dirichlet({run.alpha}) split of the built-in task, "
                  f"ranks {[run.ranks[k % len(run.ranks)] for k in range(run.clients)]}, "
                  f"codecs up {run.codec_up}, down {run.codec_down}")
    dataset = load_dataset(None)
    labels = [s.label for s in dataset.train]
    console.print(label_table(labels, client_shares(labels, run.clients, "dirichlet", run.alpha, run.seed)))
    started = time.perf_counter()
    try:
        summaries = run_federation(run, len(dataset.labels))
    except RuntimeError as exc:
        console.print(f"[red]{exc}[/]")
        return 1
    first = summaries[0]
    table = Table(title=f"fedsplit federated demo: {run.strategy}")
    for col in ("round", "test accuracy at round start", "mean local loss", "MB sent (all clients)",
                "MB received (all clients)"):
        table.add_column(col, justify="right")
    for t, rec in enumerate(first["rounds"]):
        sent = sum(s["rounds"][t]["bytes_sent"] for s in summaries if t < len(s["rounds"]))
        received = sum(s["rounds"][t]["bytes_received"] for s in summaries if t < len(s["rounds"]))
        losses = [s["rounds"][t]["loss"] for s in summaries if t < len(s["rounds"])]
        table.add_row(str(rec["round"]), f"{rec['accuracy']:.1%}", f"{sum(losses) / len(losses):.3f}",
                      f"{sent / 1e6:.1f}", f"{received / 1e6:.1f}")
    table.add_row("final", f"{first['final_accuracy']:.1%}", "", "", "")
    console.print(table)
    if run.personal:
        personal = Table(title="FedDPA: accuracy on each client's own held-out data")
        for col in ("client", "global adapter", "global + personal adapter"):
            personal.add_column(col, justify="right")
        for k, summary in enumerate(summaries):
            acc = summary["personal_accuracy"]
            personal.add_row(str(k), f"{acc['global']:.1%}", f"{acc['personalised']:.1%}")
        console.print(personal)
    server_run = Path(run.run_dir) / "server"
    console.print(client_table(load_rows(server_run), "per client: the server's records"))
    console.print(f"checkpoints in {Path(args.out).resolve()} (round_N/: PEFT adapter + coordinator state); "
                  f"run records and logs in {Path(run.run_dir).resolve()}; plots: fedsplit report {server_run}; "
                  f"{time.perf_counter() - started:.0f} s")
    return 0


def run_split_demo(args) -> int:
    """One server and one client: plain split fine-tuning."""
    console = Console()
    port = free_port()
    console.print(f"[bold]fedsplit demo[/]: MiniLM split {args.cut}, server on 127.0.0.1:{port}, "
                  "built-in stdlib-docstring task")
    with tempfile.TemporaryDirectory() as tmp:
        server_log = open(Path(tmp) / "server.log", "w+")
        server = start_server(args.model, args.cut, f"tcp://127.0.0.1:{port}", output=server_log)
        summary_path = Path(tmp) / "summary.json"
        client_args = ["client", "--server", f"tcp://127.0.0.1:{port}", "--data", "builtin",
                       "--epochs", str(args.epochs), "--rank", str(args.rank), "--lr", str(args.lr),
                       "--head-lr", str(args.head_lr), "--out", args.out, "--summary-json", str(summary_path),
                       "--connect-timeout", "180", "--codec-up", args.codec_up, "--codec-down", args.codec_down]
        if args.steps:
            client_args += ["--steps", str(args.steps)]
        if args.model:
            client_args += ["--model", args.model]
        if args.tokenizer:
            client_args += ["--tokenizer", args.tokenizer]
        started = time.perf_counter()
        try:
            code = subprocess.call(fedsplit_command(*client_args), env=child_env())
        finally:
            stop(server)
        if code != 0 or not summary_path.exists():
            server_log.seek(0)
            console.print(f"[red]the client failed (exit {code}); server log:[/]\n{server_log.read()[-3000:]}")
            return code or 1
        summary = json.loads(summary_path.read_text())
    table = Table(title="fedsplit demo summary")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("test accuracy before", f"{summary['accuracy_before']:.1%}")
    table.add_row("test accuracy after", f"{summary['accuracy_after']:.1%}")
    table.add_row("classes / train / test", f"{len(summary['labels'])} / {summary['train_samples']} / "
                  f"{summary['test_samples']}")
    table.add_row("training steps", str(summary["steps"]))
    table.add_row("loss first -> last", f"{summary['first_loss']:.3f} -> {summary['last_loss']:.3f}")
    table.add_row("client bytes sent", f"{summary['bytes_sent'] / 1e6:.1f} MB")
    table.add_row("client bytes received", f"{summary['bytes_received'] / 1e6:.1f} MB")
    table.add_row("client weights (of checkpoint)",
                  f"{summary['client_owned_bytes'] / 1e6:.1f} MB of {summary['checkpoint_bytes'] / 1e6:.1f} MB")
    table.add_row("client peak memory (process)", f"{summary['client_peak_rss'] / 1e6:.0f} MB")
    table.add_row("client peak above its start", f"{summary['client_peak_rss_above_start'] / 1e6:.0f} MB")
    table.add_row("training time", f"{summary['train_seconds']:.0f} s (whole demo {time.perf_counter() - started:.0f} s)")
    table.add_row("adapter", summary.get("adapter", "-"))
    console.print(table)
    return 0
