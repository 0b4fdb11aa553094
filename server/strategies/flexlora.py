"""FlexLoRA: heterogeneous ranks through an SVD of the aggregated full-size
update (docs/algorithms.md#flexlora). Per module and round:

    ΔW_g = sum_k p_k (alpha_k / r_k) B_k A_k          (replaces the global LoRA; W0 untouched)
    ΔW_g = U Σ Vᵀ,   a client of rank r downloads
    B = U[:, :r] diag(Σ[:r]) / (alpha / r),   A = Vᵀ[:r, :]

so that (alpha/r) B A is the best rank-r approximation of ΔW_g (Eckart–Young),
and ΔW_g itself once r reaches its rank.

The truncated SVD never needs more than the top ``keep`` singular triplets,
``keep`` being the largest rank in use. It is computed once per module per
round (``truncated_svd``). Exact through QR factors of the stacked client
factors when their total rank is at most half the module's width; beyond that
(many clients) from the dense ΔW_g by a randomized SVD, an approximation
whose tolerance against the exact SVD is tested and stated in
docs/aggregation-scale.md (``route="svd"`` or ``"gram"`` keeps it exact at
any size).

State layout (every value can be checkpointed):
    {"alpha": float, "ranks": [int], "keep": int,
     "shapes": {module: [d_out, d_in]},
     "global": {module: {"US": d_out x t, "S": t, "Vh": t x d_in}},   # ΔW_g = US @ Vh
     "head": {name: tensor}}
"""

from __future__ import annotations

import torch

from split.seeds import generator

from .base import TRAIN_BOTH, ClientInfo, Download, Factors, GlobalModel, RoundResult, Strategy, StrategyError, Upload
from .common import (acc_dtype, check_hetero_uploads, client_modules, clone_tree, initial_alpha, initial_shapes,
                     merge_head, module_uploads, stacked)
from .products import Workspace, factor_sum, matmul, matmul_bt

ROUTES = ("auto", "factors", "gram", "svd", "randomized")
# Randomized route: extra sampled directions and power iterations (Halko, Martinsson
# and Tropp 2011, alg. 4.4); with these the rank-k result is within the tolerance
# that tests/test_aggregation_scale.py checks against the exact SVD.
OVERSAMPLE, POWER_ITERATIONS = 16, 4


# ---------------------------------------------------------------- truncated SVD of L @ R

