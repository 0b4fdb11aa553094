"""Wire codecs side by side: bytes, accuracy, reconstruction error and step
time on an edge link, every codec in one run on the same seeds and budget.

Each codec is used both ways (``--codec-up C --codec-down C``): up, the
hidden state of the forward and the gradient of the backward; down, the
server's replies. Top-k runs without error feedback (its default) and with
it (``ef=1``: the sender keeps what it left out and adds it to the next
step's tensor).

1. **Reconstruction error** on real MiniLM tensors at the cut 1,1, one batch
   of the built-in data (16 samples, up to 64 tokens): the hidden state the
   client sends (block 0's output) and the one the server returns (block 4's),
   the gradient the client sends (at block 4's output) and the one it gets back
   (at block 0's output); relative L2 error ``|x - x'| / |x|`` and the largest
   absolute error relative to ``max |x|``, of one encoding
   (``split.codecs.roundtrip``; for top-k, one step without the residual of
   earlier ones).
2. **Bytes and step time on an emulated edge link** (20 Mbit/s up, 50 Mbit/s
   down, 20 ms round trip, with a Raspberry Pi 5's compute; ``edge.emulate``):
   one client per codec against one ``fedsplit server`` process on loopback,
   the clients taking turns on the same batches of the built-in data (16 x up
   to 64 tokens) so that drift in the machine's load hits every codec alike.
   Bytes per step are the connection's frame counters
   (``edge.metering.StepMeter``), headers included, beside the cost model's
   prediction (``profiles.cost.step_bytes`` at the batch's shape). A step's
   time is the median of its emulated time: the client's compute on one
   thread, timed by that thread's CPU time and scaled to the Pi 5 (the codec's
   own work included), plus the link's delays on its four messages; the
   server's compute is left out (it stands for a GPU machine, and here shares
   two cores with everything else). The wall-clock of the steps here is
   reported beside.
3. **Accuracy**: the federated task ``fedsplit demo`` runs (4 clients,
   fedit, 5 rounds of 10 local steps, Dirichlet(0.5) split of the built-in
   task), once per codec and seed; the final test accuracy against the
   lossless run of the same seed (paired differences: mean and spread).

Targets: fp16 at most 0.51x the bytes and within 0.3 accuracy
points; int8 at most 0.26x and within 1 point; top-k at 10% with error
feedback within 2 points; int8's step time on the link at most 0.4x fp32's.

    python bench/compression.py [--seeds 0,1,2] [--seeded fp32,int8,topk:density=0.1,topk:density=0.1,ef=1]
        [--codecs ...] [--link-steps 8] [--device pi5] [--rounds 5] [--local-steps 10]
        [--out bench/results] [--work DIR [--resume]]

``--seeded`` codecs run every seed, the others the first seed only (the
accuracy of a run moves by points from seed to seed, so the paired difference
is what is compared). Writes ``compression.json`` and ``compression.md`` into
``--out``; each federated run's result is kept in ``--work`` as it finishes,
so ``--resume`` goes on after an interruption.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.client import ClientConfig, SplitClient  # noqa: E402
from edge.data import Batches, load_dataset  # noqa: E402
from edge.demo import FederationRun  # noqa: E402
from edge.emulate import EmulatedDevice, host_speed  # noqa: E402
from edge.metering import StepMeter  # noqa: E402
from edge.tokenizer import load_tokenizer  # noqa: E402
from profiles.cost import ModelShape, Plan, step_bytes  # noqa: E402
from profiles.schema import resolve_profile  # noqa: E402
from split.codecs import parse_codec, roundtrip, split_codec_list  # noqa: E402
from split.launch import running_server  # noqa: E402
from split.lora import LoraSpec  # noqa: E402
from split.partition import Cut, load_config, resolve_model_path  # noqa: E402
from federation_runs import cached_federation  # noqa: E402  (bench/ is sys.path[0] when run as a script)

ROOT = Path(__file__).resolve().parents[1]
CODECS = ("fp32", "fp16", "bf16", "int8", "int8:outliers=4", "nf4", "topk:density=0.1", "topk:density=0.1,ef=1")
SEEDED = ("fp32", "int8", "topk:density=0.1", "topk:density=0.1,ef=1")
UPLINK_MBPS, DOWNLINK_MBPS, RTT_MS = 20.0, 50.0, 20.0
BATCH, MAX_LENGTH = 16, 64
CUT = Cut(1, 1)
# The targets: bytes ratio (total), accuracy drop in points, step-time ratio on the link.
TARGETS = {"fp16": {"bytes": 0.51, "points": 0.3}, "int8": {"bytes": 0.26, "points": 1.0, "step": 0.4},
           "topk:density=0.1,ef=1": {"points": 2.0}}


# ---------------------------------------------------------------- data


def builtin_batches(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``count`` training batches of the built-in task, as a client makes them."""
    path = resolve_model_path(None)
    dataset = load_dataset(None, seed=seed)
    tokenizer = load_tokenizer(path, load_config(path, "classification", 2, True).vocab_size, default=True)
    batches = Batches(dataset.train, dataset, tokenizer, MAX_LENGTH, BATCH, shuffle=True, seed=seed)
    out = []
    for batch in batches:
        if len(out) == count:
            break
        out.append(batch)
    return out


