"""Adapter compression benchmark: bytes of each round's adapter download and
upload, and the final test accuracy, for each ``--adapter-up/--adapter-down``
codec, on the federated built-in task (``fedsplit demo``'s setting: MiniLM,
4 client processes, a Dirichlet(0.5) label split, FedIT, rank 8, cut 1,1).

Every configuration runs the same seed, rounds and local steps. Bytes are
from the clients' round records: ``download_bytes`` (the round offer's frames:
the client-side LoRA factors and the head) and ``upload_bytes`` (the upload's
frames), headers included, averaged over every client's rounds. The final
accuracy is client 0's evaluation of the final global model (which travels
lossless) on the held-out test set.

    python bench/adapter_compression.py [--rounds 5] [--local-steps 10] [--seed 0] [--out bench/results]
        [--only NAME ...]

Writes ``adapter_compression.json`` (every client's round records) and
``adapter_compression.md`` (the table) into ``--out`` after each
configuration; ``--only`` runs the named configurations and keeps the others'
results already in the file (a run takes 4 to 20 minutes on a shared 2-core
machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.data import load_dataset  # noqa: E402
from edge.demo import FederationRun, run_federation  # noqa: E402

# (name, --adapter-up, --adapter-down)
CONFIGS = (
    ("fp32", "fp32", "fp32"),
    ("fp16", "fp16", "fp16"),
    ("topk 0.1 up, fp32 down", "topk:density=0.1", "fp32"),
    ("topk 0.1 both ways", "topk:density=0.1", "topk:density=0.1"),
)


def measure(summaries: list[dict]) -> dict:
    """Mean bytes per client and round, and the final accuracy."""
    records = [r["record"] for s in summaries for r in s["rounds"]]
    # From round 1 the offer carries the head too, so every uploaded tensor is an update.
    later = [r["record"] for s in summaries for r in s["rounds"] if r["round"] >= 1]
    return {"download_bytes": statistics.mean(r["download_bytes"] for r in records),
            "upload_bytes": statistics.mean(r["upload_bytes"] for r in records),
            "upload_bytes_later": statistics.mean(r["upload_bytes"] for r in later) if later else None,
            "final_accuracy": summaries[0]["final_accuracy"],
            "round_accuracy": [r["accuracy"] for r in summaries[0]["rounds"]]}


def table(results: dict, args) -> str:
    base = results["fp32"]
    results = {name: results[name] for name, _, _ in CONFIGS if name in results}
    lines = [f"Adapter compression on the built-in task: MiniLM, 4 clients, FedIT, rank 8, {args.rounds} rounds of "
             f"{args.local_steps} local steps, seed {args.seed} (one seed: a figure, not a claim).", "",
             "| adapters | download B/round | upload B/round | upload B, rounds 1+ | vs fp32 (down / up / up 1+) "
             "| final accuracy | vs fp32 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['download_bytes']:,.0f} | {r['upload_bytes']:,.0f} | "
                     f"{r['upload_bytes_later']:,.0f} | {r['download_bytes'] / base['download_bytes']:.2f}x / "
                     f"{r['upload_bytes'] / base['upload_bytes']:.2f}x / "
                     f"{r['upload_bytes_later'] / base['upload_bytes_later']:.2f}x | {r['final_accuracy']:.1%} | "
                     f"{100 * (r['final_accuracy'] - base['final_accuracy']):+.1f} pt |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--only", nargs="+", choices=[c[0] for c in CONFIGS], default=None,
                        help="run these configurations only, keeping the others' saved results")
    args = parser.parse_args()
    labels = len(load_dataset(None).labels)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "adapter_compression.json"
    results, runs = {}, {}
    if args.only and saved.exists():
        old = json.loads(saved.read_text())
        if old.get("settings") != settings(args):
            raise SystemExit(f"{saved} holds runs of other settings ({old.get('settings')}); run every configuration")
        results, runs = old["results"], old["runs"]
    for name, up, down in CONFIGS:
        if args.only and name not in args.only:
            continue
        started = time.perf_counter()
        run = FederationRun(rounds=args.rounds, local_steps=args.local_steps, seed=args.seed,
                            server_args=("--adapter-up", up, "--adapter-down", down))
        summaries = run_federation(run, labels)
        results[name] = measure(summaries)
        runs[name] = {"adapter_up": up, "adapter_down": down,
                      "clients": [[r["record"] for r in s["rounds"]] for s in summaries]}
        print(f"{name}: {results[name]} ({time.perf_counter() - started:.0f} s)", flush=True)
        saved.write_text(json.dumps({"settings": settings(args), "results": results, "runs": runs}, indent=1))
    if "fp32" not in results:
        raise SystemExit("no fp32 run to compare with: run the fp32 configuration too")
    text = table(results, args)
    (out / "adapter_compression.md").write_text(text)
    print(text)
    return 0


def settings(args) -> dict:
    """What every configuration of one table shares."""
    return {"rounds": args.rounds, "local_steps": args.local_steps, "seed": args.seed}


if __name__ == "__main__":
    raise SystemExit(main())
