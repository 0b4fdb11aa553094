"""How much of FedIT's gap to centralised LoRA do the exact methods close?

On the built-in task (MiniLM, 10 classes), 8 clients with a Dirichlet(0.3)
label split train the same budget: R rounds of S local steps each. Centralised
LoRA trains the same number of steps (8 x R x S, batch 16) through one split
client on all the training data. Every run uses real processes on loopback.
Each setting runs once per seed (the seed draws the label split, the data order,
LoRA initialisation and dropout); prints each method's final test accuracy as
mean and standard deviation over the seeds, its gap to centralised and the share
of FedIT's gap it closes.

    python bench/discordance.py [--rounds 5] [--local-steps 8] [--seeds 0,1,2]
                                [--methods fedit,fedex,flora,ffa,rolora]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.client import ClientConfig  # noqa: E402
from edge.data import load_dataset  # noqa: E402
from edge.demo import FederationRun, run_federation  # noqa: E402
from edge.train import TrainOptions, run_client  # noqa: E402
from split.launch import running_server  # noqa: E402
from split.lora import LoraSpec  # noqa: E402

NAMES = {"fedit": "FedIT", "fedex": "FedEx-LoRA", "flora": "FLoRA", "ffa": "FFA-LoRA", "rolora": "RoLoRA"}


def centralised(steps: int, lr: float, head_lr: float, rank: int, seed: int) -> float:
    with running_server(None, "1,1", "--seed", str(seed)) as endpoint:
        config = ClientConfig(server=endpoint, lora=LoraSpec(rank, 2.0 * rank), lr=lr, head_lr=head_lr, seed=seed)
        summary = run_client(config, TrainOptions(max_steps=steps, eval_before=False, progress=False))
    return summary["accuracy_after"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--head-lr", type=float, default=2e-2)
    parser.add_argument("--methods", default="fedit,fedex,flora,ffa,rolora")
    parser.add_argument("--seeds", default="0,1,2", help="one run per seed; at least 3 for a claim")
    args = parser.parse_args()
    seeds = [int(x) for x in args.seeds.split(",")]
    num_labels = len(load_dataset(None).labels)
    steps = args.clients * args.rounds * args.local_steps
    results: dict[str, list[float]] = {"central": []}
    for seed in seeds:
        start = time.perf_counter()
        results["central"].append(centralised(steps, args.lr, args.head_lr, args.rank, seed))
        print(f"seed {seed}: centralised LoRA, {steps} steps: {results['central'][-1]:.3f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        for method in args.methods.split(","):
            start = time.perf_counter()
            run = FederationRun(strategy=method, clients=args.clients, rounds=args.rounds,
                                local_steps=args.local_steps, alpha=args.alpha, ranks=[args.rank], lr=args.lr,
                                head_lr=args.head_lr, seed=seed)
            acc = run_federation(run, num_labels)[0]["final_accuracy"]
            results.setdefault(method, []).append(acc)
            print(f"seed {seed}: {NAMES.get(method, method)}: {acc:.3f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    print_table(results, args, steps, seeds)


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def print_table(results: dict[str, list[float]], args, steps: int, seeds: list[int]) -> None:
    """The markdown table: mean ± sd over seeds; gaps and shares from the means."""
    central = statistics.mean(results["central"])
    fedit = statistics.mean(results["fedit"]) if "fedit" in results else None
    print(f"\n{args.clients} clients, Dirichlet({args.alpha}), {args.rounds} rounds x {args.local_steps} local "
          f"steps, batch 16, LoRA r={args.rank} on q,v, lr {args.lr} (head {args.head_lr}), same for every method; "
          f"mean ± sd over seeds {seeds}\n")
    print("| method | final test accuracy | gap to centralised | share of FedIT's gap closed |")
    print("|---|---|---|---|")
    print(f"| centralised LoRA ({steps} steps) | {_mean_sd(results['central'])} | - | - |")
    for method, accs in results.items():
        if method == "central":
            continue
        acc = statistics.mean(accs)
        closed = "-"
        if fedit is not None and method != "fedit" and central - fedit > 0:
            closed = f"{(acc - fedit) / (central - fedit):.0%}"
        print(f"| {NAMES.get(method, method)} | {_mean_sd(accs)} | {central - acc:+.3f} | {closed} |")


if __name__ == "__main__":
    main()