def num_labels() -> int:
    return len(load_dataset(None).labels)


# ---------------------------------------------------------------- 1. reconstruction


def cut_tensors(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MiniLM's real tensors at the cut 1,1 for ``batch``: what the client
    sends (hidden up, grad up) and what the server returns (hidden down,
    grad down), from one forward and backward of the whole model."""
    from transformers import AutoModelForSequenceClassification

    path = resolve_model_path(None)
    torch.manual_seed(0)
    config = load_config(path, "classification", num_labels(), dropout=False)
    model = AutoModelForSequenceClassification.from_pretrained(path, config=config)
    model.train()
    blocks = model.bert.encoder.layer
    low, high = CUT.front - 1, len(blocks) - CUT.back - 1  # the blocks whose outputs cross the cut
    outputs = {}

    def keep(index):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden.retain_grad()
            outputs[index] = hidden
        return hook

    handles = [blocks[i].register_forward_hook(keep(i)) for i in (low, high)]
    try:
        model(**batch).loss.backward()
    finally:
        for h in handles:
            h.remove()
    return {"hidden up": outputs[low].detach(), "hidden down": outputs[high].detach(),
            "grad up": outputs[high].grad.detach(), "grad down": outputs[low].grad.detach()}


def reconstruction(tensors: dict[str, torch.Tensor], codecs) -> dict[str, dict[str, dict[str, float]]]:
    """codec -> tensor -> relative L2 error and largest error over ``max |x|``."""
    out = {}
    for text in codecs:
        spec = parse_codec(text)
        out[text] = {}
        for name, x in tensors.items():
            err = (roundtrip(x, spec).float() - x.float())
            out[text][name] = {"rel_l2": float(err.norm() / x.float().norm()),
                               "max_rel": float(err.abs().max() / x.float().abs().max())}
    return out


# ---------------------------------------------------------------- 2. the link


def link_profile(device: str):
    """``device``'s compute (a built-in profile or a .toml file) on the benchmark's edge link."""
    base = resolve_profile(device)
    return dataclasses.replace(
        base, name=f"{base.name} compute on a {UPLINK_MBPS:g}/{DOWNLINK_MBPS:g} Mbit/s link",
        uplink_mbps=UPLINK_MBPS, downlink_mbps=DOWNLINK_MBPS, rtt_ms=RTT_MS, memory_gb=64.0,
        sources={**base.sources, "memory_gb": "not limited here", "uplink_mbps": "the benchmark's edge link",
                 "downlink_mbps": "the benchmark's edge link", "rtt_ms": "the benchmark's edge link"})


def link_steps(codecs, steps: int, warmup: int, device: str = "pi5") -> tuple[dict[str, dict], dict]:
    """One emulated client per codec, taking turns on the same batches
    against one server process; per codec the step records after warm-up.

    The clients compute on one thread, timed by its CPU time (``clock="cpu"``),
    so the device-equivalent compute does not grow with the load of this shared
    machine; a step's emulated time is that compute plus the link's delays on
    its four messages (the emulator's training counters). The server's compute
    is left out of it (the server stands for a GPU machine, and here shares the
    cores with everything else); its wall-clock, with the server's compute, is
    reported beside."""
    path = resolve_model_path(None)
    labels = num_labels()
    batches = builtin_batches(warmup + steps)
    shape = ModelShape.from_config(load_config(path, "classification", labels, True), num_labels=labels)
    records: dict[str, list] = {c: [] for c in codecs}
    emulated: dict[str, list] = {c: [] for c in codecs}
    predicted: dict[str, list] = {c: [] for c in codecs}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        profile, host = link_profile(device), host_speed("cpu", torch.float32, "cpu", seconds=1.0)
        with running_server(path, str(CUT), "--num-labels", str(labels)) as endpoint:
            clients = {}
            try:
                for text in codecs:
                    config = ClientConfig(server=endpoint, num_labels=labels, cut=CUT, lora=LoraSpec(8, 16.0),
                                          lr=5e-3, head_lr=2e-2, client_id=f"link-{len(clients)}", codec_up=text,
                                          codec_down=text)
                    clients[text] = SplitClient(config, EmulatedDevice(profile, host, clock="cpu"))
                for i, batch in enumerate(batches):
                    for text, client in clients.items():
                        before = client.emulator.counters()
                        _, record = StepMeter(client).measure(lambda: client.train_step(batch))
                        if i >= warmup:
                            records[text].append(record)
                            emulated[text].append(client.emulator.counters() - before)
                            B, S = batch["input_ids"].shape
                            predicted[text].append(step_bytes(shape, Plan(CUT.front, CUT.back, 8, B, S,
                                                                          codec_up=text, codec_down=text)))
            finally:
                for client in clients.values():
                    client.close()
    finally:
        torch.set_num_threads(threads)
    out = {}
    for text in codecs:
        rs, es = records[text], emulated[text]
        out[text] = {"bytes_up": statistics.mean(r.bytes_up for r in rs),
                     "bytes_down": statistics.mean(r.bytes_down for r in rs),
                     "predicted_up": statistics.mean(p[0] for p in predicted[text]),
                     "predicted_down": statistics.mean(p[1] for p in predicted[text]),
                     "step_s": statistics.median(e.train_s for e in es),
                     "compute_s": statistics.median(e.train_compute_s for e in es),
                     "link_s": statistics.median(e.train_network_s for e in es),
                     "wall_s": statistics.median(r.seconds for r in rs),
                     "server_s": statistics.median(r.server_s for r in rs),
                     "steps": len(rs)}
    return out, {"profile": resolve_profile(device).name, "device_gflops": profile.gflops_fp32, "host_gflops": host}


# ---------------------------------------------------------------- 3. accuracy


def federated(codec: str, seed: int, work: Path, resume: bool, rounds: int, local_steps: int) -> dict:
    """The demo's federation with ``codec`` both ways, kept in ``work``
    (``bench/federation_runs.py``; read back with ``resume``)."""
    run = FederationRun(strategy="fedit", clients=4, rounds=rounds, local_steps=local_steps, alpha=0.5, ranks=[8],
                        lr=5e-3, head_lr=2e-2, seed=seed, codec_up=codec, codec_down=codec)
    return {"codec": codec, "seed": seed, **cached_federation(run, num_labels(), work, resume)}


def accuracy_table(runs: list[dict], codecs) -> dict[str, dict]:
    """Per codec: final accuracies, and the paired differences in points
    against fp32 of the same seed."""
    lossless = {r["seed"]: r["final_accuracy"] for r in runs if r["codec"] == "fp32"}
    out = {}
    for codec in codecs:
        mine = [r for r in runs if r["codec"] == codec]
        diffs = [100 * (r["final_accuracy"] - lossless[r["seed"]]) for r in mine if r["seed"] in lossless]
        accs = [r["final_accuracy"] for r in mine]
        out[codec] = {"seeds": [r["seed"] for r in mine], "accuracy": accs,
                      "accuracy_mean": statistics.mean(accs),
                      "accuracy_sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                      "diff_points": diffs, "diff_mean": statistics.mean(diffs),
                      "diff_sd": statistics.stdev(diffs) if len(diffs) > 1 else 0.0}
    return out


# ---------------------------------------------------------------- the report


def targets(link: dict, accuracy: dict) -> list[dict]:
    """Each target: what it asks, what was measured, met or not."""
    base = link["fp32"]
    rows = []
    for codec, want in TARGETS.items():
        if codec not in link:
            continue
        if "bytes" in want:
            ratio = (link[codec]["bytes_up"] + link[codec]["bytes_down"]) / (base["bytes_up"] + base["bytes_down"])
            rows.append({"codec": codec, "what": "bytes per step / fp32", "target": f"<= {want['bytes']}",
                         "measured": f"{ratio:.3f}", "met": ratio <= want["bytes"]})
        if "points" in want and codec in accuracy:
            drop = -accuracy[codec]["diff_mean"]
            rows.append({"codec": codec, "what": "accuracy drop vs fp32, points (mean of paired seeds)",
                         "target": f"<= {want['points']}", "measured": f"{drop:+.2f}",
                         "met": drop <= want["points"]})
        if "step" in want:
            ratio = link[codec]["step_s"] / base["step_s"]
            rows.append({"codec": codec, "what": "step time on the link / fp32", "target": f"<= {want['step']}",
                         "measured": f"{ratio:.3f}", "met": ratio <= want["step"]})
    return rows


def markdown(result: dict) -> str:
    link, acc, rec = result["link"], result["accuracy"], result["reconstruction"]
    base = link["fp32"]
    base_total = base["bytes_up"] + base["bytes_down"]
    lines = ["# Compression benchmark", "",
             f"MiniLM (all-MiniLM-L6-v2), cut {CUT}, the built-in task, batch {BATCH} x up to {MAX_LENGTH} tokens; "
             f"each codec both ways. Link: {UPLINK_MBPS:g} Mbit/s up, {DOWNLINK_MBPS:g} Mbit/s down, "
             f"{RTT_MS:g} ms round trip, with the compute of {result['device']['profile']} "
             f"({result['device']['device_gflops']:g} GFLOP/s; this host: {result['device']['host_gflops']:.1f} on "
             "one thread) (edge.emulate, CPU clock); "
             f"{result['link_steps']} timed steps per codec after {result['warmup']} warm-up, codecs taking turns; "
             "a step's time is the client's emulated compute plus the link's delays (the server's compute, a GPU "
             "machine's, left out; the wall-clock on this shared machine, with it, beside). "
             f"Accuracy: `fedsplit demo`'s federation (4 clients, fedit, {result['rounds']} rounds of "
             f"{result['local_steps']} local steps, Dirichlet(0.5)), "
             f"seeds {', '.join(map(str, result['seeds']))} for {', '.join(result['seeded'])}, seed "
             f"{result['seeds'][0]} for the others; differences are paired with fp32's run of the same seed.", "",
             "| codec | bytes up / step | bytes down / step | total / fp32 | predicted / measured | "
             "step s on the link | / fp32 | final accuracy | vs fp32, points |",
             "|---|---|---|---|---|---|---|---|---|"]
    for codec, r in link.items():
        total = r["bytes_up"] + r["bytes_down"]
        predicted = (r["predicted_up"] + r["predicted_down"]) / total
        a = acc.get(codec)
        if a is None:
            accuracy_text = diff_text = "-"
        else:
            n = len(a["accuracy"])
            accuracy_text = f"{a['accuracy_mean']:.3f}" + (f" ± {a['accuracy_sd']:.3f} (n={n})" if n > 1 else "")
            diff_text = f"{a['diff_mean']:+.2f}" + (f" ± {a['diff_sd']:.2f}" if n > 1 else "")
        lines.append(f"| {codec} | {r['bytes_up'] / 1e6:.3f} MB | {r['bytes_down'] / 1e6:.3f} MB | "
                     f"{total / base_total:.3f} | {predicted:.4f} | {r['step_s']:.3f} | "
                     f"{r['step_s'] / base['step_s']:.3f} | {accuracy_text} | {diff_text} |")
    lines += ["", "Step time on the link (medians, s): the client's emulated compute, the link's delays, their sum; "
                  "the wall-clock of the step here and the server's compute in it:",
              "", "| codec | compute | link | step | wall-clock | server |", "|---|---|---|---|---|---|"]
    for codec, r in link.items():
        lines.append(f"| {codec} | {r['compute_s']:.3f} | {r['link_s']:.3f} | {r['step_s']:.3f} | {r['wall_s']:.3f} | "
                     f"{r['server_s']:.3f} |")
    names = list(next(iter(rec.values())))
    lines += ["", "Reconstruction error of one encoding on real MiniLM tensors at the cut (relative L2; largest "
                  "error over max |x|):", "",
              "| codec | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for codec, r in rec.items():
        lines.append(f"| {codec} | " + " | ".join(f"{r[n]['rel_l2']:.2e}; {r[n]['max_rel']:.2e}" for n in names)
                     + " |")
    lines += ["", "Targets:", "", "| codec | what | target | measured | met |", "|---|---|---|---|---|"]
    for t in result["targets"]:
        lines.append(f"| {t['codec']} | {t['what']} | {t['target']} | {t['measured']} | "
                     f"{'yes' if t['met'] else '**missed**'} |")
    runs_min = sum(r["wall_s"] for r in result["runs"]) / 60
    lines += ["", f"This invocation: {result['wall_s'] / 60:.0f} min; the {len(result['runs'])} federated runs took "
                  f"{runs_min:.0f} min in all when they ran (a run kept in `--work` is read back with `--resume`). "
                  f"`{result['command']}`", ""]
    return "\n".join(lines)


def _codec_list(text: str) -> list[str]:
    try:
        out = [parse_codec(t).text for t in split_codec_list(text)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codecs", type=_codec_list, default=list(CODECS), help="codecs to compare (fp32 first)")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the --seeded codecs' federations")
    parser.add_argument("--seeded", type=_codec_list, default=list(SEEDED), help="codecs run on every seed")
    parser.add_argument("--link-steps", type=int, default=8, help="timed steps per codec on the emulated link")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per codec first")
    parser.add_argument("--device", default="pi5", help="device profile whose compute the link's client emulates")
    parser.add_argument("--rounds", type=int, default=5, help="federated rounds (the demo's 5)")
    parser.add_argument("--local-steps", type=int, default=10, help="local steps per round (the demo's 10)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--work", default=None, help="each federated run's result and logs (default: a temporary "
                                                     "folder)")
    parser.add_argument("--resume", action="store_true", help="reuse the runs already in --work")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    codecs = [parse_codec(c).text for c in args.codecs]
    if codecs[0] != "fp32":
        parser.error("--codecs must start with fp32: every figure is relative to it")
    started = time.perf_counter()
    work = Path(args.work or tempfile.mkdtemp(prefix="fedsplit-compression-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {work}", flush=True)

    rec = reconstruction(cut_tensors(builtin_batches(1)[0]), codecs)
    print("reconstruction error done", flush=True)
    link, device = link_steps(codecs, args.link_steps, args.warmup, args.device)
    for codec, r in link.items():
        print(f"link {codec}: {(r['bytes_up'] + r['bytes_down']) / 1e6:.3f} MB/step, {r['step_s']:.3f} s/step",
              flush=True)
    runs = []
    for seed in seeds:
        for codec in codecs:
            if seed != seeds[0] and codec not in args.seeded:
                continue
            r = federated(codec, seed, work, args.resume, args.rounds, args.local_steps)
            runs.append(r)
            print(f"federation {codec} seed {seed}: final accuracy {r['final_accuracy']:.3f} "
                  f"({r['wall_s']:.0f} s)", flush=True)
    accuracy = accuracy_table(runs, codecs)
    command = "python bench/compression.py" + (f" {' '.join(sys.argv[1:])}" if argv is None and sys.argv[1:] else "")
    result = {"codecs": codecs, "seeds": seeds, "seeded": [c for c in codecs if c in args.seeded],
              "link_steps": args.link_steps, "warmup": args.warmup, "rounds": args.rounds,
              "local_steps": args.local_steps, "threads": torch.get_num_threads(),
              "link_mbps": [UPLINK_MBPS, DOWNLINK_MBPS], "rtt_ms": RTT_MS, "device": device, "reconstruction": rec, "link": link,
              "runs": runs, "accuracy": accuracy, "targets": targets(link, accuracy),
              "wall_s": time.perf_counter() - started, "command": command}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compression.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "compression.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
