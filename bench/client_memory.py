"""Client peak memory with float32, 8-bit and 4-bit frozen weights, and what
4-bit client weights cost in accuracy.

Memory. A Llama-shaped model with Llama-2-7B's blocks (4096 wide, 11,008-wide
MLP, 32 heads), a 32,000-token vocabulary and 3 blocks, random weights, built
locally into the work folder (about 3 GB; kept for the next run). Cut 1,1: the
client holds the token embedding (131M parameters, quantized with the blocks
where weights are 8- or 4-bit), blocks 0 and 2 (405M parameters, nearly all
in linear layers), the final norm and a
2-class head; the server holds block 1 (it runs with ``--quantize 4bit``). Each
plan is one real client process (``edge/measured.py``, the method of
``bench/cost_model.py``) training ``STEPS`` steps with the LoRA of both client
blocks, rank 8, batch 2 x 64 tokens; measured is its peak resident memory
(VmHWM, runtime included), next to ``profiles.cost.predict_memory``'s
prediction. Target: the 4-bit client peak at most 0.4x the float32 one.

Accuracy. The federated demo's task (``fedsplit demo``'s defaults: the
built-in MiniLM, 4 clients, fedit, 5 rounds of 10 local steps, Dirichlet(0.5)
label split) with float32 and with 4-bit client weights (``--quantize 4bit``
on every client; the server stays float32), seeds 0, 1 and 2 (each seed also
draws the data split); the final test accuracy of the global model as client 0
evaluates it with its own weights.

    python bench/client_memory.py                    # both parts, about 30 minutes on 2 busy cores
    python bench/client_memory.py --only memory      # the memory part
    python bench/client_memory.py --only accuracy --runs DIR --resume   # reuse runs kept in DIR

Writes bench/results/client_memory.json and client_memory.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge.measured import measure_plan  # noqa: E402
from profiles.cost import ModelShape, Plan, predict_memory  # noqa: E402
from profiles.quantized import block_linear_params, block_quantized_bytes, quantized_embedding_bytes  # noqa: E402
from profiles.runtime import runtime_baseline  # noqa: E402
from split.launch import running_server  # noqa: E402
from split.partition import load_config  # noqa: E402
from federation_runs import cached_federation  # noqa: E402  (bench/ is sys.path[0] when run as a script)

OUT = ROOT / "bench" / "results"
TARGET = 0.4  # 4-bit client peak over the float32 one
STEPS = 2
THREADS = 1
LLAMA = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=3, num_attention_heads=32,
             num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048, pad_token_id=0,
             bos_token_id=1, eos_token_id=2)
BASE = dict(k1=1, k2=1, rank=8, batch=2, seq_len=64, trainable=frozenset({0, 2}))
PLANS = {
    "float32": Plan(**BASE),
    "8bit": Plan(**BASE, weights="8bit"),
    "4bit": Plan(**BASE, weights="4bit"),
    "bfloat16": Plan(**BASE, dtype="bfloat16"),
    "4bit, rest bfloat16": Plan(**BASE, dtype="bfloat16", weights="4bit"),
}
SEEDS = (0, 1, 2)
MODES = ("none", "4bit")


def llama_model(folder: Path) -> Path:
    """The Llama-shaped model with random weights, saved once into ``folder``."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(LlamaConfig(**LLAMA, num_labels=2))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def weights_split(shape: ModelShape, plan: Plan) -> dict:
    """Client frozen-weight bytes: the embedding's and the blocks' (linear layers and the rest)."""
    elem = 2 if plan.dtype == "bfloat16" else 4
    blocks = [0, shape.num_layers - 1]
    linear = sum(block_linear_params(shape.block_linears[b]) for b in blocks)
    return {"embedding": shape.embedding_params * elem, "block_linear_params": linear,
            "block_other": sum(shape.block_params[b] for b in blocks) * elem - linear * elem,
            "embedding_4bit": quantized_embedding_bytes(*shape.token_embedding, "4bit"),
            "block_linear_4bit": sum(block_quantized_bytes(shape.block_linears[b], "4bit") for b in blocks)}


