"""Rank clustering (FedInc-style): k-means over the clients' rank-1 components
(docs/algorithms.md#fedinc). Client k's update of a module is a sum of rank-1 components,

    s_k B_k A_k = sum_j (s_k b_kj) a_kj^T,   b_kj = B_k[:, j],  a_kj = A_k[j, :],  s_k = alpha_k / r_k,

so the components of all clients, whatever their ranks, live in one space.
Per module the server clusters all uploaded components into k = r_max
clusters with weighted k-means (weight of a component = its client's p_k);
each cluster's centroid (the p-weighted mean of its members) becomes one rank
slot of the global LoRA, slots ordered by the clusters' total weight, heaviest
first. Client k downloads the first r_k slots: the r_k heaviest clusters.

**How a component becomes a point.** The point of the pair (b, a) is the
concatenation [b~; a~] of the *balanced* pair b~ = b sqrt(sigma)/||b||,
a~ = a sqrt(sigma)/||a||, sigma = ||b|| ||a||, and distances are
sign-invariant: d(x, c) = min(||x - c||, ||x + c||).

- Balancing: b a^T is unchanged by (b c, a / c), so raw [b; a] would make
  the same component many points; LoRA's A rows are also far larger than its
  B columns, which would let A alone decide the clusters. Balancing leaves
  one point per component up to sign, with ||b~|| = ||a~||.
- Sign: (b, a) and (-b, -a) are the same component, so the distance and the
  centroid flip each member to the side of its centroid; for definiteness a
  point is also stored with the largest-|.| entry of a~ positive.
- Why not the vectorised outer product: it is d_out*d_in long per point
  (590k for a 768-wide layer) against d_out + d_in here, and a mean of outer
  products is not rank-1, so every centroid would need an SVD to become a
  slot. The centroid of balanced pairs is a pair, b~_c a~_c^T; if the
  members agree it is their common component exactly.

k-means: greedy k-means++ seeding (each centre the best of ``CANDIDATES``
points drawn by weight * D^2) drawn from ``split.seeds.generator(seed, round,
module)``, then at most ``iterations`` Lloyd steps (stopping early once the
assignment is stable), so clusters are deterministic for a seed. Seeding
stops early when every point coincides with a chosen centre, so duplicates
(clients sending the same component) share one cluster. Distances to a new
centre near zero and the final centroids are computed in the points' own
precision (float64 without a sketch); the bulk of seeding and Lloyd runs in
float32, which only decides which cluster a point joins.

**Slots.** Centroid c is the component b~_c a~_c^T. The state stores slot
j = c as A_g[j] = a~_c rho/||a~_c|| and B_g[:, j] = b~_c ||a~_c||/(rho s_g),
where rho is the members' mean raw ||a|| (so A rows keep the size clients
trained at) and s_g = alpha / r_max, so that s_g B_g A_g is the sum of the
centroids. A slot with no cluster (fewer distinct components than r_max)
gets B = 0 and keeps its previous A row, so it adds nothing yet can still
train; a cluster of zero components keeps its heaviest member's A row with B = 0.

**Download.** A rank-r client gets A_g[:r] and B_g[:, :r] * (r / r_max): with
the state's alpha its scale is alpha / r, so its update alpha/r B A equals
the sum of the r heaviest centroids, and a client that changes nothing
uploads those same components back. Uploads may carry any alpha; each is
used through its own scale s_k.

Each module is clustered over the uploads that contain it (clients may hold
block subsets); a module nobody uploaded keeps its value.

State: the slot layout (common.py) at r_max.
"""

from __future__ import annotations

import math

import torch

from split.seeds import generator

from .base import ClientInfo, Download, Factors, GlobalModel, RoundResult, Strategy, StrategyError, Upload
from .common import (acc_dtype, check_hetero_client, check_hetero_uploads, clone_tree, download_slots, export_slots,
                     hetero_initial_state, merge_head, slot_shapes, uploads_by_module, weights)
