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
