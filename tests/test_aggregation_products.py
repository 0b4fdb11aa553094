"""The fast paths of aggregation with many clients (docs/aggregation-scale.md)
against the computations they replace:

- ``factor_sum`` and ``matmul`` (server/strategies/products.py) against float64
  products: float32 inputs to 1e-5 of the largest entry (float32 rounding of a
  sum of ~1,000 terms), float64 inputs to 1e-12;
- FLoRA, FedEx-LoRA, LoRA-FAIR and FlexLoRA's dense route against the product
  of the whole stacked pair, at the same float32 tolerance;
- rank clustering's factor-form sketch (server/strategies/component_points.py)
  against clustering the full balanced points with the same sketch and draws.
"""

from __future__ import annotations

import pytest
import torch

from server.strategies import get_strategy
from server.strategies.base import ClientInfo, Factors, Upload
from server.strategies.common import stacked, weights
from server.strategies.fedex import residual
from server.strategies.flexlora import randomized_svd
from server.strategies.products import factor_sum, matmul, matmul_bt
from server.strategies.rank_clustering import balanced_points, sign_invariant_kmeans, sketch_matrix
from split.seeds import generator

D_OUT, D_IN, ALPHA = 160, 144, 16.0
MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).abs().max() / ref.double().abs().max())


def random_factors(g, ranks, dtype=torch.float32):
    return [Factors(torch.randn(r, D_IN, generator=g, dtype=dtype), torch.randn(D_OUT, r, generator=g, dtype=dtype),
                    ALPHA) for r in ranks]


def reference_sum(coeffs, factors):
    return sum(c * (f.B.double() @ f.A.double()) for c, f in zip(coeffs, factors))


@pytest.mark.parametrize("chunk", [1, 40, 10_000])
def test_factor_sum_is_the_stacked_product(chunk):
    g = gen(0)
    ranks = [int(r) for r in torch.randint(1, 20, (60,), generator=g)]
    factors = random_factors(g, ranks)
    coeffs = torch.rand(60, generator=g).tolist()
    out = factor_sum(coeffs, factors, torch.float32, chunk=chunk)
    assert out.dtype == torch.float32 and out.shape == (D_OUT, D_IN)
    assert rel_err(out, reference_sum(coeffs, factors)) < 1e-5
    exact = factor_sum(coeffs, [Factors(f.A.double(), f.B.double(), f.alpha) for f in factors], torch.float64,
                       chunk=chunk)
    assert rel_err(exact, reference_sum(coeffs, factors)) < 1e-12


def test_factor_sum_refuses_what_it_cannot_sum():
    with pytest.raises(ValueError, match="at least one"):
        factor_sum([], [], torch.float32)
    with pytest.raises(ValueError, match="2 coefficients for 1"):
        factor_sum([1.0, 2.0], random_factors(gen(1), [3]), torch.float32)


@pytest.mark.parametrize("shape", [(300, 500, 200), (7, 3, 5), (0, 4, 6), (5, 0, 6)])
def test_matmul_matches_the_float64_product(shape):
    m, k, n = shape
    g = gen(2)
    a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    ref = a.double() @ b.double()
    for x, y in ((a, b), (a.T.contiguous().T, b.T.contiguous().T)):  # contiguous and transposed layouts
        out = matmul(x, y)
        assert out.shape == (m, n) and out.dtype == torch.float32
        if out.numel() and ref.abs().max() > 0:
            assert rel_err(out, ref) < 1e-5
        else:
            assert not torch.any(out)
    a64, b64 = a.double(), b.double()
    assert torch.equal(matmul(a64, b64), a64 @ b64)


# ------------------------------------------------------------------ strategies against the stacked product

def one_rank_round(name, rank=8, clients=40, **options):
    """A one-rank strategy's state and a round of float32 uploads (N = 320 > d / 2)."""
    g = gen(3)
    strategy = get_strategy(name, seed=0, **options)
    infos = [ClientInfo(f"c{k}", rank, ALPHA, None, int(torch.randint(1, 50, (1,), generator=g)))
             for k in range(clients)]
    initial = {m: Factors(torch.randn(rank, D_IN, generator=g) / 12, torch.zeros(D_OUT, rank), ALPHA) for m in MODULES}
    state = strategy.init_state(initial, infos)
    uploads = [Upload(c.client, {m: Factors(torch.randn(rank, D_IN, generator=g), torch.randn(D_OUT, rank, generator=g),
                                            ALPHA) for m in MODULES}, c.num_samples, rank) for c in infos]
    return strategy, state, uploads


