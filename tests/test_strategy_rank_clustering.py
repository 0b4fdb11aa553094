"""Rank clustering (server/strategies/rank_clustering.py, docs/algorithms.md#fedinc):
k-means over rank-1 components.

Checks: identical uploads reproduce their common update (whatever the sample
counts, the split of a component between b and a, its sign or its slot);
nested heterogeneous components are recovered and ordered by cluster weight;
a centroid is the sample-weighted mean of its members, recomputed here. That
the clusters are deterministic for a seed, and depend on it, is part of the
contract every strategy keeps (test_strategy_contract.py).
"""

from __future__ import annotations

import pytest
import torch

from server.strategies import get_strategy
from server.strategies.base import ClientInfo, Factors, StrategyError, Upload
from server.strategies.rank_clustering import RankClustering, balanced_points, sign_invariant_kmeans
from split.families import block_of

from strategy_helpers import (MIXED_ALPHA as ALPHA, MIXED_D_IN as D_IN, MIXED_D_OUT as D_OUT,
                              MIXED_MODULES as MODULES, R_MAX, RANKS, SAMPLES, clients, gen, initial, uploads)


def global_delta(state, m):
    return Factors(state["A"][m], state["B"][m], state["alpha"]).delta()


def download_delta(d, m):
    return Factors(d.A[m], d.B[m], d.alpha).delta()


def components(g, n):
    """n well-separated rank-1 components (b_j, a_j) of decreasing size."""
    b = torch.randn(D_OUT, n, generator=g, dtype=torch.float64)
    a = torch.randn(n, D_IN, generator=g, dtype=torch.float64)
    return b * torch.linspace(2.0, 1.0, n, dtype=torch.float64), a


