"""Planner benchmark: does giving each device its own plan pay off?

One federation on the built-in task with one emulated client per device
(``fedsplit client --profile NAME --emulate NAME``, as ``fedsplit demo
--devices`` runs them), in three configurations:

- planned: each device its own plan (``profiles.planner``);
- uniform: every device the weakest device's settings (cut, rank, blocks,
  batch), the weakest being the slowest on the planner's common reference plan;
- naive: every device the strongest device's settings.

For each it reports the emulated time to reach the uniform run's final
accuracy, the final accuracy, the straggler ratio and every client over its
memory budget. Target: planned reaches that accuracy in at most 0.8x the
uniform run's emulated time, with no client over budget.

How time is measured. The devices are emulated concurrently on this machine,
whose two cores the server, every client and other work share, so real
wall-clock measures the machine's load as much as the devices. Each round's
emulated time is instead the slowest selected client's *busy time* in that
round, from its round record: its compute as the device would take it (the
CPU time of its one thread x host GFLOP/s / device GFLOP/s, so a core shared
with others does not lengthen it) plus the delays its emulated link imposed on
its messages (fixed by the bytes and the profile). The server's compute is left
out: the server stands for a GPU machine, whose compute for these small models
is negligible next to a 20 Mbit/s link, while here it shares two cores with
every client. Evaluation of the global model runs at host speed and is not
counted (``--emulate-evaluation host``). Accuracy after r rounds is reached at
the sum of the first r rounds' times.

The straggler ratio is the slowest over the fastest client's mean step time
(device compute plus link delays inside its training steps). A client over
budget is reported, not ended: clients run with ``--emulate-memory report``.

    python bench/planner.py [--devices workstation,agx-orin,pi5,jetson-nano] [--seeds 0,1,2]
        [--rounds 8] [--local-steps 4] [--out bench/results] [--work DIR [--resume]]

Writes ``planner.json`` (every run's rounds and clients) and ``planner.md``
(the table) into ``--out``; every run's logs and run folders go into
``--work`` (default: a folder under the system's temporary directory).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.device_demo import PLAN_FILE, DeviceDemo, make_plan, run_devices  # noqa: E402
from profiles.planfile import PlanFile, write_plan  # noqa: E402
from profiles.planner import ClientPlan, assess  # noqa: E402
from profiles.schema import resolve_profile  # noqa: E402

CONFIGS = ("planned", "uniform", "naive")
DEFAULT_DEVICES = "workstation,agx-orin,pi5,jetson-nano"
TARGET = 0.8  # planned's time to the uniform run's final accuracy, as a share of uniform's


# ---------------------------------------------------------------- plans


def reference_times(shape, profiles: list, planned: PlanFile) -> list[float]:
    """Each device's predicted step time on the planner's common reference
    plan (the server's cut, the smallest candidate rank, the top block only,
    the nominal batch of 16): the weakest device is the slowest on it."""
    from profiles.cost import Plan, predict_step_time

    common = Plan(k1=planned.server_cut[0], k2=planned.server_cut[1], rank=4, batch=16, seq_len=planned.seq_len,
                  trainable=frozenset({planned.model.num_layers - 1}))
    return [float(predict_step_time(shape, common, p).total) for p in profiles]


def config_plans(shape, profiles: list, planned: PlanFile, config: str) -> list[ClientPlan]:
    """Every device's plan in ``config``: its own, the weakest's or the
    strongest's settings, assessed on the device (its own predictions)."""
    own = [planned.clients[p.name] for p in profiles]
    if config == "planned":
        return own
    times = reference_times(shape, profiles, planned)
    pick = max if config == "uniform" else min
    template = own[pick(range(len(times)), key=lambda i: times[i])]
    return [assess(shape, p, template.plan()) for p in profiles]


# ---------------------------------------------------------------- measures


def round_times(runs: list[dict]) -> list[float]:
    """Emulated seconds of each round: the slowest client's busy time in it
    (device-equivalent compute plus link delays, from its round records)."""
    by_round: dict[int, float] = {}
    for run in runs:
        for rec in run["records"]:
            busy = rec["emulated_compute_s"] + rec["emulated_link_s"]
            by_round[rec["round"]] = max(by_round.get(rec["round"], 0.0), busy)
    return [by_round[r] for r in sorted(by_round)]


def accuracy_curve(evaluator: dict) -> list[float]:
    """Accuracy of the global model after 0, 1, ... R rounds: at each round's
    start, then at the end."""
    start = [r["accuracy"] for r in evaluator["summary"]["rounds"]]
    return start + [evaluator["summary"]["final_accuracy"]]


def time_to(accuracies: list[float], times: list[float], target: float) -> float | None:
    """Emulated seconds until the accuracy first reaches ``target`` (after r
    rounds: the sum of the first r rounds' times); None if it never does."""
    elapsed = [0.0]
    for t in times:
        elapsed.append(elapsed[-1] + t)
    for acc, at in zip(accuracies, elapsed):
        if acc >= target - 1e-12:
            return at
    return None