def mixed_round(name, clients=40):
    g = gen(4)
    strategy = get_strategy(name, seed=0)
    ranks = [(2, 4, 8, 16)[k % 4] for k in range(clients)]
    infos = [ClientInfo(f"c{k}", r, ALPHA, None, 1 + k) for k, r in enumerate(ranks)]
    initial = {m: Factors(torch.randn(16, D_IN, generator=g) / 12, torch.zeros(D_OUT, 16), ALPHA) for m in MODULES}
    state = strategy.init_state(initial, infos)
    uploads = [Upload(c.client, {m: Factors(torch.randn(c.rank, D_IN, generator=g),
                                            torch.randn(D_OUT, c.rank, generator=g), ALPHA) for m in MODULES},
                      c.num_samples, c.rank) for c in infos]
    return strategy, state, uploads


def stacked_update(uploads, m, dtype=torch.float64):
    """Σ p_k s_k B_k A_k as one product of the whole stacked pair (the computation replaced)."""
    L, R = stacked(weights(uploads), [u.factors[m] for u in uploads], dtype)
    return L @ R


def test_flora_base_deltas_are_the_stacked_product():
    strategy, state, uploads = mixed_round("flora")
    deltas = strategy.aggregate(state, uploads, 0).base_deltas
    for m in MODULES:
        assert deltas[m].dtype == torch.float32
        assert rel_err(deltas[m], stacked_update(uploads, m)) < 1e-5


def test_fedex_residual_is_the_stacked_product_minus_the_mean_product():
    strategy, state, uploads = one_rank_round("fedex")
    result = strategy.aggregate(state, uploads, 0)
    p = weights(uploads)
    for m in MODULES:
        A_bar, B_bar = result.state["A"][m], result.state["B"][m]
        ref = stacked_update(uploads, m) - (ALPHA / 8) * (B_bar.double() @ A_bar.double())
        assert rel_err(result.base_deltas[m], ref) < 1e-5
        # The served model is still the exact mean of the clients' updates.
        served = result.base_deltas[m].double() + (ALPHA / 8) * (B_bar.double() @ A_bar.double())
        assert rel_err(served, stacked_update(uploads, m)) < 1e-5
        twin = residual(p, [u.factors[m] for u in uploads], A_bar.double(), B_bar.double(), ALPHA / 8)
        assert rel_err(twin, ref) < 1e-12  # float64 inputs: float64 throughout


def test_lorafair_solves_the_problem_of_the_stacked_product():
    strategy, state, uploads = one_rank_round("lorafair", steps=20, lr=1e-3)
    new = strategy.aggregate(state, uploads, 0).state
    for m in MODULES:
        # The cosine reached, recomputed densely from the stacked product.
        W = stacked_update(uploads, m)
        Y = new["B"][m].double() @ new["A"][m].double()
        cos = float((W * Y).sum() / (W.norm() * Y.norm()))
        assert new["cosine"][m] == pytest.approx(cos, abs=1e-5)
    fedit = get_strategy("fedit").aggregate(state, uploads, 0).state
    assert any(not torch.allclose(new["B"][m], fedit["B"][m]) for m in MODULES)  # the correction acts


def test_flexlora_dense_route_is_the_randomized_svd_of_the_stacked_product():
    strategy, state, uploads = mixed_round("flexlora")  # stacked rank 300 > d / 2: randomized route
    new = strategy.aggregate(state, uploads, 0).state
    for m in MODULES:
        W = stacked_update(uploads, m, torch.float32)
        U, S, Vh = randomized_svd(W, 16, gen(0))
        entry = new["global"][m]
        assert rel_err(entry["S"], S) < 1e-4
        assert rel_err(entry["US"] @ entry["Vh"], (U * S) @ Vh) < 1e-4


# ------------------------------------------------------------------ rank clustering in factor form

def test_sketched_rank_clustering_matches_clustering_the_full_points():
    """Components near 6 well-separated directions (128 + 128 coordinates,
    sketched to 64): the factor-form path gives the slots that clustering the
    full balanced points with the same sketch and draws gives."""
    g = gen(5)
    d = 128
    base_b, base_a = torch.randn(d, 6, generator=g), torch.randn(6, d, generator=g)
    strategy = get_strategy("fedinc", seed=3, sketch=64)
    ranks = [(2, 4, 6)[k % 3] for k in range(30)]
    infos = [ClientInfo(f"c{k}", r, ALPHA, None, 1 + k % 7) for k, r in enumerate(ranks)]
    m = "model.layers.0.self_attn.q_proj"
    initial = {m: Factors(torch.randn(6, d, generator=g) / 12, torch.zeros(d, 6), ALPHA)}
    state = strategy.init_state(initial, infos)
    uploads = []
    for c in infos:
        cols = torch.randperm(6, generator=g)[:c.rank]
        flip = torch.where(torch.rand(c.rank, generator=g) < 0.5, -1.0, 1.0)
        B = (base_b[:, cols] + 0.02 * torch.randn(d, c.rank, generator=g)) * flip
        A = (base_a[cols] + 0.02 * torch.randn(c.rank, d, generator=g)) * flip[:, None]
        uploads.append(Upload(c.client, {m: Factors(A, B, ALPHA)}, c.num_samples, c.rank))
    new = strategy.aggregate(state, uploads, 0).state
    got = new["B"][m].double() @ new["A"][m].double() * (ALPHA / 6)

    # The computation replaced: float64 balanced points, sketched inside the k-means.
    b = torch.cat([u.factors[m].B.double() * u.factors[m].scale for u in uploads], dim=1)
    a = torch.cat([u.factors[m].A.double() for u in uploads], dim=0)
    w = torch.cat([torch.full((u.rank,), pk, dtype=torch.float64) for pk, u in zip(weights(uploads), uploads)])
    assign, _, C = sign_invariant_kmeans(balanced_points(b, a), w, 6, generator(3, "kmeans", 0, m), 10,
                                         sketch_matrix(2 * d, 64, 3, 0, m))
    ref = sum(torch.outer(C[c, :d], C[c, d:]) for c in assign.unique().tolist())
    assert rel_err(got, ref) < 1e-5


