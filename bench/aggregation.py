"""Time one ``aggregate`` call of every registered aggregation strategy.

Setting: a 12-block, 768-wide model with LoRA on q and v (24 modules of
768 x 768), for each client count of ``--clients`` (default 100 and 1,000),
ranks drawn from {4, 8, 16, 32, 64} and sample counts drawn at random (both
seeded). A strategy that refuses mixed ranks is timed with every client at
rank 16, and a one-rank method that takes block subsets (layermean) gets
random ones; the table says so. Uploads are built from each client's own
download (plus random training noise), so every strategy sees inputs it
accepts. The time is the median of ``--repeats`` calls on the same state;
the ratio is that time over the target (0.5 s for 100 clients, 5 s for
1,000; targets for other counts scale linearly from 100 clients).

    python3 bench/aggregation.py                       # 100 and 1,000 clients
    python3 bench/aggregation.py --clients 10          # a quick check
    python3 bench/aggregation.py --threads 1 --name aggregation-1thread

Writes bench/results/<name>.json and <name>.md (``--name``, default
aggregation; nothing with ``--no-write``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.strategies import REGISTRY, get_strategy  # noqa: E402
from server.strategies.base import TRAIN_BOTH, ClientInfo, Factors, Upload  # noqa: E402

BLOCKS, WIDTH, TARGETS = 12, 768, ("q_proj", "v_proj")
RANK_CHOICES = (4, 8, 16, 32, 64)
HOMOGENEOUS_RANK = 16
ALPHA = 16.0
TARGET_PER_100 = 0.5  # seconds per 100 clients: 0.5 s for 100, 5 s for 1,000
OUT = Path(__file__).resolve().parents[1] / "bench" / "results"


def target_s(n_clients: int) -> float:
    """The time target for ``n_clients`` clients."""
    return TARGET_PER_100 * n_clients / 100


def module_names() -> list[str]:
    return [f"model.layers.{i}.self_attn.{t}" for i in range(BLOCKS) for t in TARGETS]


def plan_clients(n: int, g: torch.Generator, mixed: bool, subsets: bool) -> list[ClientInfo]:
    """Clients with seeded ranks, sample counts and (optionally) block subsets."""
    out = []
    for k in range(n):
        rank = RANK_CHOICES[int(torch.randint(len(RANK_CHOICES), (1,), generator=g))]
        samples = int(torch.randint(10, 1001, (1,), generator=g))
        blocks = None
        if subsets:
            size = int(torch.randint(1, BLOCKS + 1, (1,), generator=g))
            blocks = frozenset(torch.randperm(BLOCKS, generator=g)[:size].tolist())
        out.append(ClientInfo(f"client{k:03d}", rank if mixed else HOMOGENEOUS_RANK, ALPHA, blocks, samples))
    return out


def initial_lora(rank: int, g: torch.Generator) -> dict[str, Factors]:
    """A PEFT-like start: A random, B zero."""
    return {m: Factors(torch.randn(rank, WIDTH, generator=g) / WIDTH**0.5, torch.zeros(WIDTH, rank), ALPHA)
            for m in module_names()}


def make_uploads(strategy, state, clients: list[ClientInfo], g: torch.Generator) -> list[Upload]:
    """Each client's upload: its download with random changes to the factors it trains."""
    uploads = []
    modules = module_names()
    for c in clients:
        d = strategy.download(state, c, 0)
        r = d.rank
        mine = [m for m in modules if c.blocks is None or int(m.split(".")[2]) in c.blocks]
        factors = {}
        for m in mine:
            A = d.A.get(m) if not d.fresh else None
            B = d.B.get(m) if not d.fresh else None
            if A is None or d.trainable in (TRAIN_BOTH, "A"):
                A = (A if A is not None else torch.zeros(r, WIDTH)) + torch.randn(r, WIDTH, generator=g) / WIDTH**0.5
            if B is None or d.trainable in (TRAIN_BOTH, "B"):
                B = (B if B is not None else torch.zeros(WIDTH, r)) + 0.01 * torch.randn(WIDTH, r, generator=g)
            factors[m] = Factors(A, B, d.alpha)
        uploads.append(Upload(c.client, factors, c.num_samples, r, c.blocks))
    return uploads


