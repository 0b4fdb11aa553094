"""Many simulated clients through Flower: do one-factor methods hold up
better than FedIT as clients multiply, and what does a simulation cost?

RoLoRA's paper reports, on GLUE with 50 clients, FedIT 70.72, FFA-LoRA 76.48
and RoLoRA 85.81 (average accuracy): the methods that train or average one
factor at a time lose less to the product-of-averages error as clients
multiply. Here: the built-in task (MiniLM, 10 classes) split over 50 clients
by a Dirichlet(0.3) label draw, 20% of them sampled per round, every method
with the same budget (rounds x local steps, batch 16, LoRA r=8 on q,v, lr
5e-3, head 2e-2), in Flower's Ray simulation (``examples/flower``'s app:
one backbone server in the ServerApp, each Ray worker reusing one client
segment for every client it runs). Each (method, seed) runs once in a process
of its own; the seed draws the label split, the sampling, the data order and
the initialisation. Reported: the final round's test accuracy (the
``round_N/`` checkpoint scored whole, ``server/round_eval.py``) as mean and
standard deviation over seeds, the wall time, the peak memory of the whole
simulation (the summed proportional set size of the run's process and every
process under it: Ray, its workers, the ServerApp's backbone server), and
simulated clients per minute against the number of Ray workers.

    python bench/scale.py                              # 4 methods x 3 seeds with 2 workers, FedIT with 1
    python bench/scale.py --work DIR --resume          # runs kept in DIR are read back
    python bench/scale.py --clients 100 --fraction 0.1 --methods fedit --seeds 0 --rounds 3 \\
        --throughput-workers "" --name simulation-100  # the 100-client memory run

Needs the flower extra (pip install -e ".[flower]", Python >= 3.11). Writes
bench/results/<name>.json and <name>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from seed_stats import mean_sd, paired, spread, verdict  # noqa: E402  (bench/ is sys.path[0] as a script)

OUT = ROOT / "bench" / "results"
NAMES = {"fedit": "FedIT", "ffa": "FFA-LoRA", "rolora": "RoLoRA", "fedex": "FedEx-LoRA", "flora": "FLoRA"}
SAMPLE_EVERY = 1.0  # seconds between memory samples of the run's processes


@dataclass(frozen=True)
class ScaleRun:
    """One simulation: everything that decides its outcome."""

    strategy: str
    seed: int
    workers: int
    clients: int
    alpha: float
    fraction: float
    rounds: int
    local_steps: int
    rank: int

    @property
    def name(self) -> str:
        return (f"{self.strategy}-seed{self.seed}-w{self.workers}-c{self.clients}-a{self.alpha:g}"
                f"-f{self.fraction:g}-r{self.rounds}x{self.local_steps}-rank{self.rank}")


# ---------------------------------------------------------------- one run (its own process)

def simulate(run: ScaleRun, folder: Path) -> dict:
    """Run ``run`` through Flower's simulation engine; score its last round."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from flwr.simulation import run_simulation

    from edge.data import Batches
    from edge.flower_client import client_app
    from edge.shard import ShardSpec, _task, num_labels
    from server.checkpoint import last_round
    from server.flower_app import server_app
    from server.round_eval import round_accuracy
    from split.flower_settings import FlowerRun
    from split.partition import resolve_model_path

    checkpoints = folder / "checkpoints"
    cfg = FlowerRun(strategy=run.strategy, rounds=run.rounds, fraction=run.fraction, local_steps=run.local_steps,
                    seed=run.seed, ranks=(run.rank,), alpha=2.0 * run.rank, clients=run.clients,
                    partition="dirichlet", partition_alpha=run.alpha, checkpoint_dir=str(checkpoints))
    results = []
    started = time.perf_counter()
    run_simulation(server_app(lambda r: num_labels(ShardSpec.of(r)), cfg, results), client_app(),
                   num_supernodes=run.clients,
                   backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": run.workers}})
    wall = time.perf_counter() - started
    if len(results) != 1:
        raise RuntimeError(f"{run.name}: the ServerApp did not finish (its log above says why)")
    strategy = results[0]
    dataset, tok, _ = _task("builtin", "", "", run.seed)
    test = Batches(dataset.test, dataset, tok, cfg.max_length, 64, False)
    accuracy = round_accuracy(last_round(checkpoints), resolve_model_path(None), test, list(dataset.labels))
    history = strategy.history
    return {"accuracy": accuracy, "wall_s": wall, "join_s": strategy.join_seconds,
            "round_s": [h["seconds"] for h in history],
            "client_rounds": sum(len(h["uploads"]) for h in history),
            "left_out": sum(len(h["left_out"]) for h in history),
            "loss": [h["metrics"].get("loss") for h in history],
            "client_peak_memory": max((h["metrics"].get("peak-memory", 0) for h in history), default=0)}


# ---------------------------------------------------------------- the parent: runs, memory, tables

def tree_memory(root) -> tuple[int, int]:
    """Summed PSS and RSS (bytes) of ``root`` and every process under it."""
    import psutil

    pss = rss = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        pss += getattr(info, "pss", info.uss)
        rss += info.rss
    return pss, rss


def run_measured(run: ScaleRun, work: Path, resume: bool) -> dict:
    """``run`` in a process of its own, its tree's memory sampled; kept in ``work``."""
    import psutil

    done = work / f"{run.name}.json"
    if resume and done.is_file():
        kept = json.loads(done.read_text())
        if kept.get("settings") != asdict(run):
            raise RuntimeError(f"{done} holds a run with other settings; move it away")
        return kept
    folder = Path(tempfile.mkdtemp(prefix=f"{run.name}-", dir=work))
    out = folder / "result.json"
    print(f"running {run.name}", flush=True)
    peak_pss = peak_rss = 0
    with open(folder / "log.txt", "w") as log:
        child = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(asdict(run)), "--folder",
                                  str(folder)], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        root = psutil.Process(child.pid)
        while child.poll() is None:
            pss, rss = tree_memory(root)
            peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
            time.sleep(SAMPLE_EVERY)
    if child.returncode != 0 or not out.is_file():
        raise RuntimeError(f"{run.name} failed (exit {child.returncode}); its log: {folder / 'log.txt'}")
    result = {"settings": asdict(run), **json.loads(out.read_text()), "peak_pss": peak_pss, "peak_rss": peak_rss}
    done.write_text(json.dumps(result, indent=2) + "\n")
    return result