def step_times(runs: list[dict]) -> dict[str, float]:
    """Each device's mean emulated step time (training steps only)."""
    out = {}
    for run in runs:
        steps = sum(r["steps"] for r in run["records"])
        out[run["device"]] = sum(r["emulated_train_s"] for r in run["records"]) / max(steps, 1)
    return out


def over_budget(runs: list[dict]) -> list[str]:
    """The devices whose measured peak memory went over their budget."""
    return [r["device"] for r in runs if r["peak_bytes"] > r["budget_bytes"]]


def measures(runs: list[dict]) -> dict:
    """A run's figures, less the time to target (which needs the uniform run)."""
    evaluator = next(r for r in runs if r["evaluator"])
    steps = step_times(runs)
    return {"round_s": round_times(runs), "accuracy": accuracy_curve(evaluator),
            "final_accuracy": evaluator["summary"]["final_accuracy"], "step_s": steps,
            "straggler_ratio": max(steps.values()) / min(steps.values()), "over_budget": over_budget(runs),
            "peak_gib": {r["device"]: r["peak_bytes"] / 2**30 for r in runs},
            "budget_gib": {r["device"]: r["budget_bytes"] / 2**30 for r in runs}}


# ---------------------------------------------------------------- running


def run_config(args, config: str, seed: int, shape, profiles: list, planned: PlanFile, host: float,
               num_labels: int) -> dict:
    """One federation in ``config``; returns its plans, clients and figures."""
    out = Path(args.work) / f"seed{seed}-{config}"
    out.mkdir(parents=True, exist_ok=True)
    plans = config_plans(shape, profiles, planned, config)
    write_plan(replace(planned, clients={p.device: p for p in plans}), out / PLAN_FILE)
    demo = DeviceDemo(devices=args.devices, out=out, strategy="layermean", allocation="fixed", rounds=args.rounds,
                      local_steps=args.local_steps, seq_len=args.seq_len, alpha=args.alpha, seed=seed,
                      memory="report", server_threads=args.server_threads)
    started = time.perf_counter()
    device_runs = run_devices(demo, {p.device: p for p in plans}, host, num_labels, say=lambda *_: None)
    wall = time.perf_counter() - started
    runs = [{"device": r.profile.name, "evaluator": r.evaluator, "summary": r.summary,
             "records": r.summary["round_records"], "peak_bytes": r.summary["emulation"]["peak_memory_bytes"],
             "budget_bytes": r.summary["emulation"]["memory_budget_bytes"]} for r in device_runs]
    result = {"config": config, "seed": seed, "wall_s": wall, **measures(runs),
              "plans": {p.device: {"cut": [p.k1, p.k2], "rank": p.rank, "blocks": p.trainable, "batch": p.batch,
                                   "predicted_step_s": p.predicted_step_s} for p in plans},
              "clients": [{k: v for k, v in r.items() if k != "summary"} for r in runs]}
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")  # kept should a later run fail
    print(f"seed {seed} {config}: final accuracy {result['final_accuracy']:.3f}, emulated "
          f"{sum(result['round_s']):.0f} s, straggler ratio {result['straggler_ratio']:.2f}, wall {wall:.0f} s",
          flush=True)
    return result


def with_targets(results: list[dict]) -> list[dict]:
    """Add each run's time to its seed's uniform final accuracy, and its ratio to uniform's."""
    for seed in {r["seed"] for r in results}:
        runs = {r["config"]: r for r in results if r["seed"] == seed}
        target = runs["uniform"]["final_accuracy"]
        base = time_to(runs["uniform"]["accuracy"], runs["uniform"]["round_s"], target)
        for r in runs.values():
            r["target_accuracy"] = target
            r["time_to_target_s"] = time_to(r["accuracy"], r["round_s"], target)
            r["ratio_to_uniform"] = (None if r["time_to_target_s"] is None or not base
                                     else r["time_to_target_s"] / base)
    return results


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {sd:.2f}" if abs(mean) < 10 else f"{mean:.0f} ± {sd:.0f}"