def run_memory(work: Path, threads: int) -> dict:
    """Every plan against one server; rows with predicted and measured peaks."""
    folder = llama_model(work / "llama-7b-blocks")
    shape = ModelShape.from_config(load_config(folder, "classification", 2, True))
    runtime = runtime_baseline(threads)
    rows = []
    with running_server(folder, "1,1", "--threads", "1", "--log-level", "ERROR", "--quantize", "4bit") as endpoint:
        for name, plan in PLANS.items():
            started = time.perf_counter()
            measured = measure_plan(endpoint, str(folder), plan, steps=STEPS, threads=threads, timeout=1800)
            estimate = predict_memory(shape, plan, runtime=runtime)
            peak = measured["peak_rss"]
            rows.append({"weights": name, "dtype": plan.dtype, "quantize": plan.weights if plan.quantized else "none",
                         "measured": peak, "predicted": estimate.total,
                         "error_pct": 100 * (estimate.total - peak) / peak, "parts": estimate.parts,
                         "peak_loaded": measured["peak_rss_loaded"], "step_seconds": measured["step_seconds"]})
            print(f"{name:22s} measured {peak / 2**20:8.1f} MiB  predicted {estimate.total / 2**20:8.1f} MiB  "
                  f"({rows[-1]['error_pct']:+.1f}%)  step {measured['step_seconds'][-1]:.1f} s  "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    base = rows[0]
    for row in rows:
        row["ratio_to_float32"] = row["measured"] / base["measured"]
        row["step_ratio_to_float32"] = row["step_seconds"][-1] / base["step_seconds"][-1]
    return {"model": dict(LLAMA), "plan": {k: sorted(v) if isinstance(v, frozenset) else v for k, v in BASE.items()},
            "runtime_baseline": runtime, "threads": threads, "steps": STEPS,
            "client_weights": weights_split(shape, PLANS["float32"]), "rows": rows}


def run_accuracy(seeds: tuple[int, ...], work: Path, resume: bool) -> dict:
    """The federated demo with float32 and 4-bit client weights, per seed
    (kept in ``work``: ``bench/federation_runs.py``)."""
    from edge.data import load_dataset
    from edge.demo import FederationRun

    labels = len(load_dataset(None).labels)
    runs = {mode: [] for mode in MODES}
    for seed in seeds:
        for mode in MODES:
            # float32 is the demo's own run: the same settings as bench/compression.py's fp32 codec
            args = () if mode == "none" else ("--quantize", mode)
            r = cached_federation(FederationRun(seed=seed, client_args=args), labels, work, resume)
            runs[mode].append({"seed": seed, "final_accuracy": r["final_accuracy"], "seconds": r["wall_s"]})
            print(f"seed {seed} --quantize {mode:4s}: final accuracy {r['final_accuracy']:.3f} "
                  f"({r['wall_s']:.0f} s)", flush=True)
    out = {"seeds": list(seeds), "runs": runs}
    for mode in MODES:
        values = [r["final_accuracy"] for r in runs[mode]]
        out[mode] = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    diffs = [q["final_accuracy"] - f["final_accuracy"] for f, q in zip(runs["none"], runs["4bit"])]
    out["paired_difference"] = {"per_seed": diffs, "mean": statistics.mean(diffs),
                                "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0}
    return out


def memory_table(memory: dict) -> str:
    rows = memory["rows"]
    lines = ["| client weights | measured peak MiB | x float32 | predicted MiB | error | step s | x float32 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['weights']} | {r['measured'] / 2**20:.0f} | {r['ratio_to_float32']:.2f} | "
                     f"{r['predicted'] / 2**20:.0f} | {r['error_pct']:+.1f}% | {r['step_seconds'][-1]:.1f} | "
                     f"{r['step_ratio_to_float32']:.2f} |")
    four = next(r for r in rows if r["weights"] == "4bit")
    w = memory["client_weights"]
    runtime, base = memory["runtime_baseline"], rows[0]["measured"]
    ratio = four["ratio_to_float32"]
    verdict = "met" if ratio <= TARGET else f"MISSED by {(four['measured'] - TARGET * base) / 2**20:.0f} MiB"
    held = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in sorted(four["parts"].items(), key=lambda kv: -kv[1])
                     if v >= 2**20)
    lines += ["", f"4-bit client peak / float32 client peak: {ratio:.2f} (target <= {TARGET}: {verdict}).",
              f"What the float32 client holds: the token embedding {w['embedding'] / 2**20:.0f} MiB (4-bit: "
              f"{w['embedding_4bit'] / 2**20:.0f} MiB), its two blocks' linear weights "
              f"{w['block_linear_params'] * 4 / 2**20:.0f} MiB (4-bit: {w['block_linear_4bit'] / 2**20:.0f} MiB), "
              f"their norms {w['block_other'] / 2**20:.2f} MiB; the runtime (interpreter and libraries) "
              f"{runtime / 2**20:.0f} MiB.",
              f"What the 4-bit client's peak holds (predicted parts, MiB): {held}; measured peak while loading "
              f"{four['peak_loaded'] / 2**20:.0f} MiB. Above the runtime, 4-bit takes "
              f"{(four['measured'] - runtime) / (base - runtime):.2f}x the float32 client's memory."]
    return "\n".join(lines)


def accuracy_table(acc: dict) -> str:
    lines = ["| client weights | " + " | ".join(f"seed {s}" for s in acc["seeds"]) + " | mean ± std |",
             "|---|" + "---:|" * (len(acc["seeds"]) + 1)]
    for mode, label in (("none", "float32"), ("4bit", "4bit")):
        values = " | ".join(f"{r['final_accuracy']:.3f}" for r in acc["runs"][mode])
        lines.append(f"| {label} | {values} | {acc[mode]['mean']:.3f} ± {acc[mode]['std']:.3f} |")
    d = acc["paired_difference"]
    lines += ["", f"4-bit minus float32, paired by seed: {d['mean'] * 100:+.1f} ± {d['std'] * 100:.1f} accuracy "
              f"points ({', '.join(f'{x * 100:+.1f}' for x in d['per_seed'])})."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["memory", "accuracy"], default=None, help="run one part")
    parser.add_argument("--work", default=str(OUT / "client_memory" / "work"),
                        help="folder for the Llama-shaped model (about 3 GB; kept for the next run)")
    parser.add_argument("--out", default=str(OUT), help="folder for client_memory.json and client_memory.md")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads of each client process")
    parser.add_argument("--runs", default=None, help="folder keeping each federated run (default: a temporary "
                        "folder); the same folder as bench/compression.py's --work shares the float32 runs")
    parser.add_argument("--resume", action="store_true", help="reuse the runs already in --runs")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "client_memory.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    if args.only in (None, "memory"):
        results["memory"] = run_memory(Path(args.work), args.threads)
    if args.only in (None, "accuracy"):
        runs = Path(args.runs or tempfile.mkdtemp(prefix="fedsplit-client-memory-"))
        results["accuracy"] = run_accuracy(SEEDS, runs, args.resume)
    path.write_text(json.dumps(results, indent=2))
    parts = ["# Client memory and accuracy with quantized frozen weights\n",
             "Written by `python bench/client_memory.py` (see its docstring for the setup).\n"]
    if "memory" in results:
        parts += ["## Client peak memory (Llama-2-7B-shaped blocks, 32k vocabulary, 2 client blocks)\n",
                  memory_table(results["memory"]) + "\n"]
    if "accuracy" in results:
        parts += ["## Final test accuracy of the federated demo task (MiniLM, 4 clients, fedit, 5 rounds)\n",
                  accuracy_table(results["accuracy"]) + "\n"]
    (out / "client_memory.md").write_text("\n".join(parts))
    print("\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
