"""Soak: many clients training through one server for minutes on end.

One ``fedsplit server`` process and N client processes (each a ``SplitClient``
training on random token batches of varying length, with an evaluation
forward every 20 steps) on loopback. After every client has taken
--warmup-steps steps and --warmup seconds have passed, the measured window
runs for M minutes. The
server's resident memory (psutil) and every client's step count are sampled
throughout. Reported: the server's memory growth from the start of the
measured window to its end (the mean of the first and of the last tenth of
the window's samples; target under 5%), client errors (target 0), resends and
registrations, and steps per second. Written under --out: ``summary.json``,
``samples.json`` and ``soak.png`` (steps/s and server memory over time).

    python bench/soak.py                          # 16 clients, 10 minutes, all-MiniLM-L6-v2
    python bench/soak.py --clients 4 --minutes 1  # smoke run
    python bench/soak.py --model small            # a random 4 x 128 BERT: seven times the steps

Which model: the built-in all-MiniLM-L6-v2 fits 16 clients on 2 cores (one
torch thread per process; about 5 steps per second in all, some 200 steps per
client in 10 minutes). A soak finds what grows per step, so ``--model small``
(a random BERT of MiniLM's vocabulary, 4 blocks of width 128) runs the same
code about seven times as many steps.

Not part of the test suite: it runs for minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from split.launch import free_port, start_server, stop, wait_ready  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "soak"
SMALL = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
             max_position_embeddings=128, num_labels=2)
MEMORY_TARGET, ERROR_TARGET = 5.0, 0
PROGRESS_EVERY = 1.0  # seconds between a client's progress lines


# ---------------------------------------------------------------- a client process


def worker(args) -> int:
    """One client: train until the stop file appears, writing progress lines."""
    import torch

    from edge.client import ClientConfig, SplitClient
    from split.partition import load_config, resolve_model_path

    torch.set_num_threads(1)
    model = None if args.model == "minilm" else args.model  # None: the built-in one
    path = resolve_model_path(model)
    vocab = load_config(path, "classification", 2, True).vocab_size
    progress = open(args.progress, "a", buffering=1)
    client = SplitClient(ClientConfig(server=args.server, model=model, num_labels=2, client_id=args.id,
                                      seed=args.index, lr=1e-4, reconnect_for=120.0))
    gen = torch.Generator().manual_seed(args.index)
    last, code = 0.0, 0
    try:
        while not Path(args.stop).exists():
            tokens = int(torch.randint(args.max_length // 2, args.max_length + 1, (1,), generator=gen))
            batch = {"input_ids": torch.randint(1000, vocab - 1, (args.batch_size, tokens), generator=gen),
                     "attention_mask": torch.ones(args.batch_size, tokens, dtype=torch.long),
                     "labels": torch.randint(0, 2, (args.batch_size,), generator=gen)}
            client.train_step(batch)
            if client.steps % 20 == 0:
                client.predict({k: v for k, v in batch.items() if k != "labels"})
            if time.time() - last >= PROGRESS_EVERY:
                last = time.time()
                progress.write(json.dumps({"t": last, "steps": client.steps}) + "\n")
    except Exception as exc:  # the soak counts it: any exception is a client error
        progress.write(json.dumps({"t": time.time(), "steps": client.steps,
                                   "error": f"{type(exc).__name__}: {exc}"}) + "\n")
        code = 1
    progress.write(json.dumps({"t": time.time(), "steps": client.steps, "retries": client.conn.retries,
                               "registrations": client.registrations, "done": True}) + "\n")
    client.close()
    return code


# ---------------------------------------------------------------- the run


def last_line(path: Path) -> dict:
    """A progress file's newest complete line ({} before the first)."""
    if not path.exists():
        return {}
    lines = [ln for ln in path.read_text().splitlines() if ln.endswith("}")]
    return json.loads(lines[-1]) if lines else {}


def start_clients(args, endpoint: str, work: Path) -> list[subprocess.Popen]:
    procs = []
    for k in range(args.clients):
        cmd = [sys.executable, __file__, "--worker", "--server", endpoint, "--id", f"soak{k}", "--index", str(k),
               "--progress", str(work / f"client{k}.jsonl"), "--stop", str(work / "stop"),
               "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
        cmd += ["--model", "minilm" if args.model is None else args.model]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(work / f"client{k}.err", "w"),
                                      env={**os.environ, "PYTHONPATH": str(ROOT)}))
    return procs