def client_factors(b, a, cols, alpha, g):
    """Factors whose update alpha/r B A is sum_{j in cols} b_j a_j^T, disguised:
    slots permuted, each component split differently between B and A, some negated."""
    r = len(cols)
    perm = torch.randperm(r, generator=g)
    cols = [cols[i] for i in perm]
    split = torch.rand(r, generator=g, dtype=torch.float64) * 3 + 0.2
    sign = torch.where(torch.rand(r, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    s = alpha / r
    B = b[:, cols] * (split * sign) / s
    A = a[cols] / (split * sign)[:, None]
    return Factors(A, B, alpha)


# ------------------------------------------------------------------ reproduction

@pytest.mark.parametrize("rank", [R_MAX, 4])
def test_identical_uploads_reproduce_the_common_update(rank):
    g = gen(rank)
    s = RankClustering(seed=1)
    init = initial(g)
    cl = [ClientInfo(c, rank, ALPHA) for c in SAMPLES]
    state = s.init_state(init, cl)
    common = {m: components(g, rank) for m in MODULES}
    ups = [Upload(c, {m: client_factors(*common[m], list(range(rank)), ALPHA, g) for m in MODULES}, n, rank)
           for c, n in SAMPLES.items()]
    new = s.aggregate(state, ups, 0).state
    for m in MODULES:
        b, a = common[m]
        target = b @ a
        for u in ups:  # the disguises really are the same update
            torch.testing.assert_close(u.factors[m].delta(), target, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(global_delta(new, m), target, rtol=1e-9, atol=1e-9)
        d = s.download(new, cl[0], 1)
        torch.testing.assert_close(download_delta(d, m), target, rtol=1e-9, atol=1e-9)
        # Slots without a cluster add nothing and keep a trainable A row.
        assert torch.count_nonzero(new["B"][m][:, rank:]) == 0
        assert torch.equal(new["A"][m][rank:], init[m].A[rank:])


def test_heterogeneous_nested_components_are_ordered_by_cluster_weight():
    """Clients of ranks 2, 4, 8 hold the first r_k of eight shared components,
    each with its own alpha: slot j's cluster has the clients with r_k > j."""
    g = gen(20)
    s = RankClustering(seed=0)
    cl = [ClientInfo(c, r, 2.0 * r) for c, r in RANKS.items()]
    state = s.init_state(initial(g), cl)
    common = {m: components(g, R_MAX) for m in MODULES}
    ups = [Upload(c, {m: client_factors(*common[m], list(range(r)), 2.0 * r, g) for m in MODULES},
                  SAMPLES[c], r) for c, r in RANKS.items()]
    new = s.aggregate(state, ups, 0).state
    for m in MODULES:
        b, a = common[m]
        torch.testing.assert_close(global_delta(new, m), b @ a, rtol=1e-9, atol=1e-9)
        for c in cl:
            d = s.download(new, ClientInfo(c.client, c.rank, ALPHA), 1)
            r = c.rank
            torch.testing.assert_close(download_delta(d, m), b[:, :r] @ a[:r], rtol=1e-9, atol=1e-9)
        # Each slot holds exactly one component: heaviest clusters first (total weight of
        # the clients with r_k > j), equal weights by size.
        total = sum(SAMPLES.values())
        weight = [sum(SAMPLES[c] for c, r in RANKS.items() if r > j) / total for j in range(R_MAX)]
        size = [float(b[:, j].norm() * a[j].norm()) for j in range(R_MAX)]
        order = sorted(range(R_MAX), key=lambda j: (-weight[j], -size[j]))
        s_g = ALPHA / R_MAX
        for slot_index, j in enumerate(order):
            slot = s_g * torch.outer(new["B"][m][:, slot_index], new["A"][m][slot_index])
            torch.testing.assert_close(slot, torch.outer(b[:, j], a[j]), rtol=1e-9, atol=1e-9)


def test_centroid_is_the_sample_weighted_mean_of_its_members():
    """Two clients with slightly different versions of two components, samples
    1:3, r_max = 2 (two clusters); the expected centroid is computed here from
    balanced, sign-aligned pairs."""
    g = gen(30)
    s = RankClustering(seed=5)
    cl = [ClientInfo("x", 2, ALPHA), ClientInfo("y", 2, ALPHA)]
    state = s.init_state({m: Factors(f.A[:2], f.B[:, :2], ALPHA) for m, f in initial(g).items()}, cl)
    m = MODULES[0]
    b, a = components(g, 2)
    versions = []
    for noise_seed in (31, 32):
        h = gen(noise_seed)
        bn = b + 0.05 * torch.randn(b.shape, generator=h, dtype=torch.float64)
        an = a + 0.05 * torch.randn(a.shape, generator=h, dtype=torch.float64)
        versions.append((bn, an))
    fx = client_factors(*versions[0], [0, 1], ALPHA, g)
    fy = client_factors(*versions[1], [0, 1], ALPHA, g)
    new = s.aggregate(state, [Upload("x", {m: fx}, 1, 2), Upload("y", {m: fy}, 3, 2)], 0).state

    def balanced(f, j):
        bj, aj = f.B[:, j] * f.scale, f.A[j]
        root = (bj.norm() * aj.norm()).sqrt()
        return bj * root / bj.norm(), aj * root / aj.norm()

    got = [torch.outer(new["B"][m][:, j], new["A"][m][j]) * ALPHA / 2 for j in range(2)]
    for j in range(2):
        target = torch.outer(versions[0][0][:, j], versions[0][1][j])
        # The member of each client closest to component j, aligned in sign.
        mx = max(range(2), key=lambda i: abs(float(torch.outer(fx.B[:, i], fx.A[i]).flatten() @ target.flatten())))
        my = max(range(2), key=lambda i: abs(float(torch.outer(fy.B[:, i], fy.A[i]).flatten() @ target.flatten())))
        bx, ax = balanced(fx, mx)
        by, ay = balanced(fy, my)
        if float(bx @ by + ax @ ay) < 0:
            by, ay = -by, -ay
        expected = torch.outer(0.25 * bx + 0.75 * by, 0.25 * ax + 0.75 * ay)
        match = [k for k in range(2) if torch.allclose(got[k], expected, rtol=1e-9, atol=1e-9)]
        assert len(match) == 1, f"component {j} has no slot equal to its weighted centroid"
    # A centroid is the product of mean factors, not the mean of the products.
    assert not torch.allclose(global_delta(new, m), 0.25 * fx.delta() + 0.75 * fy.delta(), atol=1e-6)


def test_more_components_than_clusters_fill_every_slot():
    g = gen(40)
    s = RankClustering(seed=7)
    state = s.init_state(initial(g), clients())
    new = s.aggregate(state, uploads(g), 3).state
    for m in MODULES:
        assert torch.isfinite(new["A"][m]).all() and torch.isfinite(new["B"][m]).all()
        # 14 random components into 8 clusters: every slot is a cluster, so B has no zero column.
        assert torch.all(new["B"][m].abs().sum(dim=0) > 0)


def test_kmeans_is_sign_invariant_and_seeded():
    g = gen(50)
    centres = torch.randn(3, 10, generator=g, dtype=torch.float64) * 5
    pts, truth = [], []
    for i in range(30):
        c = i % 3
        sign = -1.0 if i % 2 else 1.0  # half the members are negated
        pts.append(sign * (centres[c] + 0.01 * torch.randn(10, generator=g, dtype=torch.float64)))
        truth.append(c)
    X = torch.stack(pts)
    w = torch.rand(30, generator=g, dtype=torch.float64) + 0.1
    assign, sign, C = sign_invariant_kmeans(X, w, 3, torch.Generator().manual_seed(0))
    assert C.shape == (3, 10)
    truth = torch.tensor(truth)
    for c in range(3):  # one cluster per true centre, however the members are signed
        assert len(set(assign[truth == c].tolist())) == 1
    assert len(set(assign.tolist())) == 3
    for k in range(3):  # each centre is the weighted mean of its sign-aligned members
        members = assign == k
        mean = (X[members] * (w[members] * sign[members])[:, None]).sum(0) / w[members].sum()
        torch.testing.assert_close(C[k], mean)
    again = sign_invariant_kmeans(X, w, 3, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], assign) and torch.equal(again[2], C)
    # Fewer distinct points than clusters: seeding stops, no duplicate centres.
    dup = torch.cat([X[:1], -X[:1], X[:1]])
    a2, _, C2 = sign_invariant_kmeans(dup, torch.ones(3, dtype=torch.float64), 3, torch.Generator().manual_seed(1))
    assert C2.shape[0] == 1 and a2.tolist() == [0, 0, 0]


def test_balanced_points_identify_a_component_and_its_disguises():
    g = gen(60)
    b = torch.randn(D_OUT, 1, generator=g, dtype=torch.float64)
    a = torch.randn(1, D_IN, generator=g, dtype=torch.float64)
    p = balanced_points(b, a)
    for scale in (0.1, -1.0, 7.0):
        torch.testing.assert_close(balanced_points(b * scale, a / scale), p)
    bt, at = p[0, :D_OUT], p[0, D_OUT:]
    torch.testing.assert_close(torch.outer(bt, at), b @ a)
    torch.testing.assert_close(bt.norm(), at.norm())
    assert torch.count_nonzero(balanced_points(torch.zeros(D_OUT, 1, dtype=torch.float64), a)) == 0


# ------------------------------------------------------------------ downloads and state

def test_download_respects_rank_and_blocks():
    g = gen(70)
    s = get_strategy("fedinc", seed=3, iterations=4)
    assert s.iterations == 4
    state = s.init_state(initial(g), clients())
    state = s.aggregate(state, uploads(g), 0).state
    d = s.download(state, ClientInfo("c2", 2, ALPHA, blocks=frozenset({2})), 1)
    want = [m for m in MODULES if block_of(m) in (2, None)]
    assert sorted(d.A) == sorted(want) == sorted(d.B)
    assert d.rank == 2 and d.alpha == ALPHA
    for m in want:
        assert torch.equal(d.A[m], state["A"][m][:2])
        torch.testing.assert_close(d.B[m], state["B"][m][:, :2] * 2 / R_MAX)
        # The client's update is the sum of the two heaviest slots.
        slots = ALPHA / R_MAX * state["B"][m][:, :2] @ state["A"][m][:2]
        torch.testing.assert_close(download_delta(d, m), slots)


def test_unchanged_client_keeps_the_update():
    """A lone client that uploads its download unchanged leaves the global update as it was."""
    g = gen(75)
    s = RankClustering()
    state = s.init_state(initial(g), clients())
    state = s.aggregate(state, uploads(g), 0).state
    c8 = ClientInfo("c8", 8, ALPHA)
    d = s.download(state, c8, 1)
    up = Upload("c8", {m: Factors(d.A[m], d.B[m], d.alpha) for m in d.A}, 5, 8)
    new = s.aggregate(state, [up], 1).state
    for m in MODULES:
        torch.testing.assert_close(global_delta(new, m), global_delta(state, m), rtol=1e-9, atol=1e-9)


def test_refusals_name_the_problem():
    g = gen(110)
    with pytest.raises(StrategyError, match="client 'big' trains rank 9, outside 1..8"):
        RankClustering().init_state(initial(g), [ClientInfo("big", 9, ALPHA)])
    with pytest.raises(StrategyError, match="fedinc: iterations must be at least 1, got 0"):
        RankClustering(iterations=0)
