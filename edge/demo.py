"""``fedsplit demo``: a server and a client as two processes on loopback."""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from server.launch import child_env, fedsplit_command, free_port, start_server, stop


def run_demo(args) -> int:
    if args.clients > 1:
        return run_federated_demo(args)
    return run_split_demo(args)


def run_federated_demo(args) -> int:
    """A server and ``args.clients`` client processes training in rounds."""
    from .data import load_dataset
    from .partition_data import label_table, partition

    console = Console()
    ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else [args.rank]
    ranks = [ranks[k % len(ranks)] for k in range(args.clients)]
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    console.print(f"[bold]fedsplit demo[/]: {args.clients} clients, {args.strategy}, {args.rounds} rounds of "
                  f"{args.local_steps} local steps, Dirichlet({args.alpha}) split of the built-in task, "
                  f"ranks {ranks}, server on {endpoint}")
    dataset = load_dataset(None)
    labels = [s.label for s in dataset.train]
    console.print(label_table(labels, partition(labels, args.clients, "dirichlet", args.alpha, 0)))
    with tempfile.TemporaryDirectory() as tmp:
        server_log = open(Path(tmp) / "server.log", "w+")
        server = start_server(args.model, args.cut, endpoint, "--strategy", args.strategy, "--rounds",
                              str(args.rounds), "--min-clients", str(args.clients), "--local-steps",
                              str(args.local_steps), "--num-labels", str(len(dataset.labels)),
                              "--checkpoint-dir", args.out, output=server_log)
        started = time.perf_counter()
        clients = []
        for k in range(args.clients):
            cmd = ["client", "--server", endpoint, "--data", "builtin", "--num-clients", str(args.clients),
                   "--client-index", str(k), "--partition", "dirichlet", "--partition-alpha", str(args.alpha),
                   "--rank", str(ranks[k]), "--lr", str(args.lr), "--head-lr", str(args.head_lr),
                   "--summary-json", str(Path(tmp) / f"client{k}.json"), "--id", f"client{k}",
                   "--connect-timeout", "180", "--no-progress", "--out", str(Path(tmp) / f"adapter{k}")]
            if k == 0:
                cmd.append("--eval-rounds")
            if args.model:
                cmd += ["--model", args.model]
            clients.append(subprocess.Popen(fedsplit_command(*cmd), env=child_env(), stdout=subprocess.DEVNULL,
                                            stderr=open(Path(tmp) / f"client{k}.log", "w")))
        try:
            codes = [c.wait() for c in clients]
        finally:
            for c in clients:
                stop(c)
            stop(server)
        if any(codes):
            bad = codes.index(next(c for c in codes if c))
            server_log.seek(0)
            console.print(f"[red]client {bad} failed (exit {codes[bad]}):[/]\n"
                          f"{(Path(tmp) / f'client{bad}.log').read_text()[-3000:]}\nserver log:\n"
                          f"{server_log.read()[-2000:]}")
            return 1
        summaries = [json.loads((Path(tmp) / f"client{k}.json").read_text()) for k in range(args.clients)]
    first = summaries[0]
    table = Table(title=f"fedsplit federated demo: {args.strategy}")
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
    console.print(f"checkpoints in {Path(args.out).resolve()} (round_N/: PEFT adapter + coordinator state); "
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
                       "--connect-timeout", "180"]
        if args.steps:
            client_args += ["--steps", str(args.steps)]
        if args.model:
            client_args += ["--model", args.model]
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
