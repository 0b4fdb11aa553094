"""bench/scale.py (and bench/discordance.py, through bench/seed_stats.py) makes a claim only where the paired difference over seeds
exceeds its spread, and pairs each method with FedIT on the same seed."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from scale import ScaleRun, accuracy_rows  # noqa: E402
from seed_stats import paired, verdict  # noqa: E402


def run(method: str, seed: int, accuracy: float, workers: int = 2) -> dict:
    settings = ScaleRun(method, seed, workers, 50, 0.3, 0.2, 8, 5, 8).__dict__
    return {"settings": dict(settings), "accuracy": accuracy, "wall_s": 100.0, "peak_pss": 2**30}


def test_methods_are_paired_with_fedit_by_seed_and_other_worker_counts_left_out():
    runs = [run("fedit", 0, 0.60), run("fedit", 1, 0.50), run("ffa", 1, 0.55), run("ffa", 0, 0.58),
            run("ffa", 2, 0.90, workers=1)]
    rows = {r["method"]: r for r in accuracy_rows(runs, ["fedit", "ffa"], workers=2)}
    assert rows["ffa"]["seeds"] == [0, 1]
    assert [round(d, 6) for d in rows["ffa"]["vs_fedit"]] == [-0.02, 0.05]
    assert rows["fedit"]["vs_fedit"] == []


def test_a_claim_needs_three_seeds_and_a_difference_beyond_the_spread():
    assert verdict([0.05, 0.06], "FedIT") == "fewer than 3 seeds: no claim"
    assert verdict([0.05, 0.06, 0.04], "FedIT") == "ahead of FedIT"
    assert verdict([-0.05, -0.06, -0.04], "FedIT") == "behind FedIT"
    assert verdict([0.05, -0.04, 0.01], "FedIT") == "within the spread"


def test_differences_pair_only_the_seeds_both_ran():
    assert paired({0: 0.5, 1: 0.7, 3: 0.9}, {1: 0.6, 0: 0.4, 2: 0.1}) == [0.5 - 0.4, 0.7 - 0.6]