def bench_one(name: str, n_clients: int, repeats: int, seed: int) -> tuple[str, float]:
    """(ranks description, median seconds) for one strategy."""
    strategy = get_strategy(name, seed=seed)
    mixed = strategy.heterogeneous_ranks
    subsets = strategy.block_subsets and not mixed
    g = torch.Generator().manual_seed(seed)
    clients = plan_clients(n_clients, g, mixed, subsets)
    r_max = max(c.rank for c in clients)
    state = strategy.init_state(initial_lora(r_max, g), clients)
    uploads = make_uploads(strategy, state, clients, g)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        strategy.aggregate(state, uploads, 0)
        times.append(time.perf_counter() - t0)
    what = "mixed" if mixed else f"all {HOMOGENEOUS_RANK} (refuses mixed ranks)"
    if subsets:
        what += ", random block subsets"
    return what, statistics.median(times)


def client_counts(text: str) -> list[int]:
    """``--clients``: comma-separated positive client counts."""
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--clients takes comma-separated integers such as 100,1000, got {text!r}")
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"--clients needs client counts of at least 1, got {text!r}")
    return counts


def table(result: dict) -> str:
    """The Markdown table of a result."""
    counts = result["clients"]
    head = ["strategy", "ranks"]
    for n in counts:
        head += [f"{n} clients (s)", f"/ {target_s(n):g} s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["rows"]:
        cells = [row["strategy"], row["ranks"]]
        for n in counts:
            t = row["seconds"].get(str(n))
            cells += (["error", row.get("error", "")] if t is None else [f"{t:.3f}", f"{t / target_s(n):.2f}"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=client_counts, default=[100, 1000],
                    help="comma-separated client counts, one column each (default 100,1000)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strategies", default="", help="comma-separated subset of the registry (default: all)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (default: torch's own choice, one per core, as a server runs)")
    ap.add_argument("--name", default="aggregation",
                    help="stem of the results files in bench/results (default aggregation)")
    ap.add_argument("--no-write", action="store_true", help="print the table only; leave bench/results alone")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {args.repeats}")
    if not args.name or "/" in args.name or args.name.startswith("."):
        ap.error(f"--name is a file stem inside bench/results such as aggregation-1thread, got {args.name!r}")
    if args.threads < 0:
        ap.error(f"--threads must be 0 (torch's choice) or a thread count, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [s.strip() for s in args.strategies.split(",") if s.strip()] or list(REGISTRY)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        ap.error(f"--strategies: {', '.join(unknown)} not in the registry ({', '.join(REGISTRY)})")

    load_before = os.getloadavg()[0]
    rows = []
    for name in names:
        row = {"strategy": name, "ranks": "", "seconds": {}}
        for n in args.clients:
            try:
                row["ranks"], row["seconds"][str(n)] = bench_one(name, n, args.repeats, args.seed)
            except Exception as e:  # noqa: BLE001 - report and go on with the others
                row["error"] = f"{type(e).__name__}: {e}"
            print(f"  done: {name}, {n} clients", file=sys.stderr, flush=True)
        rows.append(row)
    result = {
        "clients": args.clients, "repeats": args.repeats, "seed": args.seed,
        "targets_s": {str(n): target_s(n) for n in args.clients},
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
        "cpus": os.cpu_count(), "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
        "rows": rows,
    }
    md = table(result)
    print(md)
    if not args.no_write:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
        (OUT / f"{args.name}.md").write_text(
            f"One `aggregate` call, median of {args.repeats}, {result['threads']} torch threads on "
            f"{result['cpus']} CPUs (1-minute load average {load_before:.1f} before, "
            f"{result['load_average_after']:.1f} after); the ratio columns are time / target.\n\n{md}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