def clients_per_minute(result: dict) -> tuple[float, float]:
    """Client rounds per minute of training rounds, and of the whole run (start-up and join included)."""
    training = sum(result["round_s"])
    return 60 * result["client_rounds"] / training, 60 * result["client_rounds"] / result["wall_s"]


def accuracy_rows(runs: list[dict], methods: list[str], workers: int) -> list[dict]:
    """Per method: accuracies by seed, difference to FedIT paired by seed, wall time and peak memory."""
    by = {(r["settings"]["strategy"], r["settings"]["seed"]): r for r in runs if r["settings"]["workers"] == workers}
    rows = []
    for method in methods:
        mine = {seed: r for (m, seed), r in sorted(by.items()) if m == method}
        fedit = {s: r["accuracy"] for (m, s), r in by.items() if m == "fedit"}
        diffs = paired({s: r["accuracy"] for s, r in mine.items()}, fedit)
        rows.append({"method": method, "seeds": sorted(mine), "accuracy": [mine[s]["accuracy"] for s in sorted(mine)],
                     "vs_fedit": diffs if method != "fedit" else [],
                     "wall_s": statistics.fmean(r["wall_s"] for r in mine.values()),
                     "peak_pss_gib": max(r["peak_pss"] for r in mine.values()) / 2**30})
    return rows


def markdown(args, rows: list[dict], throughput: list[dict]) -> str:
    lines = [f"# {args.name}", "",
             f"`python bench/scale.py {' '.join(sys.argv[1:])}`", "",
             f"{args.clients} clients, Dirichlet({args.alpha:g}) label split, {args.fraction:.0%} sampled per round, "
             f"{args.rounds} rounds x {args.local_steps} local steps (batch 16), LoRA r={args.rank} on q,v, "
             f"{args.workers} Ray workers; accuracy of the last round's checkpoint on the built-in "
             f"task's test split; mean ± standard deviation over seeds.", "",
             "| method | final accuracy | per seed | vs FedIT, paired by seed | claim | wall (s) | peak memory (GiB) |",
             "|---|---|---|---|---|---:|---:|"]
    for row in rows:
        per_seed = ", ".join(f"{a:.3f}" for a in row["accuracy"])
        diff = spread(row["vs_fedit"]) if row["vs_fedit"] else "-"
        claim = verdict(row["vs_fedit"], "FedIT") if row["method"] != "fedit" else "-"
        lines.append(f"| {NAMES.get(row['method'], row['method'])} | {mean_sd(row['accuracy'])} | {per_seed} | {diff} "
                     f"| {claim} | {row['wall_s']:.0f} | {row['peak_pss_gib']:.2f} |")
    if throughput:
        lines += ["", "Simulated clients per minute against Ray workers (one run each, the same settings):", "",
                  "| Ray workers | method, seed | clients/min (training rounds) | clients/min (whole run) "
                  "| wall (s) | start-up and join (s) | peak memory (GiB) | accuracy |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in throughput:
            s = r["settings"]
            train, whole = clients_per_minute(r)
            setup = r["wall_s"] - sum(r["round_s"])
            lines.append(f"| {s['workers']} | {s['strategy']}, {s['seed']} | {train:.1f} | {whole:.1f} | "
                         f"{r['wall_s']:.0f} | {setup:.0f} | {r['peak_pss'] / 2**30:.2f} | {r['accuracy']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--alpha", type=float, default=0.3, help="Dirichlet concentration of the label split")
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--methods", default="fedit,ffa,rolora,fedex")
    parser.add_argument("--seeds", default="0,1,2", help="one run per seed; at least 3 for a claim")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers of the accuracy runs")
    parser.add_argument("--throughput-workers", default="1,2",
                        help="worker counts to time (the first method, first seed); '' for none")
    parser.add_argument("--work", default=None, help="folder that keeps each run (default: a temporary one)")
    parser.add_argument("--resume", action="store_true", help="read back runs kept in --work")
    parser.add_argument("--name", default="scale")
    args = parser.parse_args()
    if args.child:
        folder = Path(args.folder)
        result = simulate(ScaleRun(**json.loads(args.child)), folder)
        (folder / "result.json").write_text(json.dumps(result))
        return
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in NAMES]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {', '.join(NAMES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    tw = [int(w) for w in args.throughput_workers.split(",") if w]
    work = Path(args.work or tempfile.mkdtemp(prefix="fedsplit-scale-"))
    work.mkdir(parents=True, exist_ok=True)

    def one(method: str, seed: int, workers: int) -> dict:
        return run_measured(ScaleRun(method, seed, workers, args.clients, args.alpha, args.fraction, args.rounds,
                                     args.local_steps, args.rank), work, args.resume)

    runs = [one(m, s, args.workers) for s in seeds for m in methods]
    throughput = [one(methods[0], seeds[0], w) for w in tw]
    rows = accuracy_rows(runs, methods, args.workers)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.name}.json").write_text(json.dumps({"args": vars(args), "runs": runs, "throughput": throughput},
                                                      indent=2) + "\n")
    text = markdown(args, rows, throughput)
    (OUT / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
