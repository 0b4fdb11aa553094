"""A plan run for real: one client process training a few steps through a
server, reporting its peak resident memory, bytes per step and step time.

The client runs in a process of its own (``python -m edge.measured``), so
its peak (VmHWM, ``edge/meter.py``) is the client's alone, runtime included:
the figure ``profiles.cost.predict_memory`` predicts. Batches are random token
ids padded the way fedsplit pads a batch (to its longest sample, here always
``seq_len`` long), so the attention mask is real. The client trains the LoRA of
the plan's client blocks only, as a federated client given those blocks does
(``edge/federated.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from split.launch import child_env

from profiles.cost import Plan


def plan_args(plan: Plan) -> list[str]:
    """The worker's command-line arguments for ``plan``."""
    return ["--cut", f"{plan.k1},{plan.k2}", "--rank", str(plan.rank), "--batch", str(plan.batch),
            "--seq-len", str(plan.seq_len), "--trainable", ",".join(map(str, sorted(plan.trainable))),
            "--dtype", plan.dtype, "--quantize", plan.weights if plan.quantized else "none"]


def measure_plan(endpoint: str, model: str | None, plan: Plan, steps: int = 3, threads: int = 1,
                 num_labels: int = 2, timeout: float = 600.0) -> dict:
    """Run ``plan`` in a fresh client process against the server at
    ``endpoint``; returns what the worker reports (``peak_rss``, ``step_bytes``,
    ``step_seconds``, ...). ``model``: a folder (None: the built-in MiniLM)."""
    cmd = [sys.executable, "-m", "edge.measured", "--server", endpoint, "--steps", str(steps),
           "--threads", str(threads), "--num-labels", str(num_labels), *plan_args(plan)]
    if model is not None:
        cmd += ["--model", str(model)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"the client of plan {plan} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _batch(gen, vocab: int, batch: int, seq_len: int, num_labels: int) -> dict:
    """Random ids, right-padded: the first sample is ``seq_len`` long, the
    others between half and all of it."""
    import torch

    lengths = torch.randint(max(1, seq_len // 2), seq_len + 1, (batch,), generator=gen)
    lengths[0] = seq_len
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    ids = torch.randint(3, vocab, (batch, seq_len), generator=gen).masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, num_labels, (batch,), generator=gen)}


def _train_only(client, blocks: set[int]) -> None:
    """Let the LoRA of ``blocks`` (and the trained head) train; a fresh AdamW over them."""
    import torch

    from .federated import head_params
    from split.families import block_of
    from split.lora import lora_layers, set_trainable

    modules = {m for m in lora_layers(client.model) if block_of(m) in blocks}
    lora = set_trainable(client.model, "both", modules=modules)
    head = list(head_params(client).values())
    groups = [g for g in ({"params": lora}, {"params": head}) if g["params"]]
    client.optimizer = torch.optim.AdamW(groups, lr=client.config.lr)


def worker(args) -> dict:
    """The client process: join, train ``--steps`` steps, report."""
    import torch

    torch.set_num_threads(args.threads)
    from .client import ClientConfig, SplitClient
    from .meter import current_rss, peak_rss
    from split.lora import LoraSpec
    from split.partition import Cut, load_config, resolve_model_path

    vocab = load_config(resolve_model_path(args.model), "classification", args.num_labels, True).vocab_size
    config = ClientConfig(server=args.server, model=args.model, cut=Cut.parse(args.cut), num_labels=args.num_labels,
                          lora=LoraSpec(args.rank, 2.0 * args.rank), dtype=args.dtype, quantize=args.quantize,
                          client_id=f"cost-model-{os.getpid()}", timeout=300.0)
    client = SplitClient(config)
    loaded = peak_rss()
    try:
        _train_only(client, {int(b) for b in args.trainable.split(",") if b})
        gen = torch.Generator().manual_seed(0)
        seconds, sent, received = [], [], []
        for _ in range(args.steps):
            batch = _batch(gen, vocab, args.batch, args.seq_len, args.num_labels)
            up, down, started = client.conn.bytes_sent, client.conn.bytes_received, time.perf_counter()
            client.train_step(batch)
            seconds.append(time.perf_counter() - started)
            sent.append(client.conn.bytes_sent - up)
            received.append(client.conn.bytes_received - down)
        return {"peak_rss": peak_rss(), "rss_after": current_rss(), "peak_rss_loaded": loaded,
                "step_bytes": [sent[-1], received[-1]], "step_seconds": seconds, "threads": torch.get_num_threads()}
    finally:
        client.close()


def main() -> None:
    p = argparse.ArgumentParser(description="one client process measuring a plan (edge.measured)")
    p.add_argument("--server", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--cut", required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--trainable", default="")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quantize", default="none")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--num-labels", type=int, default=2)
    args = p.parse_args()
    print(json.dumps(worker(args)), flush=True)


if __name__ == "__main__":
    main()
