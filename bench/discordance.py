"""How much of FedIT's gap to centralised LoRA do the exact methods close?

On the built-in task (MiniLM, 10 classes), 8 clients with a Dirichlet(0.3)
label split train the same budget: R rounds of S local steps each. Centralised
LoRA trains the same number of steps (8 x R x S, batch 16) through one split
client on all the training data. Every run uses real processes on loopback.
Each setting runs once per seed (the seed draws the label split, the data order,
LoRA initialisation and dropout); prints each method's final test accuracy as
mean and standard deviation over the seeds, its gap to centralised, its
difference to FedIT paired by seed (a claim only where that difference
exceeds its spread: bench/seed_stats.py) and the share of FedIT's gap it
closes. Writes bench/results/<name>.{json,md}.

    python bench/discordance.py [--rounds 5] [--local-steps 8] [--seeds 0,1,2]
                                [--methods fedit,fedex,flora,ffa,rolora]
"""

from __future__ import annotations

import argparse
import json
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
from seed_stats import mean_sd, paired, spread, verdict  # noqa: E402  (bench/ is sys.path[0] as a script)

OUT = Path(__file__).resolve().parents[1] / "bench" / "results"

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
    parser.add_argument("--name", default="discordance", help="stem of the results files in bench/results")
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
    text = table(results, args, steps, seeds)
    print("\n" + text)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.name}.json").write_text(json.dumps({"args": vars(args), "seeds": seeds, "accuracy": results},
                                                      indent=2) + "\n")
    (OUT / f"{args.name}.md").write_text(f"# {args.name}\n\n`python bench/discordance.py {' '.join(sys.argv[1:])}`"
                                         f"\n\n{text}")


def table(results: dict[str, list[float]], args, steps: int, seeds: list[int]) -> str:
    """The markdown table: mean ± sd over seeds, each method's difference to
    FedIT paired by seed and the claim it supports; gaps and shares from the means."""
    central = statistics.mean(results["central"])
    fedit = statistics.mean(results["fedit"]) if "fedit" in results else None
    lines = [f"{args.clients} clients, Dirichlet({args.alpha}), {args.rounds} rounds x {args.local_steps} local "
             f"steps, batch 16, LoRA r={args.rank} on q,v, lr {args.lr} (head {args.head_lr}), same for every "
             f"method; mean ± sd over seeds {seeds}", "",
             "| method | final test accuracy | per seed | gap to centralised | vs FedIT, paired by seed | claim "
             "| share of FedIT's gap closed |",
             "|---|---|---|---|---|---|---|",
             f"| centralised LoRA ({steps} steps) | {mean_sd(results['central'])} | "
             f"{', '.join(f'{a:.3f}' for a in results['central'])} | - | - | - | - |"]
    for method, accs in results.items():
        if method == "central":
            continue
        acc = statistics.mean(accs)
        closed = diff = claim = "-"
        if fedit is not None and method != "fedit":
            diffs = paired(dict(zip(seeds, accs)), dict(zip(seeds, results["fedit"])))
            diff, claim = spread(diffs), verdict(diffs, "FedIT")
            if central - fedit > 0:
                closed = f"{(acc - fedit) / (central - fedit):.0%}"
        lines.append(f"| {NAMES.get(method, method)} | {mean_sd(accs)} | {', '.join(f'{a:.3f}' for a in accs)} | "
                     f"{central - acc:+.3f} | {diff} | {claim} | {closed} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
