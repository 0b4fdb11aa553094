"""Federated demo runs kept on disk by their settings.

Several benchmarks compare against the same lossless run of the demo task
(``bench/compression.py``'s fp32 codec and ``bench/client_memory.py``'s
float32 weights are one run). A run is 5-15 minutes on 2 cores, so each is
kept in a work folder under a name derived from every setting that can change
its outcome, and a benchmark given the same folder reads it back instead of
running it again.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.demo import FederationRun, run_federation  # noqa: E402

# Where a run writes its records and checkpoints: not part of what it computes.
_PLACES = ("run_dir", "checkpoint_dir")


def settings(run: FederationRun) -> dict:
    """The settings that decide a run's outcome, JSON-ready."""
    out = {k: v for k, v in asdict(run).items() if k not in _PLACES}
    out["client_args"] = list(out["client_args"])
    out["server_args"] = list(out["server_args"])
    return out


def run_name(run: FederationRun) -> str:
    """A readable name that changes with any outcome-deciding setting."""
    s = settings(run)
    digest = hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:10]
    codecs = run.codec_up if run.codec_up == run.codec_down else f"{run.codec_up}+{run.codec_down}"
    words = [run.strategy, codecs, *run.client_args, f"seed{run.seed}", f"r{run.rounds}x{run.local_steps}", digest]
    slugs = (re.sub(r"[^A-Za-z0-9.+]+", "", w) for w in words)
    return "-".join(slug for slug in slugs if slug)


def cached_federation(run: FederationRun, num_labels: int, work: Path, resume: bool) -> dict:
    """Run ``run`` (its records under ``work/<name>``) or, with ``resume``, read
    back an earlier run with the same settings. Returns its settings, client
    0's final and per-round accuracy, every client's bytes and the wall time."""
    name = run_name(run)
    done = work / f"{name}.json"
    if resume and done.is_file():
        kept = json.loads(done.read_text())
        if kept.get("settings") != settings(run):  # a name collision would silently swap results
            raise RuntimeError(f"{done} holds a run with other settings; move it away")
        return kept
    folder = work / name
    if folder.exists():  # an interrupted run's records: its processes refuse a folder that holds another run
        print(f"removing the records of an unfinished run: {folder}", flush=True)
        shutil.rmtree(folder)
    started = time.perf_counter()
    summaries = run_federation(replace(run, run_dir=str(folder)), num_labels)
    first = summaries[0]
    result = {"settings": settings(run), "final_accuracy": first["final_accuracy"],
              "round_accuracy": [r["accuracy"] for r in first["rounds"]],
              "client_bytes": sum(s["bytes_sent"] + s["bytes_received"] for s in summaries),
              "wall_s": time.perf_counter() - started}
    work.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(result, indent=2) + "\n")
    return result
