"""How much of FedIT's gap to centralised LoRA do the exact methods close?

On the built-in task (MiniLM, 10 classes), 8 clients with a Dirichlet(0.3)
label split train the same budget: R rounds of S local steps each. Centralised
LoRA trains the same number of steps (8 x R x S, batch 16) through one split
client on all the training data. Every run uses real processes on loopback.
Prints each method's final test accuracy and its gap to centralised.

    python bench/discordance.py [--rounds 5] [--local-steps 8] [--methods fedit,fedex,flora,ffa,rolora]
"""

from __future__ import annotations

import argparse
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


def centralised(steps: int, lr: float, head_lr: float, rank: int) -> float:
    with running_server(None, "1,1") as endpoint:
        config = ClientConfig(server=endpoint, lora=LoraSpec(rank, 2.0 * rank), lr=lr, head_lr=head_lr)
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
    args = parser.parse_args()
    num_labels = len(load_dataset(None).labels)
    steps = args.clients * args.rounds * args.local_steps
    rows = []
    start = time.perf_counter()
    central = centralised(steps, args.lr, args.head_lr, args.rank)
    print(f"centralised LoRA, {steps} steps: {central:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    for method in args.methods.split(","):
        start = time.perf_counter()
        run = FederationRun(strategy=method, clients=args.clients, rounds=args.rounds, local_steps=args.local_steps,
                            alpha=args.alpha, ranks=[args.rank], lr=args.lr, head_lr=args.head_lr)
        summaries = run_federation(run, num_labels)
        acc = summaries[0]["final_accuracy"]
        curve = [r["accuracy"] for r in summaries[0]["rounds"]] + [acc]
        rows.append((method, acc, curve))
        print(f"{NAMES.get(method, method)}: {acc:.3f} ({time.perf_counter() - start:.0f} s), "
              f"per round {[round(c, 3) for c in curve]}", flush=True)
    fedit = next((a for m, a, _ in rows if m == "fedit"), None)
    print(f"\n{args.clients} clients, Dirichlet({args.alpha}), {args.rounds} rounds x {args.local_steps} local steps, "
          f"batch 16, LoRA r={args.rank} on q,v, lr {args.lr} (head {args.head_lr}), same for every method\n")
    print("| method | final test accuracy | gap to centralised | share of FedIT's gap closed |")
    print("|---|---|---|---|")
    print(f"| centralised LoRA ({steps} steps) | {central:.3f} | - | - |")
    for method, acc, _ in rows:
        closed = "-"
        if fedit is not None and method != "fedit" and central - fedit > 0:
            closed = f"{(acc - fedit) / (central - fedit):.0%}"
        print(f"| {NAMES.get(method, method)} | {acc:.3f} | {central - acc:+.3f} | {closed} |")


if __name__ == "__main__":
    main()
