"""Rank clustering's points in factor form (rank_clustering.py).

The point of component n is ``x_n = [fb_n b_n; fa_n a_n]``: the balanced pair
of ``balanced_points`` with its sign folded into the two per-point scales. A
linear sketch of the points therefore needs only products of the raw factors,

    x_n @ S = fb_n (b_n @ S_b) + fa_n (a_n @ S_a),      S = [S_b; S_a],

and the weighted mean of a cluster's members only sums of scaled factor rows,
so the N x (d_out + d_in) points are never formed (N is about 25,000 per module
for 1,000 clients). Everything runs in the factors' own precision (at least
float32); the points in full and their float64 means are ``balanced_points``'s
job when no sketch is used.
"""

from __future__ import annotations

import torch

from .products import matmul


def point_scales(bt: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fb, fa)``: per-component scales with ``x_n = [fb_n b_n; fa_n a_n]``
    equal to ``balanced_points``'s point (balanced, largest-|.| entry of the
    A half positive). ``bt`` holds the b columns as rows (N x d_out), ``a`` is
    N x d_in. A zero component gets zero scales (the zero point)."""
    nb = torch.linalg.vector_norm(bt, dim=1)
    na = torch.linalg.vector_norm(a, dim=1)
    root = (nb * na).sqrt()
    fb = torch.where(nb > 0, root / torch.where(nb > 0, nb, 1), 0)
    fa = torch.where(na > 0, root / torch.where(na > 0, na, 1), 0)
    lead = a.gather(1, a.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    sign = torch.where(lead < 0, -1.0, 1.0).to(a.dtype)
    return fb * sign, fa * sign


def sketched_points(bt: torch.Tensor, a: torch.Tensor, scales: tuple[torch.Tensor, torch.Tensor],
                    sketch: torch.Tensor) -> torch.Tensor:
    """The points projected by ``sketch`` ((d_out + d_in) x p): N x p, float64
    (as ``sign_invariant_kmeans`` takes them), from two products of the factors."""
    fb, fa = scales
    d_out = bt.shape[1]
    S = sketch.to(bt.dtype)
    Y = matmul(bt, S[:d_out]).mul_(fb[:, None])
    Y.add_(matmul(a, S[d_out:]).mul_(fa[:, None]))
    return Y.double()


def member_means(bt: torch.Tensor, a: torch.Tensor, scales: tuple[torch.Tensor, torch.Tensor], w: torch.Tensor,
                 sign: torch.Tensor, assign: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k centres as ``(Cb, Ca)``: Cb (d_out x k) and Ca (k x d_in) halves of
    the w-weighted means of the sign-aligned member points; a centre with no
    weight is zero. Sums run in the factors' precision."""
    fb, fa = scales
    n = a.shape[0]
    signed = (w * sign).to(a.dtype)
    tot = torch.zeros(k, dtype=torch.float64).index_add_(0, assign, w.double())
    inv = torch.where(tot > 0, 1 / torch.where(tot > 0, tot, 1), 0).to(a.dtype)
    index = torch.stack([assign, torch.arange(n)])

    def sums(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        # A sparse k x N membership matrix: one pass over the rows.
        M = torch.sparse_coo_tensor(index, values, (k, n), check_invariants=False)
        return torch.sparse.mm(M, rows) * inv[:, None]

    return sums(signed * fb, bt).T, sums(signed * fa, a)