def test_without_the_onednn_op_products_go_through_matmul(monkeypatch):
    from server.strategies import products
    a, b = torch.randn(7, 5), torch.randn(5, 3)
    with_op = products.matmul(a, b)
    monkeypatch.setattr(products, "_LINEAR", None)
    assert not products.use_onednn(a, b)
    assert torch.equal(products.matmul(a, b), a @ b)
    assert torch.allclose(with_op, a @ b, atol=1e-5)


def test_sketched_rank_clustering_gives_duplicate_components_one_cluster():
    """Clients upload the same 3 components (128 + 128 coordinates, sketched to
    64), each twice at half its size, split differently between B and A and
    some negated, at rank 6: seeding stops at 3 centres, one per component."""
    g = gen(8)
    d, r = 128, 6
    b = torch.randn(d, 3, generator=g, dtype=torch.float64) * torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    a = torch.randn(3, d, generator=g, dtype=torch.float64)
    m = "model.layers.0.self_attn.q_proj"
    strategy = get_strategy("fedinc", seed=1, sketch=64)
    infos = [ClientInfo(f"c{k}", r, ALPHA, None, 5 + k) for k in range(5)]
    state = strategy.init_state({m: Factors(torch.randn(r, d, generator=g, dtype=torch.float64) / 12,
                                            torch.zeros(d, r, dtype=torch.float64), ALPHA)}, infos)
    uploads = []
    for c in infos:
        cols = [0, 1, 2, 0, 1, 2]  # each component twice: 2 x b_j a_j^T / 2
        split = torch.rand(r, generator=g, dtype=torch.float64) * 3 + 0.2
        sign = torch.where(torch.rand(r, generator=g) < 0.5, -1.0, 1.0).double()
        B = b[:, cols] * (split * sign) / (ALPHA / r) / 2
        A = a[cols] / (split * sign)[:, None]
        uploads.append(Upload(c.client, {m: Factors(A, B, ALPHA)}, c.num_samples, r))
    new = strategy.aggregate(state, uploads, 0).state
    assert torch.count_nonzero(new["B"][m][:, 3:]) == 0  # 3 clusters: the other slots add nothing
    got = new["B"][m] @ new["A"][m] * (ALPHA / r)
    assert rel_err(got, b @ a / 2) < 1e-9  # each centroid is its mean member, b_j a_j^T / 2


def test_matmul_bt_takes_a_transposed_view_without_changing_the_product():
    g = gen(9)
    a, b = torch.randn(40, 70, generator=g), torch.randn(70, 30, generator=g)
    ref = a.double() @ b.double()
    assert rel_err(matmul_bt(a, b.T), ref) < 1e-5  # b.T: the view oneDNN reads in place
    assert rel_err(matmul_bt(a, b.T.contiguous()), ref) < 1e-5


def test_point_scales_match_balanced_points_with_tied_extremes():
    """The A half's sign comes from its first largest-|.| entry, also when the
    row's largest and smallest entries tie in size (+v and -v)."""
    from server.strategies.component_points import Workspace, point_scales
    g = gen(10)
    b = torch.randn(6, 5, generator=g, dtype=torch.float64)
    a = torch.randn(5, 7, generator=g, dtype=torch.float64)
    a[1, 2], a[1, 5] = -4.0, 4.0  # tie, negative first
    a[2, 0], a[2, 3] = 4.0, -4.0  # tie, positive first
    a[3] = 0.0  # a zero component
    s = torch.tensor([0.5, 2.0, 1.0, 1.0, -3.0], dtype=torch.float64)
    fb, fa, na = point_scales(b, a, s, Workspace())
    points = torch.cat([(b * fb).T, a * fa[:, None]], dim=1)
    torch.testing.assert_close(points, balanced_points(b * s, a), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(na, torch.linalg.vector_norm(a, dim=1))
