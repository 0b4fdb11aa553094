"""Approximations that keep aggregation fast with many clients
(docs/aggregation-scale.md), each checked against the exact computation at the
tolerance the docs state:

- FlexLoRA's randomized SVD route against the exact SVD of ΔW;
- rank clustering's sketched k-means against k-means on the full points.
"""

from __future__ import annotations

import torch

from server.strategies.flexlora import randomized_svd, truncated_svd
from server.strategies.rank_clustering import balanced_points, sign_invariant_kmeans, sketch_matrix


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _many_clients_update(g: torch.Generator, d: int = 256, clients: int = 40, rank: int = 8):
    """L, R of a mean of ``clients`` random rank-``rank`` updates around a common
    low-rank part: total rank well above d / 2, so ``auto`` takes the randomized route."""
    common_b, common_a = torch.randn(d, 6, generator=g), torch.randn(6, d, generator=g)
    B = torch.cat([common_b @ torch.randn(6, rank, generator=g) + 0.3 * torch.randn(d, rank, generator=g)
                   for _ in range(clients)], dim=1) / clients
    A = torch.cat([torch.randn(rank, 6, generator=g) @ common_a + 0.3 * torch.randn(rank, d, generator=g)
                   for _ in range(clients)], dim=0)
    return B.double(), A.double()


def test_randomized_svd_matches_the_exact_truncated_svd():
    L, R = _many_clients_update(gen(0))
    W = L @ R
    k = 32
    U, S, Vh = truncated_svd(L, R, k, route="randomized")
    _, S_ex, _ = torch.linalg.svd(W)
    # Singular values: 1e-3 relative to the largest.
    torch.testing.assert_close(S, S_ex[:k], atol=1e-3 * float(S_ex[0]), rtol=0)
    # Eckart–Young: the rank-k error within 0.1% of the optimum.
    err = torch.linalg.matrix_norm(W - (U * S) @ Vh)
    best = S_ex[k:].square().sum().sqrt()
    assert err <= 1.001 * best
    # Orthonormal factors.
    torch.testing.assert_close(U.T @ U, torch.eye(k, dtype=U.dtype), atol=1e-8, rtol=0)
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(k, dtype=U.dtype), atol=1e-8, rtol=0)


def test_auto_route_is_exact_for_few_clients_and_randomized_for_many():
    g = gen(1)
    L, R = _many_clients_update(g, clients=4)  # total rank 32 <= d / 2: factors route, exact
    U, S, Vh = truncated_svd(L, R, 8)
    U2, S2, Vh2 = truncated_svd(L, R, 8, route="svd")
    torch.testing.assert_close(S, S2)
    torch.testing.assert_close((U * S) @ Vh, (U2 * S2) @ Vh2)
    L, R = _many_clients_update(g, clients=40)
    W = L @ R
    a = truncated_svd(L, R, 8)
    b = randomized_svd(W, 8, torch.Generator().manual_seed(0))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    # A low-rank ΔW is reproduced to rounding.
    low = torch.randn(256, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 256, generator=g, dtype=torch.float64)
    U, S, Vh = randomized_svd(low, 8, gen(2))
    torch.testing.assert_close((U * S) @ Vh, low, atol=1e-9, rtol=0)


def _kmeans_cost(X, w, assign, sign, C):
    """Weighted sum of squared sign-aligned distances to the centres."""
    return float((w * ((X * sign[:, None] - C[assign]) ** 2).sum(dim=1)).sum())


def test_sketched_kmeans_finds_the_clusters_of_the_full_kmeans():
    g = gen(3)
    d, k = 384, 12  # 768 coordinates, sketched to 128
    centres = torch.randn(k, 2 * d, generator=g, dtype=torch.float64)
    truth = torch.arange(300) % k
    signs = torch.where(torch.rand(300, generator=g) < 0.5, -1.0, 1.0).double()
    X = (centres[truth] + 0.2 * torch.randn(300, 2 * d, generator=g, dtype=torch.float64)) * signs[:, None]
    w = torch.rand(300, generator=g, dtype=torch.float64) + 0.1
    sketch = sketch_matrix(2 * d, 128, 0, 0, "m")
    a_s, s_s, C_s = sign_invariant_kmeans(X, w, k, gen(4), sketch=sketch)
    a_f, s_f, C_f = sign_invariant_kmeans(X, w, k, gen(4))
    # Same partition (up to cluster labels) and same centres: the exact means of the members.
    pairs = set(zip(a_s.tolist(), a_f.tolist()))
    assert len(pairs) == k == len(set(a_s.tolist()))
    relabel = dict(pairs)
    for c in range(k):
        members = a_s == c
        mean = (X[members] * (w[members] * s_s[members])[:, None]).sum(0) / w[members].sum()
        torch.testing.assert_close(C_s[c], mean)
        torch.testing.assert_close(C_s[c].abs(), C_f[relabel[c]].abs())


def test_sketched_kmeans_cost_on_unstructured_components_is_close_to_the_full_one():
    """Random components (no cluster structure, the worst case for a sketch):
    the k-means cost, measured on the full points, within 3% of the full clustering's."""
    g = gen(5)
    b = torch.randn(384, 600, generator=g, dtype=torch.float64)
    a = torch.randn(600, 384, generator=g, dtype=torch.float64)
    X = balanced_points(b, a)
    w = torch.rand(600, generator=g, dtype=torch.float64) + 0.1
    full = sign_invariant_kmeans(X, w, 16, gen(6))
    sketched = sign_invariant_kmeans(X, w, 16, gen(6), sketch=sketch_matrix(768, 128, 0, 0, "m"))
    cost_full, cost_sketch = _kmeans_cost(X, w, *full), _kmeans_cost(X, w, *sketched)
    assert cost_sketch <= 1.03 * cost_full


def test_sketch_applies_only_where_it_halves_the_coordinates():
    assert sketch_matrix(255, 128, 0, 0, "m") is None
    assert sketch_matrix(4096, 0, 0, 0, "m") is None
    S = sketch_matrix(256, 128, 0, 0, "m")
    assert S.shape == (256, 128)
    assert torch.equal(S, sketch_matrix(256, 128, 0, 0, "m"))
    assert not torch.equal(S, sketch_matrix(256, 128, 0, 1, "m"))
