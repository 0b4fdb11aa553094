"""Benchmarks share federated runs by their settings (bench/federation_runs.py)."""

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from federation_runs import cached_federation, run_name, settings  # noqa: E402

from edge.demo import FederationRun  # noqa: E402


def test_the_name_follows_every_outcome_setting_and_no_place():
    base = FederationRun(seed=1)
    assert run_name(replace(base, run_dir="/a", checkpoint_dir="/b")) == run_name(base)
    others = [replace(base, seed=2), replace(base, codec_up="int8"), replace(base, client_args=("--quantize", "4bit")),
              replace(base, lr=1e-3), replace(base, ranks=[4]), replace(base, server_args=("--seed", "3"))]
    names = {run_name(r) for r in others}
    assert len(names) == len(others) and run_name(base) not in names


def test_a_kept_run_is_read_back_and_a_mismatched_one_refused(tmp_path):
    run = FederationRun(seed=5)
    kept = {"settings": settings(run), "final_accuracy": 0.5, "round_accuracy": [0.5], "client_bytes": 1,
            "wall_s": 1.0}
    (tmp_path / f"{run_name(run)}.json").write_text(json.dumps(kept))
    assert cached_federation(run, 2, tmp_path, resume=True) == kept
    other = dict(kept, settings=settings(replace(run, lr=1.0)))
    (tmp_path / f"{run_name(run)}.json").write_text(json.dumps(other))
    with pytest.raises(RuntimeError, match="other settings"):
        cached_federation(run, 2, tmp_path, resume=True)