def sample(server, work: Path, clients: int, started: float) -> dict:
    lines = [last_line(work / f"client{k}.jsonl") for k in range(clients)]
    return {"t": time.time() - started, "server_rss": server.memory_info().rss,
            "steps": [ln.get("steps", 0) for ln in lines]}


def small_model(folder: Path) -> Path:
    """A random BERT with MiniLM's 30522-token vocabulary, 4 blocks of width 128."""
    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig

    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(BertConfig(**SMALL)).save_pretrained(folder)
    return folder


def resolve_model(name: str, work: Path) -> tuple[str | None, str]:
    """The --model to start both sides with, and its description."""
    if name == "small":
        return str(small_model(work / "small-bert")), "random BERT, 4 blocks x 128, vocabulary 30522"
    if name == "minilm":
        return None, "all-MiniLM-L6-v2 (built-in, 6 blocks x 384)"
    return name, name


def run(args) -> dict:
    import psutil

    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    for f in work.iterdir():
        if f.is_file():
            f.unlink()
    args.model, args.model_name = resolve_model(args.model, work)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    server_args = ["--threads", str(args.server_threads), "--log-level", "WARNING"]
    proc = start_server(args.model, "1,1", endpoint, *server_args, output=open(work / "server.log", "w"))
    procs = []
    samples: list[dict] = []
    try:
        wait_ready(endpoint, proc)
        server = psutil.Process(proc.pid)
        started = time.time()
        procs = start_clients(args, endpoint, work)
        print(f"soak: {args.clients} clients of {args.model_name} on {endpoint}; warming up", flush=True)
        while True:
            samples.append(sample(server, work, args.clients, started))
            if all(s >= args.warmup_steps for s in samples[-1]["steps"]) and samples[-1]["t"] >= args.warmup:
                break
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"a client exited during the warm-up; see {work}/client*.err")
            time.sleep(args.sample_every)
        window_start = samples[-1]["t"]
        window_end = window_start + args.minutes * 60
        print(f"soak: warm after {window_start:.0f}s (every client {args.warmup_steps}+ steps); "
              f"{args.minutes:g} min measured", flush=True)
        while samples[-1]["t"] < window_end:
            time.sleep(args.sample_every)
            samples.append(sample(server, work, args.clients, started))
            if len(samples) % max(1, int(60 / args.sample_every)) == 0:
                s = samples[-1]
                print(f"  {s['t']:.0f}s: {sum(s['steps'])} steps, server RSS {s['server_rss'] / 2**20:.0f} MiB",
                      flush=True)
        (work / "stop").touch()
        codes = [p.wait(180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
        stop(proc)
    finals = [last_line(work / f"client{k}.jsonl") for k in range(args.clients)]
    errors = {}  # client -> its error (a client stops at its first)
    for k in range(args.clients):
        for line in (work / f"client{k}.jsonl").read_text().splitlines():
            if '"error"' in line:
                errors[k] = json.loads(line)["error"]
        if codes[k] != 0 and k not in errors:
            errors[k] = f"exited with code {codes[k]} (see {work / f'client{k}.err'})"
    summary = summarise(args, samples, window_start, window_end, codes, finals, errors)
    (out / "samples.json").write_text(json.dumps({"window": [window_start, window_end], "samples": samples}))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot(samples, window_start, window_end, summary, out / "soak.png")
    return summary


def summarise(args, samples, window_start, window_end, codes, finals, errors) -> dict:
    """The figures: memory growth over the measured window, errors, steps per second."""
    window = [s for s in samples if window_start <= s["t"] <= window_end]
    if len(window) < 10:
        raise RuntimeError(f"only {len(window)} samples in the measured window: run longer or sample more often")
    tenth = max(1, len(window) // 10)
    first = sum(s["server_rss"] for s in window[:tenth]) / tenth
    last = sum(s["server_rss"] for s in window[-tenth:]) / tenth
    peak = max(s["server_rss"] for s in window)
    steps = sum(window[-1]["steps"]) - sum(window[0]["steps"])
    seconds = window[-1]["t"] - window[0]["t"]
    growth = 100 * (last - first) / first
    return {
        "model": args.model_name, "clients": args.clients, "minutes": args.minutes,
        "warmup_s": window_start, "warmup_steps_per_client": args.warmup_steps,
        "batch": [args.batch_size, args.max_length], "server_threads": args.server_threads,
        "server_rss_start_mib": first / 2**20, "server_rss_end_mib": last / 2**20,
        "server_rss_peak_mib": peak / 2**20, "server_memory_growth_pct": growth,
        "server_memory_peak_growth_pct": 100 * (peak - first) / first,
        "steps": steps, "steps_per_s": steps / seconds,
        "steps_per_client": [f.get("steps", 0) for f in finals],
        "client_errors": len(errors), "errors": {f"soak{k}": e for k, e in sorted(errors.items())},
        "client_exit_codes": codes,
        "resends": sum(f.get("retries", 0) for f in finals),
        "registrations": sum(f.get("registrations", 0) for f in finals),
        "memory_ok": growth < MEMORY_TARGET, "errors_ok": len(errors) == ERROR_TARGET,
    }


def plot(samples, window_start, window_end, summary, path: Path) -> None:
    """Steps per second (all clients) and server memory over time, the measured window shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] for s in samples]
    totals = [sum(s["steps"]) for s in samples]
    rates = [(totals[i] - totals[i - 1]) / (t[i] - t[i - 1]) for i in range(1, len(t))]
    # A 30-second moving average: single samples are a few steps each.
    span = max(1, int(30 / max(1e-9, (t[-1] - t[0]) / max(1, len(t) - 1))))
    smooth = [sum(rates[max(0, i - span + 1):i + 1]) / len(rates[max(0, i - span + 1):i + 1])
              for i in range(len(rates))]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot(t[1:], rates, color="0.8", linewidth=0.6, label="per sample")
    top.plot(t[1:], smooth, color="tab:blue", label="30 s mean")
    top.set_ylabel("steps / s (all clients)")
    top.legend(loc="lower right")
    bottom.plot(t, [s["server_rss"] / 2**20 for s in samples], color="tab:red")
    bottom.set_ylabel("server RSS (MiB)")
    bottom.set_xlabel("seconds since the clients started")
    for ax in (top, bottom):
        ax.axvspan(window_start, window_end, color="tab:green", alpha=0.08)
        ax.grid(alpha=0.3)
    fig.suptitle(f"soak: {summary['clients']} clients, {summary['model']}; measured window shaded: "
                 f"memory {summary['server_memory_growth_pct']:+.2f}%, {summary['client_errors']} client errors, "
                 f"{summary['steps_per_s']:.1f} steps/s", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16, help="client processes")
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the measured window")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds since the clients started before measuring, at least "
                             "(default: 60, or 20 for a window under 3 minutes)")
    parser.add_argument("--warmup-steps", type=int, default=20,
                        help="steps every client takes before measuring (allocator and per-session state settle)")
    parser.add_argument("--model", default="minilm",
                        help="small (a random 4 x 128 BERT), minilm (the built-in all-MiniLM-L6-v2) or a folder")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=32, help="longest batch, in tokens (shortest: half)")
    # One thread: on 2 cores shared by 17 processes, a second server thread spends
    # each parallel region waiting for its twin to be scheduled.
    parser.add_argument("--server-threads", type=int, default=1, help="torch threads of the server")
    parser.add_argument("--sample-every", type=float, default=2.0, help="seconds between samples")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for summary.json, samples.json, soak.png")
    # A client process (started by the run itself).
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--server", "--id", "--progress", "--stop"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.clients < 1 or args.minutes <= 0 or args.sample_every <= 0:
        parser.error("--clients must be >= 1, --minutes and --sample-every > 0")
    if args.warmup is None:
        args.warmup = 60.0 if args.minutes >= 3 else 20.0
    summary = run(args)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("errors", "steps_per_client")}, indent=2))
    print(f"server memory {summary['server_rss_start_mib']:.0f} -> {summary['server_rss_end_mib']:.0f} MiB "
          f"({summary['server_memory_growth_pct']:+.2f}%, target < {MEMORY_TARGET:g}%: "
          f"{'ok' if summary['memory_ok'] else 'MISSED'}); client errors {summary['client_errors']} "
          f"({'ok' if summary['errors_ok'] else 'MISSED'}); {summary['steps_per_s']:.1f} steps/s; plot "
          f"{Path(args.out) / 'soak.png'}")
    return 0 if summary["memory_ok"] and summary["errors_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
