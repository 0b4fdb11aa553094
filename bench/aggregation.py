"""Time one ``aggregate`` call of every registered aggregation strategy.

Setting: a 12-block, 768-wide model with LoRA on q and v (24 modules of
768 x 768), 100 clients by default, ranks drawn from {4, 8, 16, 32, 64} and
sample counts drawn at random (both seeded). A strategy that refuses mixed
ranks is timed with every client at rank 16, and a one-rank method that
takes block subsets (layermean) gets random ones; the table says so. Uploads are built from each client's own
download (plus random training noise), so every strategy sees inputs it
accepts. The time is the median of ``--repeats`` calls on the same state.

    python3 bench/aggregation.py                  # 100 clients
    python3 bench/aggregation.py --clients 10     # a quick check
"""

from __future__ import annotations

import argparse
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
LIMIT_S = 2.0


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


def bench_one(name: str, n_clients: int, repeats: int, seed: int) -> tuple[str, str, str]:
    """(ranks description, seconds, under-limit) for one strategy."""
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
    ranks = sorted({c.rank for c in clients})
    what = f"mixed {ranks}" if mixed else f"all {HOMOGENEOUS_RANK} (refuses mixed ranks)"
    if subsets:
        what += ", random block subsets"
    t = statistics.median(times)
    return what, f"{t:.3f}", "yes" if t < LIMIT_S else "no"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strategies", default="", help="comma-separated subset of the registry (default: all)")
    args = ap.parse_args(argv)
    names = [s.strip() for s in args.strategies.split(",") if s.strip()] or list(REGISTRY)

    rows, skipped = [], []
    for name in names:
        if name not in REGISTRY:
            skipped.append((name, "not in the registry"))
            continue
        try:
            rows.append((name, *bench_one(name, args.clients, args.repeats, args.seed)))
        except Exception as e:  # noqa: BLE001 - report and go on with the others
            rows.append((name, "-", f"error: {type(e).__name__}: {e}", "-"))
        print(f"  done: {name}", file=sys.stderr, flush=True)

    print(f"| strategy | clients | ranks | seconds (median of {args.repeats}) | under {LIMIT_S:g} s? |")
    print("|---|---|---|---|---|")
    for name, ranks, secs, ok in rows:
        print(f"| {name} | {args.clients} | {ranks} | {secs} | {ok} |")
    if skipped:
        print("\nSkipped:")
        for name, why in skipped:
            print(f"- {name}: {why}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