from .component_points import Workspace, member_means, point_scales, sketched_points, stack_factors
from .products import matmul_bt

# Relative squared distance below which a point counts as a chosen centre in the
# seeding (float64 rounding is ~1e-15; components this close are one component).
_SAME = 1e-9
# Candidates per centre of the greedy k-means++ seeding: on 12 well-separated clusters
# (tests/test_aggregation_scale.py's), 1 draw found them all in 42 of 80 seeded runs,
# 2 in 67, 3 in 78 (as many as scikit-learn's 2 + ln k); each costs a column of one product.
CANDIDATES = 3
DEFAULT_SKETCH = 128  # coordinates the clustering runs on (RankClustering's ``sketch``)


def balanced_points(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Points [b~; a~] (N x (d_out + d_in)) of N rank-1 components b_n a_n^T.

    ``b`` is d_out x N (columns, already scaled by s_k), ``a`` is N x d_in.
    b~_n a~_n^T == b_n a_n^T with ||b~_n|| == ||a~_n||, and the largest-|.|
    entry of a~_n is positive. A zero component gives the zero point."""
    nb = torch.linalg.vector_norm(b, dim=0)
    na = torch.linalg.vector_norm(a, dim=1)
    root = (nb * na).sqrt()
    fb = torch.where(nb > 0, root / torch.where(nb > 0, nb, 1), 0)
    fa = torch.where(na > 0, root / torch.where(na > 0, na, 1), 0)
    bt = b.T * fb[:, None]
    at = a * fa[:, None]
    lead = at.gather(1, at.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    sign = torch.where(lead < 0, -1.0, 1.0).to(at.dtype)
    return torch.cat([bt, at], dim=1) * sign[:, None]


def _raw_dist(X32: torch.Tensor, Xt: torch.Tensor, sq: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Sign-invariant squared distances min(||x - c||^2, ||x + c||^2) of every
    point to the points ``idx`` (len(idx) x N, float32, one product: one pass
    over the points for all of them; ``Xt`` is X32 transposed, contiguous).
    Coincident points come out as rounding noise around 0; ``_settle`` makes
    them exact."""
    # A few rows times the transposed points (MKL): a quarter faster than the points times a
    # few columns, and oneDNN's matmul takes twice as long for either (it repacks the points).
    G = (X32[idx] @ Xt).abs_()
    return torch.sub(sq[idx][:, None] + sq[None, :], G, alpha=2)


def _settle(d: torch.Tensor, D: torch.Tensor | None, exact: torch.Tensor, near_sq: torch.Tensor, i: int
            ) -> torch.Tensor:
    """``min(D, distance to point i)`` from ``d``, the float32 distances to
    point i (``_raw_dist``'s column): the points that come out near i
    (``near_sq`` is 1e-4 ||x||^2) are redone in float64 from ``exact`` (the
    points in their own precision), which is what tells a duplicate
    (distance 0) from a merely close point. Updates and returns ``d``."""
    near = (d <= near_sq + near_sq[i]).nonzero().squeeze(1)
    if near.numel() == 1 and int(near[0]) == i:
        d[i] = 0  # the usual case: only the centre itself is near it
    else:
        e, c = exact[near].double(), exact[i].double()
        e_sq, c_sq = (e * e).sum(dim=1), (c * c).sum()
        dn = (e_sq + c_sq - 2 * (e @ c).abs()).clamp_min_(0)
        d[near] = torch.where(dn <= _SAME * (e_sq + c_sq), 0, dn).float()
    return d if D is None else torch.minimum(d, D, out=d)


def _draw(p: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor | None:
    """``count`` indices drawn independently with probability proportional to
    ``p`` (non-negative), or None when ``p`` has no mass: uniforms from
    ``generator`` located in the float64 cumulative sum (a multinomial call
    costs several times more)."""
    cum = p.cumsum(0, dtype=torch.float64)
    total = float(cum[-1])
    if not total > 0:
        return None
    # u < total (a product rounded up to the total is pulled back), so the first
    # cumulative sum above u is at a point with mass.
    u = torch.rand(count, dtype=torch.float64, generator=generator).mul_(total).clamp_max_(math.nextafter(total, 0))
    return torch.searchsorted(cum, u, right=True)


def _kmeans(X32: torch.Tensor, exact: torch.Tensor, w: torch.Tensor, k: int, generator: torch.Generator,
            iterations: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Weighted sign-invariant k-means on float32 points ``X32`` (N x D):
    greedy k-means++ seeding, then Lloyd. ``exact`` holds the same points in
    their own precision, read only to settle which points coincide with a
    chosen centre. Returns (assign, sign (float32), chosen): each point's
    cluster, the sign aligning it with its centre, and the points seeded as
    centres.

    Greedy seeding (Arthur and Vassilvitskii's k-means++ with several
    candidates per centre, as scikit-learn does): each new centre is the
    best of ``CANDIDATES`` points drawn by weight * D^2, the one that lowers
    the weighted cost most. With one draw per centre, two centres land in one
    of a dozen well-separated clusters (and two others merge) about half the
    time; the candidates' distances come from one product, one pass over the
    points as for a single draw."""
    n = X32.shape[0]
    sq = (X32 * X32).sum(dim=1)
    near_sq = sq * 1e-4
    w32 = w.float()
    # The first centre drawn by weight, the next ones by weight * D^2.
    Xt = X32.T.contiguous()
    first = _draw(w32, 1, generator)
    chosen = [int(first[0])]
    D = _settle(_raw_dist(X32, Xt, sq, first)[0], None, exact, near_sq, chosen[0])
    while len(chosen) < min(k, n):
        idx = _draw(w32 * D, CANDIDATES, generator)
        if idx is None:
            break  # every point (with weight) coincides with a centre
        raw = _raw_dist(X32, Xt, sq, idx)  # candidates x N
        cost = (torch.minimum(raw, D[None, :]) @ w32).tolist()  # the weighted cost with each candidate added
        best = min(range(len(cost)), key=cost.__getitem__)
        chosen.append(idx.tolist()[best])
        D = _settle(raw[best], D, exact, near_sq, chosen[-1])
    # Lloyd in float32: the argmin needs no more.
    C32 = X32[chosen]
    assign = sign = None
    for _ in range(max(1, iterations)):
        G = matmul_bt(X32, C32)  # N x k'
        # ||c||^2 - 2 |x.c|, in place: with many points these N x k' passes cost more than the product.
        new_assign = G.abs().mul_(-2).add_((C32 * C32).sum(dim=1)[None, :]).argmin(dim=1)
        new_sign = torch.where(G.gather(1, new_assign[:, None]).squeeze(1) < 0, -1.0, 1.0)
        if assign is not None and torch.equal(new_assign, assign) and torch.equal(new_sign, sign):
            break  # stable: C32 already holds the means of this assignment
        assign, sign = new_assign, new_sign
        C32 = _means(X32, w32 * sign, w32, assign, C32)
    return assign, sign, chosen


def sign_invariant_kmeans(X: torch.Tensor, w: torch.Tensor, k: int, generator: torch.Generator,
                          iterations: int = 10, sketch: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted k-means on points up to sign, deterministic for a generator state.

    ``X`` is N x D (float64), ``w`` the N non-negative weights (not all zero).
    Returns (assign, sign, centres): each point's cluster, the sign (+1/-1)
    that aligns it with its centre, and the k' <= k centres (k' < k when
    fewer than k points are distinct up to sign). Centres are the w-weighted
    means of their sign-aligned members; a centre that loses every member
    keeps its place.

    With ``sketch`` (D x p), seeding and Lloyd run on the projected points
    ``X @ sketch`` (a random projection preserves distances, and so the
    clustering, up to a tolerance: docs/aggregation-scale.md); the centres
    returned are still the exact weighted means of the members in X's space."""
    n = X.shape[0]
    if n == 0 or k < 1:
        raise ValueError("sign_invariant_kmeans needs at least one point and one cluster")
    if sketch is None:
        X32, exact = X.float(), X
    else:
        X32 = X.float() @ sketch.float()
        exact = X32
    assign, sign, chosen = _kmeans(X32, exact, w, k, generator, iterations)
    sign = sign.to(torch.float64)
    # The centres returned are the float64 means of the final assignment, in the points' own space.
    return assign, sign, _means(X, w * sign, w, assign, X[chosen])


def _means(X: torch.Tensor, signed_w: torch.Tensor, w: torch.Tensor, assign: torch.Tensor,
           C: torch.Tensor) -> torch.Tensor:
    """Weighted means of the sign-aligned members; empty clusters keep their centre."""
    k, n = C.shape[0], X.shape[0]
    # A sparse k x N membership matrix: one pass over X, several times faster than index_add_ on rows.
    M = torch.sparse_coo_tensor(torch.stack([assign, torch.arange(n)]), signed_w.to(X.dtype), (k, n),
                                check_invariants=False)
    sums = torch.sparse.mm(M, X)
    tot = torch.zeros(k, dtype=X.dtype).index_add_(0, assign, w.to(X.dtype))
    return torch.where((tot > 0)[:, None], sums / torch.where(tot > 0, tot, 1)[:, None], C)


def sketch_matrix(dims: int, sketch: int, seed: int, round_index: int, module: str) -> torch.Tensor | None:
    """The seeded Gaussian projection (dims x sketch, entries N(0, 1/sketch)) that
    clustering runs on, or None when ``sketch`` is 0 or would not at least halve ``dims``."""
    if sketch == 0 or dims < 2 * sketch:
        return None
    gen = generator(seed, "sketch", round_index, module)
    return torch.randn(dims, sketch, generator=gen) / sketch ** 0.5


class RankClustering(Strategy):
    """FedInc-style aggregation: k-means over all clients' rank-1 components,
    one global rank slot per cluster, slots ordered by cluster weight.

    The run's seed drives the k-means++ draws and the sketch. Options:
    ``iterations`` (at most this many Lloyd steps; default 10) and ``sketch``
    (default 128): when the points have at least twice that many coordinates
    (d_out + d_in), the clustering runs on a seeded Gaussian projection of
    them to ``sketch`` coordinates, which cuts its cost by about
    (d_out + d_in) / sketch; 0 clusters the full points. The sketch changes
    only which cluster a point joins, and only near ties (tested against the
    full clustering in tests/test_aggregation_scale.py); centroids and slots
    are computed exactly from the members.
    """

    name = "fedinc"
    heterogeneous_ranks = True
    mixed_alphas = True
    block_subsets = True

    def __init__(self, seed: int = 0, iterations: int = 10, sketch: int = DEFAULT_SKETCH):
        super().__init__(seed)
        if int(iterations) < 1:
            raise StrategyError(f"fedinc: iterations must be at least 1, got {iterations}")
        if int(sketch) < 0:
            raise StrategyError(f"fedinc: sketch must be 0 (off) or a number of coordinates, got {sketch}")
        self.iterations = int(iterations)
        self.sketch = int(sketch)

    def init_state(self, initial: dict[str, Factors], clients: list[ClientInfo]) -> dict:
        """The initial LoRA at r_max (the largest rank of the run)."""
        return hetero_initial_state(self, initial, clients)

    def download(self, state: dict, client: ClientInfo, round_index: int) -> Download:
        """The r_k heaviest slots of the client's modules, B rescaled so that the
        client's update at alpha / r_k equals the sum of those slots; and the head."""
        check_hetero_client(self, state, client)
        download = download_slots(state, client, client.rank)
        factor = client.rank / state["rank"]  # (alpha / r_max) / (alpha / r_k)
        download.B = {m: B * factor for m, B in download.B.items()}
        return download

    def aggregate(self, state: dict, uploads: list[Upload], round_index: int) -> RoundResult:
        """Cluster each module's uploaded components; centroids become the slots."""
        check_hetero_uploads(self, slot_shapes(state), uploads, r_max=state["rank"])
        new = clone_tree(state)
        workspace = Workspace()  # the stacking buffers, shared by the modules of this call
        for m, have in uploads_by_module(state["A"], uploads):
            new["A"][m], new["B"][m] = self._module(state, m, have, round_index, workspace)
        new["head"] = merge_head(self, state, uploads)
        return RoundResult(state=new)

    def export(self, state: dict) -> GlobalModel:
        """The slots at r_max (their update is the sum of the centroids), and the head."""
        return export_slots(state)

    def _module(self, state: dict, m: str, have: list[Upload], round_index: int, workspace: Workspace):
        A_old, B_old = state["A"][m], state["B"][m]
        r_max = state["rank"]
        d_out, d_in = B_old.shape[0], A_old.shape[1]
        p = weights(have)
        w = torch.tensor(p, dtype=torch.float64).repeat_interleave(torch.tensor([u.factors[m].rank for u in have]))
        gen = generator(self.seed, "kmeans", round_index, m)
        sketch = sketch_matrix(d_out + d_in, self.sketch, self.seed, round_index, m)
        if sketch is None:
            # All components of all clients: b columns scaled by each client's s_k.
            # Clustering runs on the CPU, where the seeded generator lives.
            b = torch.cat([u.factors[m].B.detach().cpu().double() * u.factors[m].scale for u in have], dim=1)
            a = torch.cat([u.factors[m].A.detach().cpu().double() for u in have], dim=0)
            assign, sign, C = sign_invariant_kmeans(balanced_points(b, a), w, r_max, gen, self.iterations)
            k, Cb, Ca = C.shape[0], C[:, :d_out].T, C[:, d_out:]
            raw_na = torch.linalg.vector_norm(a, dim=1)
        else:
            # Sketched: the points are never formed in full (component_points.py).
            b, a, scale = stack_factors([u.factors[m] for u in have], acc_dtype(A_old.dtype), workspace)
            fb, fa, raw_na = point_scales(b, a, scale, workspace)
            Y = sketched_points(b, a, (fb, fa), sketch)
            assign, sign, chosen = _kmeans(Y.float(), Y, w, r_max, gen, self.iterations)
            k = len(chosen)
            Cb, Ca = (t.double() for t in member_means(b, a, (fb, fa), w, sign.to(a.dtype), assign, k))
        tot = torch.zeros(k, dtype=torch.float64).index_add_(0, assign, w)
        raw_a = torch.zeros(k, dtype=torch.float64).index_add_(
            0, assign, w * raw_na.double())
        live = (tot > 0).nonzero().squeeze(1).tolist()
        nb_c = torch.linalg.vector_norm(Cb, dim=0).tolist()
        na_c = torch.linalg.vector_norm(Ca, dim=1).tolist()
        mag = {c: nb_c[c] * na_c[c] for c in live}
        order = sorted(live, key=lambda c: (-float(tot[c]), -mag[c], c))

        A_new = A_old.detach().cpu().to(torch.float64, copy=True)  # unfilled slots keep their A row ...
        B_new = torch.zeros((d_out, r_max), dtype=torch.float64)  # ... and add nothing (B = 0)
        s_g = state["alpha"] / r_max
        for j, c in enumerate(order):
            rho = float(raw_a[c] / tot[c])
            na = na_c[c]
            if mag[c] > 0 and rho > 0:
                A_new[j] = Ca[c] * (rho / na)
                B_new[:, j] = Cb[:, c] * (na / (rho * s_g))
            else:
                # A cluster of zero components: keep a trainable A row from its heaviest member.
                members = (assign == c).nonzero().squeeze(1)
                A_new[j] = a[members[w[members].argmax()]].double()
        return A_new.to(device=A_old.device, dtype=A_old.dtype), B_new.to(device=B_old.device, dtype=B_old.dtype)
