"""Rank clustering's points in factor form (rank_clustering.py).

The point of component n is ``x_n = [fb_n b_n; fa_n a_n]``: the balanced pair
of ``balanced_points`` with its client's scale s_k and its sign folded into
the two per-point scales. A linear sketch of the points therefore needs only
products of the raw factors,

    x_n @ S = fb_n (b_n @ S_b) + fa_n (a_n @ S_a),      S = [S_b; S_a],

and the weighted mean of a cluster's members only sums of scaled factors, so
the N x (d_out + d_in) points are never formed (N is about 25,000 per module
for 1,000 clients). Everything runs in the factors' own precision (at least
float32); the points in full and their float64 means are ``balanced_points``'s
job when no sketch is used.

The clients' factors are stacked as they lie: the B columns side by side
(d_out x N, no transposed copy) and the A rows one under the other (N x d_in),
into buffers of a ``Workspace`` (products.py) that every module of a round reuses. Fresh
buffers of this size (~75 MB each at 1,000 clients) cost more in page faults
than the copy into them.
"""

from __future__ import annotations

import torch

from .base import Factors
from .products import Workspace, matmul_bt


def stack_factors(factors: list[Factors], dtype: torch.dtype, workspace: Workspace
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(b, a, s)``: the clients' B factors side by side (d_out x N), their A
    factors stacked (N x d_in), both in ``dtype`` on the CPU and held by
    ``workspace``, and each component's client scale s_k = alpha_k / r_k (N)."""
    Bs = [_plain(f.B, dtype) for f in factors]
    As = [_plain(f.A, dtype) for f in factors]
    ranks = [f.rank for f in factors]
    n = sum(ranks)
    b = torch.cat(Bs, dim=1, out=workspace.take("b", (Bs[0].shape[0], n), dtype))
    a = torch.cat(As, dim=0, out=workspace.take("a", (n, As[0].shape[1]), dtype))
    s = torch.tensor([f.scale for f in factors], dtype=dtype).repeat_interleave(torch.tensor(ranks))
    return b, a, s


def _plain(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as a CPU tensor of ``dtype`` without autograd history (itself when it is one already:
    with 1,000 clients and 24 modules the three conversion calls add up to a tenth of a second)."""
    if t.dtype == dtype and t.device.type == "cpu" and not t.requires_grad:
        return t
    return t.detach().cpu().to(dtype)


def point_scales(b: torch.Tensor, a: torch.Tensor, s: torch.Tensor, workspace: Workspace
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(fb, fa, na)``: per-component scales with ``x_n = [fb_n b_n; fa_n a_n]``
    equal to ``balanced_points``'s point of ``(s_n b_n, a_n)`` (balanced,
    largest-|.| entry of the A half positive), and the raw norms ||a_n||.
    ``b`` holds the b columns (d_out x N), ``a`` the rows (N x d_in), ``s``
    the N client scales. A zero component gets zero scales (the zero point)."""
    # Column norms as a row sum of the squares: a norm over dim 0 is several times slower.
    nb = torch.mul(b, b, out=workspace.take("squares", tuple(b.shape), b.dtype)).sum(dim=0).sqrt_() * s.abs()
    na = torch.linalg.vector_norm(a, dim=1)
    root = (nb * na).sqrt()
    # The balanced b half is (root / nb) (s_n b_n): its coefficient on the raw column carries s_n.
    fb = torch.where(nb > 0, root / torch.where(nb > 0, nb, 1), 0) * s
    fa = torch.where(na > 0, root / torch.where(na > 0, na, 1), 0)
    sign = _lead_sign(a)
    return fb * sign, fa * sign, na


def _lead_sign(a: torch.Tensor) -> torch.Tensor:
    """The sign (+1/-1) of each row's first largest-|.| entry (+1 for a zero row).

    From the row maxima and minima (two vectorised passes); only rows whose
    maximum and minimum tie in size are looked at entry by entry."""
    hi, lo = a.amax(dim=1), a.amin(dim=1)
    sign = torch.where(hi >= -lo, 1.0, -1.0).to(a.dtype)
    tie = ((hi == -lo) & (hi > 0)).nonzero().squeeze(1)
    if tie.numel():
        rows = a[tie]
        lead = rows.gather(1, rows.abs().argmax(dim=1, keepdim=True)).squeeze(1)
        sign[tie] = torch.where(lead < 0, -1.0, 1.0).to(a.dtype)
    return sign


def sketched_points(b: torch.Tensor, a: torch.Tensor, scales: tuple[torch.Tensor, torch.Tensor],
                    sketch: torch.Tensor) -> torch.Tensor:
    """The points projected by ``sketch`` ((d_out + d_in) x p): N x p in the
    factors' precision, from two products of the factors as they are stacked."""
    fb, fa = scales
    d_out = b.shape[0]
    S = sketch.to(b.dtype)
    Y = matmul_bt(a, S[d_out:].T).mul_(fa[:, None])  # N x p
    Yb = matmul_bt(S[:d_out].T, b.T).mul_(fb[None, :])  # p x N: b is read in place
    return Y.add_(Yb.T)


def member_means(b: torch.Tensor, a: torch.Tensor, scales: tuple[torch.Tensor, torch.Tensor], w: torch.Tensor,
                 sign: torch.Tensor, assign: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k centres as ``(Cb, Ca)``: Cb (d_out x k) and Ca (k x d_in) halves of
    the w-weighted means of the sign-aligned member points; a centre with no
    weight is zero. Sums run in the factors' precision."""
    fb, fa = scales
    n = a.shape[0]
    signed = (w * sign).to(a.dtype)
    tot = torch.zeros(k, dtype=torch.float64).index_add_(0, assign, w.double())
    inv = torch.where(tot > 0, 1 / torch.where(tot > 0, tot, 1), 0).to(a.dtype)
    columns = torch.arange(n)
    # A halves: a sparse k x N membership matrix, one pass over the rows.
    M = torch.sparse_coo_tensor(torch.stack([assign, columns]), signed * fa, (k, n), check_invariants=False)
    Ca = torch.sparse.mm(M, a) * inv[:, None]
    # B halves: the same membership as a dense k x N matrix times the columns (b @ M.T),
    # which reads b in its own layout.
    Mt = torch.zeros(k, n, dtype=a.dtype)
    Mt[assign, columns] = signed * fb
    Cb = matmul_bt(b, Mt) * inv[None, :]
    return Cb, Ca