def _orthonormal_rows(basis: torch.Tensor, count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` unit rows orthogonal to the row space of ``basis`` (t x d) and to
    each other, as far as d allows; any rows beyond d are random unit rows.

    They stand in for the singular vectors of zero singular values: their B
    columns are zero, so they change nothing in the product but give the client
    trainable directions (as a full SVD's null-space vectors would)."""
    t, d = basis.shape
    dtype, device = basis.dtype, basis.device
    X = torch.randn(count, d, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    room = max(0, d - t)
    k = min(count, room)
    if k:
        Qb = torch.linalg.qr(basis.T)[0] if t else basis.new_zeros(d, 0)  # d x t orthonormal
        Y = X[:k].T  # d x k
        for _ in range(2):  # twice: one Gram–Schmidt pass loses orthogonality in float32
            Y = Y - Qb @ (Qb.T @ Y)
        X[:k] = torch.linalg.qr(Y)[0].T
    if count > k:
        X[k:] = X[k:] / X[k:].norm(dim=1, keepdim=True)
    return X


def truncated_svd(L: torch.Tensor, R: torch.Tensor, k: int, route: str = "auto"
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` singular triplets of ``W = L @ R`` (L: m x N, R: N x n).

    Returns ``U`` (m x t), ``S`` (t), ``Vh`` (t x n), ``t = min(k, N, m, n)``,
    singular values descending. Routes, all exact up to rounding:

    - ``factors``: W has rank <= N; QR of L and of Rᵀ leaves an N x N core whose
      SVD gives W's. Cheap when N is well below min(m, n).
    - ``gram``: dense W, top eigenvectors of the smaller Gram matrix, then a
      Rayleigh–Ritz step (SVD of W V) so that U, S, V are those of W itself.
      Faster than a full SVD when k is well below min(m, n).
    - ``svd``: dense W and ``torch.linalg.svd``.
    - ``randomized``: dense W, then a randomized range finder with power
      iterations and a Rayleigh–Ritz step: an approximation, much cheaper than
      an exact SVD of a large W when k is well below min(m, n)
      (``randomized_svd``; docs/aggregation-scale.md gives its tested accuracy).
    - ``auto`` picks ``factors`` when it applies (exact), otherwise
      ``randomized`` when k is well below min(m, n), otherwise ``svd``.
    """
    m, N = L.shape
    n = R.shape[1]
    route = pick_route(route, m, N, n, k)
    if route == "factors":
        t = min(k, N, m, n)
        Ql, Rl = torch.linalg.qr(L)      # m x N, N x N
        Qr, Rr = torch.linalg.qr(R.T)    # n x N, N x N
        u, s, vh = torch.linalg.svd(Rl @ Rr.T)
        return Ql @ u[:, :t], s[:t], vh[:t] @ Qr.T
    return dense_truncated_svd(matmul(L, R), min(k, N), route)


def pick_route(route: str, m: int, N: int, n: int, k: int) -> str:
    """The route ``truncated_svd`` takes for an m x n product of stacked rank N
    and ``k`` triplets: ``route`` itself unless it is ``auto``."""
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    if route != "auto":
        return route
    if 2 * N <= min(m, n):
        return "factors"
    if 2 * (k + OVERSAMPLE) <= min(m, n):
        return "randomized"
    return "svd"


def dense_truncated_svd(W: torch.Tensor, k: int, route: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` singular triplets of a dense ``W`` by the ``randomized``,
    ``svd`` or ``gram`` route of ``truncated_svd``; t = min(k, m, n) of them."""
    m, n = W.shape
    t = min(k, m, n)
    if route == "randomized":
        # A fixed draw: the sketch only has to be generic, and a fixed one keeps the route deterministic.
        return randomized_svd(W, t, torch.Generator().manual_seed(0))
    if route == "svd":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return U[:, :t], S[:t], Vh[:t]
    # gram: work on the smaller side of W, so the Gram matrix is min(m, n) square.
    flip = m < n
    X = W.T if flip else W  # rows >= columns
    _, vecs = torch.linalg.eigh(X.T @ X)  # ascending eigenvalues
    V = vecs[:, -t:].flip(-1)
    u, s, wh = torch.linalg.svd(X @ V, full_matrices=False)  # Rayleigh–Ritz on span(V)
    U, Vh = u, wh @ V.T
    return (Vh.T, s, U.T) if flip else (U, s, Vh)


def randomized_svd(W: torch.Tensor, k: int, gen: torch.Generator, oversample: int = OVERSAMPLE,
                   iterations: int = POWER_ITERATIONS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Approximate top-``k`` singular triplets of ``W`` (m x n): a random
    (k + oversample)-column sketch, ``iterations`` power iterations with
    re-orthonormalisation, then the exact SVD of W restricted to the subspace
    found. Costs O(m n (k + oversample) iterations) instead of an O(m n min(m, n))
    SVD. Deterministic for a generator state."""
    m, n = W.shape
    width = min(k + oversample, m, n)
    omega = torch.randn(n, width, generator=gen, dtype=torch.float32).to(dtype=W.dtype, device=W.device)
    Wt = W.T.contiguous()  # products with Wᵀ run as products with W's rows (matmul_bt)
    Q = torch.linalg.qr(matmul_bt(W, omega.T))[0]
    for _ in range(iterations):
        Q = torch.linalg.qr(matmul_bt(Wt, Q.T))[0]
        Q = torch.linalg.qr(matmul_bt(W, Q.T))[0]
    u, s, vh = torch.linalg.svd(matmul_bt(Q.T, Wt), full_matrices=False)  # Rayleigh–Ritz on span(Q)
    return Q @ u[:, :k], s[:k], vh[:k]


def svd_entry(L: torch.Tensor, R: torch.Tensor, keep: int, gen: torch.Generator,
              route: str = "auto") -> dict[str, torch.Tensor]:
    """A module's state entry for ΔW = L @ R: ``US`` (d_out x t), ``S``, ``Vh``
    (t x d_in) with t = min(keep, d_in), padded with zero singular values and
    orthonormal completion rows when ΔW has fewer than t singular triplets."""
    return _padded_entry(*truncated_svd(L, R, keep, route), keep, gen)


def svd_entry_dense(W: torch.Tensor, stacked_rank: int, keep: int, gen: torch.Generator,
                    route: str) -> dict[str, torch.Tensor]:
    """``svd_entry`` from the dense ΔW (of rank at most ``stacked_rank``) by a
    dense route (``randomized``, ``svd`` or ``gram``)."""
    return _padded_entry(*dense_truncated_svd(W, min(keep, stacked_rank), route), keep, gen)


def _padded_entry(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, keep: int,
                  gen: torch.Generator) -> dict[str, torch.Tensor]:
    t = min(keep, Vh.shape[1])
    if S.shape[0] < t:
        missing = t - S.shape[0]
        Vh = torch.cat([Vh, _orthonormal_rows(Vh, missing, gen)], dim=0)
        U = torch.cat([U, U.new_zeros(U.shape[0], missing)], dim=1)
        S = torch.cat([S, S.new_zeros(missing)])
    return {"US": U * S, "S": S, "Vh": Vh.contiguous()}


# ---------------------------------------------------------------- strategy

class FlexLoRA(Strategy):
    """FlexLoRA (Bai et al., NeurIPS 2024): clients of any rank; the server
    averages the full-size updates and hands each client the best approximation
    of that average at its own rank.

    The run's seed drives the completion rows (singular vectors of zero
    singular values). Option: ``route`` forces one SVD route (``truncated_svd``).
    A client whose rank exceeds every rank in use so far (``state["keep"]``)
    receives the best rank-keep approximation plus zero-valued directions
    until it has uploaded once.
    """

    name = "flexlora"
    heterogeneous_ranks = True
    mixed_alphas = True

    def __init__(self, seed: int = 0, route: str = "auto"):
        super().__init__(seed)
        if route not in ROUTES:
            raise StrategyError(f"{self.name}: route must be one of {ROUTES}, got {route!r}")
        self.route = route

    def init_state(self, initial: dict[str, Factors], clients: list[ClientInfo]) -> dict:
        """State holding the initial global LoRA as an SVD (or, when its B is zero,
        as its own A rows, so that round-0 clients start from the usual random A)."""
        self.check(clients)
        alpha, shapes = initial_alpha(self, initial), initial_shapes(self, initial)
        ranks = sorted({int(c.rank) for c in clients} | {f.rank for f in initial.values()})
        keep = max(ranks)
        glob = {}
        for module, f in initial.items():
            dtype = acc_dtype(f.A.dtype)
            if not bool(torch.any(f.B != 0)):
                # ΔW = 0 has no singular directions; keep PEFT's random A rows instead.
                A = f.A.detach().to(dtype).clone()
                glob[module] = {"US": A.new_zeros(shapes[module][0], A.shape[0]),
                                "S": A.new_zeros(A.shape[0]), "Vh": A}
            else:
                L, R = stacked([1.0], [f], dtype)
                glob[module] = svd_entry(L, R, keep, generator(self.seed, "svd", "init", module), self.route)
        return {"alpha": alpha, "ranks": ranks, "keep": keep, "shapes": shapes, "global": glob, "head": {}}

    def download(self, state: dict, client: ClientInfo, round_index: int) -> Download:
        """B = U_r Σ_r / (alpha / r) and A = V_rᵀ of every module the client holds."""
        self.check([client])
        r = int(client.rank)
        if r < 1:
            raise StrategyError(f"{self.name}: client {client.client!r} has rank {r}; ranks start at 1")
        A, B = self._factors(state, client_modules(state["shapes"], client), r, "download", round_index)
        return Download(A=A, B=B, rank=r, alpha=state["alpha"], trainable=TRAIN_BOTH,
                        head=clone_tree(state["head"]))

    def export(self, state: dict) -> GlobalModel:
        """The best rank-``keep`` approximation of ΔW_g as LoRA factors, and the head."""
        keep = int(state["keep"])
        A, B = self._factors(state, state["shapes"], keep, "export")
        return GlobalModel(A=A, B=B, rank=keep, alpha=state["alpha"], head=clone_tree(state["head"]))

    def _factors(self, state: dict, modules, r: int, *draw) -> tuple[dict, dict]:
        """Rank-``r`` factors of ``modules``; rows beyond the stored SVD are
        orthonormal completions drawn from (seed, ``draw``, module) with B = 0."""
        scale = state["alpha"] / r
        A, B = {}, {}
        for module in modules:
            entry = state["global"][module]
            US, Vh = entry["US"], entry["Vh"]
            have = Vh.shape[0]
            if r > have:
                missing = r - have
                Vh = torch.cat([Vh, _orthonormal_rows(Vh, missing, generator(self.seed, *draw, module))])
                US = torch.cat([US, US.new_zeros(US.shape[0], missing)], dim=1)
            A[module] = Vh[:r].clone()
            B[module] = US[:, :r] / scale
        return A, B

    def aggregate(self, state: dict, uploads: list[Upload], round_index: int) -> RoundResult:
        """ΔW_g = Σ p_k s_k B_k A_k per module, kept as its top-``keep`` SVD.
        Modules nobody uploaded keep their previous global LoRA."""
        check_hetero_uploads(self, state["shapes"], uploads)
        ranks = sorted(set(state["ranks"]) | {int(u.rank) for u in uploads})
        keep = max(ranks)
        glob = dict(state["global"])  # entries replaced, never modified in place
        workspace = Workspace()  # factor_sum's stacking buffers, reused from module to module
        for module in state["shapes"]:
            ws, factors = module_uploads(uploads, module)
            if not factors:
                continue
            dtype = acc_dtype(factors[0].A.dtype)
            gen = generator(self.seed, "svd", round_index, module)
            d_out, d_in = state["shapes"][module]
            N = sum(f.rank for f in factors)
            if pick_route(self.route, d_out, N, d_in, keep) == "factors":
                L, R = stacked(ws, factors, dtype)
                glob[module] = svd_entry(L, R, keep, gen, "factors")
            else:
                # Dense routes: ΔW_g formed block by block, never the whole stacked pair (products.py).
                W = factor_sum([w * f.scale for w, f in zip(ws, factors)], factors, dtype, workspace=workspace)
                glob[module] = svd_entry_dense(W, N, keep, gen, pick_route(self.route, d_out, N, d_in, keep))
        new = {**state, "ranks": ranks, "keep": keep, "global": glob, "head": merge_head(self, state, uploads)}
        return RoundResult(state=clone_tree(new))