def table(results: list[dict]) -> str:
    """The Markdown table: mean ± standard deviation over the seeds."""
    lines = ["| configuration | time to uniform's final accuracy, s | ratio to uniform | reached | final accuracy "
             "| emulated run, s | straggler ratio | over budget | real wall, s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for config in CONFIGS:
        runs = [r for r in results if r["config"] == config]
        if not runs:
            continue
        reached = [r["time_to_target_s"] for r in runs if r["time_to_target_s"] is not None]
        ratios = [r["ratio_to_uniform"] for r in runs if r["ratio_to_uniform"] is not None]
        over = sorted({d for r in runs for d in r["over_budget"]})
        lines.append(f"| {config} | {_spread(reached)} | {_spread(ratios)} | {len(reached)} of {len(runs)} | "
                     f"{_spread([r['final_accuracy'] for r in runs])} | "
                     f"{_spread([sum(r['round_s']) for r in runs])} | "
                     f"{_spread([r['straggler_ratio'] for r in runs])} | {', '.join(over) or 'none'} | "
                     f"{_spread([r['wall_s'] for r in runs])} |")
    return "\n".join(lines)


def devices_table(results: list[dict]) -> str:
    """Per configuration and device: the measured mean step time and peak
    memory against the budget (mean over the seeds)."""
    lines = ["| configuration | device | measured step s | peak / budget GiB |", "|---|---|---|---|"]
    for config in CONFIGS:
        runs = [r for r in results if r["config"] == config]
        for device in (runs[0]["step_s"] if runs else {}):
            step = statistics.fmean(r["step_s"][device] for r in runs)
            peak = max(r["peak_gib"][device] for r in runs)
            lines.append(f"| {config} | {device} | {step:.3f} | {peak:.2f} / {runs[0]['budget_gib'][device]:.2f} |")
    return "\n".join(lines)


def plans_table(result: list[dict]) -> str:
    """Each configuration's settings per device (the same for every seed)."""
    lines = ["| configuration | device | cut | rank | blocks | batch | predicted step s |",
             "|---|---|---|---|---|---|---|"]
    for config in CONFIGS:
        r = next((x for x in result if x["config"] == config), None)
        for device, p in ({} if r is None else r["plans"]).items():
            blocks = ",".join(map(str, p["blocks"]))
            lines.append(f"| {config} | {device} | {p['cut'][0]},{p['cut'][1]} | {p['rank']} | {blocks} | "
                         f"{p['batch']} | {p['predicted_step_s']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default=DEFAULT_DEVICES, help="comma-separated device profiles")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (data split, LoRA init, order)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the label split")
    parser.add_argument("--server-threads", type=int, default=2)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="which configurations to run")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--work", default=None, help="folder for every run's logs and records")
    parser.add_argument("--resume", action="store_true",
                        help="take the runs --work already holds (their result.json) instead of running them again")
    args = parser.parse_args(argv)
    args.devices = [d.strip() for d in args.devices.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    configs = [c for c in args.configs.split(",") if c]
    if "uniform" not in configs or set(configs) - set(CONFIGS):
        parser.error(f"--configs: a subset of {','.join(CONFIGS)} that holds uniform (the other runs' reference)")
    if args.resume and not args.work:
        parser.error("--resume needs the --work folder of the runs to take")
    args.work = args.work or tempfile.mkdtemp(prefix="fedsplit-bench-planner-")
    return bench(args, seeds, configs)


def bench(args, seeds: list[int], configs: list[str]) -> int:
    import torch

    from edge.data import load_dataset
    from edge.emulate import host_speed
    from profiles.cost import ModelShape
    from split.partition import load_config, resolve_model_path

    labels = load_dataset(None).labels
    profiles = [resolve_profile(d) for d in args.devices]
    config = load_config(resolve_model_path(None), "classification", len(labels), True)
    shape = ModelShape.from_config(config, num_labels=len(labels))
    planning = DeviceDemo(devices=args.devices, out=Path(args.work), seq_len=args.seq_len)
    planned = make_plan(planning, len(labels))
    torch.set_num_threads(1)
    host = host_speed(clock="cpu")
    print(f"host: {host:.1f} GFLOP/s on one thread (CPU time); runs in {args.work}", flush=True)
    results = []
    for seed in seeds:
        for config in configs:
            done = Path(args.work) / f"seed{seed}-{config}" / "result.json"
            if args.resume and done.is_file():
                results.append(json.loads(done.read_text()))
                continue
            results.append(run_config(args, config, seed, shape, profiles, planned, host, len(labels)))
    with_targets(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"devices": [p.name for p in profiles], "seeds": seeds, "rounds": args.rounds,
                "local_steps": args.local_steps, "seq_len": args.seq_len, "alpha": args.alpha,
                "strategy": "layermean", "allocation": "fixed", "host_gflops_one_thread": host,
                "target_ratio": TARGET}
    (out / "planner.json").write_text(json.dumps({"settings": settings, "runs": results}, indent=1) + "\n")
    planned_runs = [r for r in results if r["config"] == "planned"]
    ratios = [r["ratio_to_uniform"] for r in planned_runs]
    met = bool(ratios) and all(r is not None and r <= TARGET for r in ratios) and not any(
        r["over_budget"] for r in planned_runs)
    verdict = (f"Target (planned at most {TARGET}x uniform's time, no client over budget): "
               f"{'met' if met else 'missed'}; planned/uniform per seed: "
               + ", ".join("not reached" if r is None else f"{r:.2f}" for r in ratios))
    md = ["# Planner benchmark\n", f"Devices: {', '.join(settings['devices'])}; {args.rounds} rounds of "
          f"{args.local_steps} local steps, layermean, fixed blocks, sequence {args.seq_len}, Dirichlet("
          f"{args.alpha}) split, seeds {', '.join(map(str, seeds))}; mean ± standard deviation over the seeds. "
          "Times are emulated device time (bench/planner.py: busy time of the slowest client per round).\n",
          table(results), "", verdict, "", "Settings per configuration:\n", plans_table(results), "",
          "Measured per device (mean step time over the seeds, the largest peak):\n", devices_table(results), ""]
    (out / "planner.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
