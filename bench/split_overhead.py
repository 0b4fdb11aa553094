"""Split step versus monolithic step, measured side by side in one run.

For each model: (a) the monolithic peft training step (forward, backward,
AdamW step) in this process; (b) the split step, with this process as the
client and a ``fedsplit server`` process on loopback. Same model, LoRA, batch
and data; warm-up steps first, then the median of several timed steps. Prints
both times, the ratio (b)/(a) and the bytes the client moved per step.

    python bench/split_overhead.py [--repeats 15] [--models minilm,gpt2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, GPT2Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.client import ClientConfig, SplitClient  # noqa: E402
from split.launch import running_server  # noqa: E402
from split.families import family_for  # noqa: E402
from split.lora import LoraSpec, attach_lora  # noqa: E402
from split.partition import Cut, load_config, resolve_model_path  # noqa: E402

BATCH, TOKENS, LABELS = 16, 64, 4
SPEC = LoraSpec(rank=8, alpha=16.0)


def gpt2_12x768(folder: Path) -> Path:
    """A random GPT-2 with 12 blocks of width 768 (the GPT-2 small shape)."""
    config = GPT2Config(n_embd=768, n_layer=12, n_head=12, pad_token_id=50256, num_labels=LABELS)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    return folder


def batch_for(vocab: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1000, vocab - 1, (BATCH, TOKENS), generator=gen),
            "attention_mask": torch.ones(BATCH, TOKENS, dtype=torch.long),
            "labels": torch.randint(0, LABELS, (BATCH,), generator=gen)}


def timed_side_by_side(steps: dict, batches, warmup: int) -> dict[str, list[float]]:
    """Alternate the steps on each batch so that drift in the machine's speed
    hits every variant alike; returns the timings after warm-up."""
    times = {name: [] for name in steps}
    for i, batch in enumerate(batches):
        for name, step in steps.items():
            start = time.perf_counter()
            step(batch)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def monolithic_step(path: Path):
    config = load_config(path, "classification", LABELS, dropout=True)
    fam = family_for(config)
    model = AutoModelForSequenceClassification.from_pretrained(path, config=config)
    model = attach_lora(model, SPEC, fam, "classification", 0, modules_to_save=fam.trained_heads("classification"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    model.train()

    def step(batch):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure(name: str, path: Path, repeats: int, warmup: int) -> dict:
    vocab = load_config(path, "classification", LABELS, True).vocab_size
    batches = [batch_for(vocab, i) for i in range(warmup + repeats)]
    mono_step = monolithic_step(path)
    with running_server(path, "1,1", "--num-labels", str(LABELS)) as endpoint:
        client = SplitClient(ClientConfig(server=endpoint, model=str(path), cut=Cut(1, 1), num_labels=LABELS,
                                          lora=SPEC, lr=1e-4, weight_decay=0.0))
        try:
            before = client.conn.bytes_sent + client.conn.bytes_received
            times = timed_side_by_side({"monolithic": mono_step, "split": client.train_step}, batches, warmup)
            per_step = (client.conn.bytes_sent + client.conn.bytes_received - before) / len(batches)
        finally:
            client.close()
    mono, split = statistics.median(times["monolithic"]), statistics.median(times["split"])
    ratios = [s / m for s, m in zip(times["split"], times["monolithic"])]
    return {"model": name, "monolithic_s": mono, "split_s": split, "ratio": split / mono,
            "pair_ratio": statistics.median(ratios), "bytes": per_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--models", default="minilm,gpt2")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if name == "minilm":
                path = resolve_model_path(None)
                label = "all-MiniLM-L6-v2 (6 x 384)"
            elif name == "gpt2":
                path = gpt2_12x768(Path(tmp) / "gpt2")
                label = "GPT-2 config (12 x 768)"
            else:
                raise SystemExit(f"unknown model {name!r}: use minilm, gpt2")
            rows.append(measure(label, path, args.repeats, args.warmup))
            r = rows[-1]
            print(f"{r['model']}: monolithic {r['monolithic_s'] * 1e3:.1f} ms, split {r['split_s'] * 1e3:.1f} ms, "
                  f"ratio {r['ratio']:.3f}", flush=True)
    print(f"\nbatch {BATCH} x {TOKENS} tokens, LoRA r={SPEC.rank} on attention q,v, cut 1,1, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} steps after {args.warmup} warm-up\n")
    print("| model | monolithic step | split step | ratio of medians | median of paired ratios | client bytes per step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['monolithic_s'] * 1e3:.1f} ms | {r['split_s'] * 1e3:.1f} ms | "
              f"{r['ratio']:.3f} | {r['pair_ratio']:.3f} | {r['bytes'] / 1e6:.2f} MB |")


if __name__ == "__main__":
    main()
