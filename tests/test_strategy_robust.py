"""Robust aggregation around any strategy (server/strategies/robust.py,
docs/algorithms.md#robust): without an attacker and with a bound nothing
reaches, the wrapper is the wrapped method to the bit; one client's huge
values are ignored by the trimmed mean and the median; clipping bounds what
one client can move the global model by."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from round_helpers import coordinator
from server.rounds import FederationConfig
from server.strategies import get_strategy, strategy_names
from server.strategies.base import ClientInfo, Factors, Upload
from server.strategies.robust import (Robust, RobustConfig, clip_upload, combine_uploads, head_medians, median,
                                      reference_for, robust, robust_uploads, trimmed, update_norm)
from strategy_helpers import (ALPHA, D_IN, D_OUT, HEAD, MODULES, R, assert_same, clients, gen, initial,
                              make_clients, make_initial, make_uploads, rand, snapshot, uploads)

NAMES = strategy_names()


def setup(name: str):
    """(strategy, initial LoRA, clients, uploads) on the strategy_helpers setup that fits it."""
    s = get_strategy(name)
    if s.heterogeneous_ranks:
        g = gen(0)
        return s, initial(g), clients(), uploads(gen(1), lambda c: {HEAD: rand(gen(2), 3, 5)})
    return s, make_initial(), make_clients(), make_uploads()


# ---------------------------------------------------------------- identities


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("config", [RobustConfig(clip_norm=1e12), RobustConfig(clip_median=1e6)],
                         ids=["clip-norm", "clip-median"])
def test_with_no_attacker_and_a_bound_nothing_reaches_the_wrapper_is_the_strategy(name, config):
    inner, init, cs, ups = setup(name)
    wrapped = robust(get_strategy(name), config)
    assert isinstance(wrapped, Robust) and wrapped.name == inner.name
    assert (wrapped.heterogeneous_ranks, wrapped.block_subsets) == (inner.heterogeneous_ranks, inner.block_subsets)
    state = inner.init_state(init, cs)
    before = snapshot(ups)
    assert_same(snapshot(wrapped.aggregate(state, ups, 0)), snapshot(inner.aggregate(state, ups, 0)))
    assert_same(snapshot(ups), before)  # inputs untouched


def test_a_trim_that_removes_no_one_changes_nothing_and_says_so(caplog):
    inner, init, cs, ups = setup("fedit")
    state = inner.init_state(init, cs)
    wrapped = robust(get_strategy("fedit"), RobustConfig(combine="trimmed-mean", trim=0.2))  # floor(0.2 * 4) = 0
    with caplog.at_level(logging.WARNING, logger="server.strategies.robust"):
        result = wrapped.aggregate(state, ups, 0)
    assert_same(snapshot(result), snapshot(inner.aggregate(state, ups, 0)))
    assert "trims nothing per coordinate (it needs at least 5 uploads)" in caplog.text


def test_robust_off_is_the_strategy_itself():
    s = get_strategy("fedit")
    assert robust(s, RobustConfig()) is s and robust(s, None) is s


# ---------------------------------------------------------------- one attacker


def constant_upload(client: str, value: float, n: int = 10, rank: int = R) -> Upload:
    factors = {m: Factors(torch.full((rank, D_IN), value), torch.full((D_OUT, rank), value), ALPHA) for m in MODULES}
    return Upload(client, factors, n, rank, None, {HEAD: torch.full((3, D_OUT), value)})


def fedit_round(config: RobustConfig, values, counts=None):
    """FedIT over clients with every value constant (c0 = values[0], ...); the new state."""
    counts = counts or [10] * len(values)
    s = robust(get_strategy("fedit"), config)
    init = {m: Factors(torch.zeros(R, D_IN), torch.zeros(D_OUT, R), ALPHA) for m in MODULES}
    state = s.init_state(init, [ClientInfo(f"c{k}", R, ALPHA, None, n) for k, n in enumerate(counts)])
    ups = [constant_upload(f"c{k}", v, n) for k, (v, n) in enumerate(zip(values, counts))]
    return state, s.aggregate(state, ups, 0).state


HONEST = [1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize("config, expected", [
    (RobustConfig(combine="trimmed-mean", trim=0.2), 3.0),  # 1 and 1e6 trimmed: mean of 2, 3, 4
    (RobustConfig(combine="median"), 3.0),  # median of 1, 2, 3, 4, 1e6
])
def test_one_client_sending_huge_values_is_ignored(config, expected):
    _, plain = fedit_round(RobustConfig(), HONEST + [1e6])
    assert plain["A"][MODULES[0]][0, 0] > 1e5  # without it, one client drags the global model
    _, new = fedit_round(config, HONEST + [1e6])
    for which in ("A", "B"):
        for m in MODULES:
            assert torch.allclose(new[which][m], torch.full_like(new[which][m], expected))
    assert torch.allclose(new["head"][HEAD], torch.full((3, D_OUT), expected))


def test_the_trimmed_mean_is_sample_weighted_over_the_kept_values():
    # Trimmed per coordinate: 1 and 1e6; kept 2 (n=10), 3 (n=30), 4 (n=10): (20 + 90 + 40) / 50 = 3
    _, new = fedit_round(RobustConfig(combine="trimmed-mean", trim=0.2), HONEST + [1e6], [10, 10, 30, 10, 40])
    assert torch.allclose(new["A"][MODULES[0]], torch.full((R, D_IN), 3.0))


@pytest.mark.parametrize("combine", ["trimmed-mean", "median"])
@pytest.mark.parametrize("name", ["hetlora", "rbla", "flexlora", "flora"])
def test_with_mixed_ranks_each_rank_slot_is_combined_over_its_holders(name, combine):
    # Ranks 2, 4, 4, 4, 4: slots 0-1 have five holders, slots 2-3 four; the attacker holds all four.
    g = torch.Generator().manual_seed(0)
    d_in, d_out, r_max, alpha = 6, 5, 4, 8.0
    modules = ["model.layers.0.self_attn.q_proj"]
    ranks = {"h2": 2, "h4a": 4, "h4b": 4, "h4c": 4, "evil": 4}
    s = robust(get_strategy(name), RobustConfig(combine=combine, trim=0.25 if combine == "trimmed-mean" else None))
    init = {m: Factors(torch.randn(r_max, d_in, generator=g), torch.zeros(d_out, r_max), alpha) for m in modules}
    state = s.init_state(init, [ClientInfo(c, r, alpha, None, 10) for c, r in ranks.items()])
    ups = []
    for c, r in ranks.items():
        scale = 1e6 if c == "evil" else 1.0
        factors = {m: Factors(torch.rand(r, d_in, generator=g) * scale, torch.rand(d_out, r, generator=g) * scale,
                              alpha) for m in modules}
        ups.append(Upload(c, factors, 10, r, None, {}))
    combined = robust_uploads(s.inner, state, ups, 0, s.config)
    for which, slots in (("A", lambda t, i: t[i]), ("B", lambda t, i: t[:, i])):
        for i in range(r_max):
            honest = torch.stack([slots(getattr(u.factors[modules[0]], which), i) for u in ups[:-1]
                                  if u.rank > i])
            low, high = honest.min(0).values - 1e-6, honest.max(0).values + 1e-6
            for u in combined:
                if u.rank > i:
                    got = slots(getattr(u.factors[modules[0]], which), i)
                    assert bool(((got >= low) & (got <= high)).all()), (u.client, which, i)
    # The strategy takes the combined uploads, and its result is the honest clients' scale.
    result = s.aggregate(state, ups, 0)
    tensors = [*result.base_deltas.values()]
    for part in ("A", "B", "global"):
        for value in result.state.get(part, {}).values():
            tensors += list(value.values()) if isinstance(value, dict) else [value]
    assert tensors and all(float(t.abs().max()) < 100 for t in tensors)


# ---------------------------------------------------------------- clipping


def test_clipping_bounds_what_one_client_moves_the_global_model_by():
    bound = 2.0
    state, new = fedit_round(RobustConfig(clip_norm=bound), [0.01, 0.02, 0.03, 1e6])
    moved = math.sqrt(sum(float((new[w][m] - state[w][m]).square().sum()) for w in ("A", "B") for m in MODULES))
    assert moved <= bound + 1e-6
    # No global head before round 0: each head is measured from the uploads' median (0.025), and clipped too.
    assert float((new["head"][HEAD] - 0.025).norm()) <= bound + 1e-6
    _, plain = fedit_round(RobustConfig(), [0.01, 0.02, 0.03, 1e6])
    assert plain["A"][MODULES[0]].abs().max() > 1e5


def test_clip_upload_scales_the_update_to_the_bound_and_leaves_small_ones_alone():
    inner, init, cs, ups = setup("fedit")
    state = inner.init_state(init, cs)
    ref = inner.download(state, cs[0], 0)  # before round 0: no head in it, so the head is not measured
    norm = update_norm(ups[0], ref)
    assert norm > 1.0
    clipped = clip_upload(ups[0], ref, 1.0)
    assert math.isclose(update_norm(clipped, ref), 1.0, rel_tol=1e-9)
    # The direction is kept: the clipped update is the original one scaled by 1 / norm.
    m = MODULES[0]
    assert torch.allclose(clipped.factors[m].A - ref.A[m], (ups[0].factors[m].A - ref.A[m]) / norm)
    assert clip_upload(ups[0], ref, norm * 2) is ups[0]


def test_a_median_relative_bound_clips_only_the_outlier(caplog):
    inner, init, cs, ups = setup("fedit")
    state = inner.init_state(init, cs)
    evil = Upload("c3", {m: Factors(f.A * 100, f.B * 100, f.alpha) for m, f in ups[3].factors.items()},
                  ups[3].num_samples, R, None, ups[3].head)
    ups = ups[:3] + [evil]
    medians = head_medians(ups)
    refs = [reference_for(inner, state, u, 0, medians) for u in ups]
    norms = [update_norm(u, r) for u, r in zip(ups, refs)]
    bound = 2.0 * float(torch.tensor(norms, dtype=torch.float64).median())
    assert max(norms[:3]) <= bound < norms[3]
    with caplog.at_level(logging.WARNING, logger="server.strategies.robust"):
        out = robust_uploads(inner, state, ups, 0, RobustConfig(clip_median=2.0))
    assert all(a is b for a, b in zip(out[:3], ups[:3]))  # the honest ones pass as they are
    assert math.isclose(update_norm(out[3], refs[3]), bound, rel_tol=1e-9)
    assert "update norms clipped to" in caplog.text and "c3 (" in caplog.text


# ---------------------------------------------------------------- the statistics themselves


def test_trimmed_replaces_trimmed_values_by_the_weighted_mean_of_the_kept():
    values = torch.tensor([[1.0], [2.0], [3.0], [100.0]])
    weights = torch.tensor([1.0, 1.0, 2.0, 1.0])
    out = trimmed(values, weights, 0.25)  # trims 1 and 100; kept 2 (w 1) and 3 (w 2): 8/3
    assert torch.allclose(out, torch.tensor([[8 / 3], [2.0], [3.0], [8 / 3]]))
    # Any average with these weights is the weighted trimmed mean itself.
    assert math.isclose(float((weights[:, None] * out).sum() / weights.sum()), 8 / 3, rel_tol=1e-6)
    equal = torch.full((5, 2), 0.1)
    assert torch.equal(trimmed(equal, torch.ones(5), 0.2), equal)  # equal kept values: exactly that value


def test_median_of_odd_and_even_counts():
    assert torch.equal(median(torch.tensor([[3.0], [1.0], [2.0]])), torch.full((3, 1), 2.0))
    assert torch.equal(median(torch.tensor([[4.0], [1.0], [2.0], [3.0]])), torch.full((4, 1), 2.5))


def test_combining_never_touches_its_inputs():
    ups = make_uploads()
    before = snapshot(ups)
    combine_uploads(ups, RobustConfig(combine="median"))
    assert_same(snapshot(ups), before)


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize("kwargs, match", [
    (dict(clip_norm=1.0, clip_median=2.0), "one clip bound"),
    (dict(clip_norm=0.0), "clip_norm .* > 0"),
    (dict(clip_median=math.nan), "clip_median .* > 0"),
    (dict(combine="mean"), "must be one of none, trimmed-mean, median"),
    (dict(combine="median", trim=0.1), "--robust trimmed-mean only"),
    (dict(combine="trimmed-mean", trim=0.5), r"must be in \(0, 0.5\)"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RobustConfig(**kwargs)


def test_the_coordinator_wraps_its_strategy_and_keeps_its_name():
    coord, _ = coordinator(2, robust=RobustConfig(combine="median"))
    assert isinstance(coord.strategy, Robust) and coord.strategy.name == "fedit"
    assert coord.snapshot()["strategy"] == "fedit"  # a run resumes with or without robust aggregation
    assert FederationConfig().robust.active is False
