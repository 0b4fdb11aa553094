"""HetLoRA: heterogeneous ranks by truncation, self-pruning and sparsity weights.

(fedlora-algorithms.md, section 3.) The server holds B_g (d_out x r_max) and
A_g (r_max x d_in). Per round:

    download:  client k gets B_g[:, :r_k], A_g[:r_k, :] at its CURRENT rank r_k
    client:    loss + lambda * ||B[:, t:r_k]||_F * ||A[t:r_k, :]||_F,  t = floor(gamma * r_k)
               (``rank_penalty``); if that tail-norm product shrank during the
               round, r_k <- floor(gamma * r_k) (``pruned_rank``) and the upload
               reports the smaller rank, which the state keeps from then on
    server:    zero-pad every upload to r_max,
               w_k = ||B_k A_k||_F / sum_j ||B_j A_j||_F,
               B_g = sum_k w_k pad(B_k),  A_g = sum_k w_k pad(A_k)

Choices the notes leave open:

- The sparsity weights are computed per module (each module has its own
  B_k A_k), over the uploads that contain the module.
- If every uploaded product of a module is zero, the weights fall back to the
  sample weights p_k (the formula would divide 0 by 0).
- A rank slot that no upload of the round owns gets B = 0, exactly what the
  zero-padding formula gives, but keeps its previous A rows: with both factors
  zero no gradient could ever reach that slot again, should a client with that
  rank turn up later. The global update s*B_g*A_g is the formula's either way.
- Factors are aggregated as they are, without the alpha/r scale, as in the
  method; every client trains with the state's alpha (``Download.alpha``).
- Modules are aggregated over the uploads that contain them, so clients may
  hold block subsets; a module nobody uploaded keeps its value.

This module also holds the helpers that RBLA (rbla.py) and rank clustering
(fedinc.py) share: the state at r_max, the per-client rank checks, and
``pad_factors`` / ``truncate_factors``.

State layout (every value can be checkpointed):
    {"rank": r_max, "alpha": float,
     "A": {module: r_max x d_in}, "B": {module: d_out x r_max},
     "extra": {name: tensor},        # averaged non-LoRA trainables (a head)
     "ranks": {client: int}}         # each client's current rank (only decreases)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .base import ClientInfo, Download, Factors, RoundResult, Strategy, StrategyError, Upload, weights
from .fedit import (acc_dtype, check_initial_shapes, check_upload_clients, clone, clone_tree, download_slots,
                    initial_rank_alpha, lora_state, merge_extra, outside_blocks, repeated, uploads_by_module)

DEFAULT_LAMBDA = 1e-3  # FlexLoRA's re-implementation (notes, section 3)
DEFAULT_GAMMA = 0.99


# ----------------------------------------------------------------- client side

def _check_gamma(gamma: float) -> None:
    if not 0.0 < float(gamma) < 1.0:
        raise ValueError(f"hetlora: gamma must lie in (0, 1), got {gamma}")


def tail_start(rank: int, gamma: float) -> int:
    """floor(gamma * rank): the first rank slot of the tail that the penalty shrinks.

    A tiny tolerance keeps floating error from flooring an exact product one
    too low (0.29 * 100 is 28.999...), and the tail always keeps at least one
    slot."""
    _check_gamma(gamma)
    if rank < 1:
        raise ValueError(f"hetlora: rank must be at least 1, got {rank}")
    return min(int(math.floor(float(gamma) * rank + 1e-9)), rank - 1)


def rank_penalty(A: torch.Tensor, B: torch.Tensor, rank: int, gamma: float) -> torch.Tensor:
    """HetLoRA's rank regulariser ||B[:, t:r]||_F * ||A[t:r, :]||_F with t = floor(gamma r).

    Differentiable in A and B (only their tail slots get a gradient); the
    client adds ``lambda * rank_penalty(...)`` to its loss. At B = 0 the
    gradient is zero, not NaN (torch takes the zero subgradient of the norm).
    """
    if A.dim() != 2 or B.dim() != 2:
        raise ValueError(f"hetlora: expected A r x d_in and B d_out x r, got {tuple(A.shape)} and {tuple(B.shape)}")
    if rank > A.shape[0] or rank > B.shape[1]:
        raise ValueError(f"hetlora: rank {rank} exceeds the factors' rank (A {tuple(A.shape)}, B {tuple(B.shape)})")
    t = tail_start(rank, gamma)
    return torch.linalg.matrix_norm(B[:, t:rank]) * torch.linalg.matrix_norm(A[t:rank, :])


def pruned_rank(rank: int, gamma: float, norm_before: float, norm_after: float) -> int:
    """The client's rank after a round of self-pruning.

    ``norm_before`` / ``norm_after`` are ``rank_penalty`` (without lambda) at the
    start and at the end of local training. If the tail-norm product shrank,
    the tail is dropped: floor(gamma * rank), never below 1; otherwise the rank
    stays. It never grows."""
    if float(norm_after) < float(norm_before):
        return max(1, tail_start(rank, gamma))
    return rank


# ------------------------------------------------------ shared rank helpers

def pad_factors(A: torch.Tensor, B: torch.Tensor, r_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """New tensors A (r_max x d_in) and B (d_out x r_max): the pair zero-padded to r_max."""
    r = A.shape[0]
    if r > r_max or B.shape[1] != r:
        raise StrategyError(f"cannot pad A {tuple(A.shape)}, B {tuple(B.shape)} to rank {r_max}")
    A_pad = A.new_zeros((r_max, A.shape[1]))
    B_pad = B.new_zeros((B.shape[0], r_max))
    A_pad[:r] = A
    B_pad[:, :r] = B
    return A_pad, B_pad


def truncate_factors(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of the first ``rank`` slots: A[:rank, :], B[:, :rank]."""
    if rank < 1 or rank > A.shape[0] or rank > B.shape[1]:
        raise StrategyError(f"cannot truncate A {tuple(A.shape)}, B {tuple(B.shape)} to rank {rank}")
    return clone(A[:rank]), clone(B[:, :rank])


def product_norm(A: torch.Tensor, B: torch.Tensor) -> float:
    """||B A||_F without forming the d_out x d_in product: sqrt(sum((B^T B) * (A A^T)))."""
    A64, B64 = A.detach().double(), B.detach().double()
    sq = ((B64.T @ B64) * (A64 @ A64.T)).sum()
    return math.sqrt(max(float(sq), 0.0))


def sparsity_weights(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[float] | None:
    """HetLoRA's weights w_k = ||B_k A_k||_F / sum_j ||B_j A_j||_F for (A_k, B_k) pairs.

    None when every product is zero (the weights are then undefined)."""
    norms = [product_norm(A, B) for A, B in pairs]
    total = sum(norms)
    if not total > 0 or not math.isfinite(total):
        return None
    return [n / total for n in norms]


def hetero_initial_state(strategy: Strategy, initial: dict[str, Factors], clients: list[ClientInfo]) -> dict:
    """The state before round 0 for a heterogeneous-rank method: the initial
    global LoRA at r_max (its rank), which every client's rank must not exceed."""
    strategy.check(clients)
    name = strategy.name
    # Shapes first: an empty initial LoRA passes them and is refused just below.
    check_initial_shapes(strategy, initial)
    r_max, alpha = initial_rank_alpha(strategy, initial)
    dupes = repeated([c.client for c in clients])
    if dupes:
        raise StrategyError(f"{name}: client(s) {dupes} listed more than once")
    for c in clients:
        if not 1 <= c.rank <= r_max:
            raise StrategyError(
                f"{name}: client {c.client!r} trains rank {c.rank}, outside 1..{r_max} (the initial "
                f"LoRA's rank, which is the largest rank of the run)")
    return lora_state(initial, r_max, alpha)


def check_hetero_client(strategy: Strategy, state: dict, client: ClientInfo) -> None:
    """Refuse a download for a client whose rank does not fit the state."""
    strategy.check([client])
    if not 1 <= client.rank <= state["rank"]:
        raise StrategyError(
            f"{strategy.name}: client {client.client!r} trains rank {client.rank}, outside "
            f"1..{state['rank']} (this run's largest rank)")


def check_hetero_uploads(strategy: Strategy, state: dict, uploads: list[Upload], *, same_alpha: bool,
                         truncate: bool = False) -> None:
    """Refuse uploads that do not fit the state.

    Each upload's factors must have rank ``Upload.rank`` (with ``truncate``,
    at least that rank: the tail beyond it has been pruned) and the state's
    widths; its rank must lie in 1..r_max. With ``same_alpha`` every factor
    must carry the state's alpha (methods that average raw factors)."""
    name = strategy.name
    check_upload_clients(strategy, uploads)
    known = set(state["A"])
    r_max = state["rank"]
    for u in uploads:
        who = f"{name}: upload from client {u.client!r}"
        if u.num_samples < 0:
            raise StrategyError(f"{who} has a negative sample count {u.num_samples}")
        if not 1 <= u.rank <= r_max:
            raise StrategyError(f"{who} has rank {u.rank}, outside 1..{r_max} (this run's largest rank)")
        unknown = sorted(set(u.factors) - known)
        if unknown:
            raise StrategyError(f"{who} names unknown module(s) {unknown}")
        outside = outside_blocks(u)
        if outside:
            raise StrategyError(f"{who} contains module(s) {outside} outside its blocks {sorted(u.layers)}")
        for module, f in u.factors.items():
            d_in = state["A"][module].shape[1]
            d_out = state["B"][module].shape[0]
            r = f.A.shape[0] if f.A.dim() == 2 else -1
            if f.A.dim() != 2 or f.B.dim() != 2 or f.A.shape[1] != d_in or f.B.shape != (d_out, r):
                raise StrategyError(
                    f"{who}: {module} has A {tuple(f.A.shape)}, B {tuple(f.B.shape)}; expected "
                    f"A r x {d_in} and B {d_out} x r")
            if (r < u.rank) if truncate else (r != u.rank):
                raise StrategyError(f"{who}: {module} has rank {r} but the upload says rank {u.rank}")
            if same_alpha and not math.isclose(float(f.alpha), state["alpha"]):
                raise StrategyError(
                    f"{who}: {module} was trained with alpha {f.alpha} but this run uses alpha {state['alpha']}")


# --------------------------------------------------------------------- strategy

class HetLoRA(Strategy):
    """HetLoRA: truncated downloads, rank self-pruning, sparsity-weighted zero-padding.

    Options: ``lam`` (lambda, the penalty weight, default 1e-3) and ``gamma``
    (the decay factor, default 0.99), also accepted as ``hetlora_lambda`` /
    ``hetlora_gamma``; they reach clients in ``Download.options``. ``seed`` is
    unused, since the method is deterministic.
    """

    name = "hetlora"
    heterogeneous_ranks = True
    layer_subsets = True

    def __init__(self, lam: float = DEFAULT_LAMBDA, gamma: float = DEFAULT_GAMMA, seed: int = 0, *,
                 hetlora_lambda: float | None = None, hetlora_gamma: float | None = None):
        if hetlora_lambda is not None:
            lam = hetlora_lambda
        if hetlora_gamma is not None:
            gamma = hetlora_gamma
        if not float(lam) >= 0.0:
            raise StrategyError(f"hetlora: lambda must be non-negative, got {lam}")
        if not 0.0 < float(gamma) < 1.0:
            raise StrategyError(f"hetlora: gamma must lie in (0, 1), got {gamma}")
        self.lam = float(lam)
        self.gamma = float(gamma)
        self.seed = seed

    def init_state(self, initial: dict[str, Factors], clients: list[ClientInfo]) -> dict:
        """The initial LoRA at r_max, and every client's starting rank."""
        state = hetero_initial_state(self, initial, clients)
        state["ranks"] = {c.client: int(c.rank) for c in clients}
        return state

    def current_rank(self, state: dict, client: ClientInfo) -> int:
        """The client's rank now: the smaller of its recorded (possibly pruned)
        rank and the rank it declares."""
        return min(int(state["ranks"].get(client.client, client.rank)), client.rank)

    def download(self, state: dict, client: ClientInfo, round_index: int) -> Download:
        """B_g[:, :r_k] and A_g[:r_k, :] of the client's modules at its current
        rank, the head, and the penalty settings in ``options``."""
        check_hetero_client(self, state, client)
        return download_slots(state, client, self.current_rank(state, client),
                              options={"hetlora_lambda": self.lam, "hetlora_gamma": self.gamma})

    def aggregate(self, state: dict, uploads: list[Upload], round_index: int) -> RoundResult:
        """Sparsity-weighted mean of the zero-padded uploads, per module; record
        pruned ranks."""
        check_hetero_uploads(self, state, uploads, same_alpha=True, truncate=True)
        for u in uploads:
            before = state["ranks"].get(u.client)
            if before is not None and u.rank > before:
                raise StrategyError(
                    f"hetlora: client {u.client!r} uploaded rank {u.rank} but its rank is already {before}; "
                    "HetLoRA ranks only ever decrease")
        new = clone_tree(state)
        r_max = state["rank"]
        for m, have in uploads_by_module(state, uploads):  # a module nobody trained keeps its value
            A_old = state["A"][m]
            dtype = acc_dtype(A_old)
            # A pruned client's tail beyond its reported rank is dropped.
            dev = A_old.device
            pairs = [(u.factors[m].A[:u.rank].detach().to(device=dev, dtype=dtype),
                      u.factors[m].B[:, :u.rank].detach().to(device=dev, dtype=dtype)) for u in have]
            w = sparsity_weights(pairs)
            if w is None:
                w = weights(have)
            A_new = torch.zeros((r_max, A_old.shape[1]), dtype=dtype, device=dev)
            B_new = torch.zeros((state["B"][m].shape[0], r_max), dtype=dtype, device=dev)
            for wk, (A, B) in zip(w, pairs):
                r = A.shape[0]
                A_new[:r].add_(A, alpha=wk)
                B_new[:, :r].add_(B, alpha=wk)
            owned = max(A.shape[0] for A, _ in pairs)
            A_new[owned:] = A_old[owned:]  # unowned slots: B = 0 as padding gives, A kept trainable
            new["A"][m] = A_new.to(A_old.dtype)
            new["B"][m] = B_new.to(state["B"][m].dtype)
        for u in uploads:
            new["ranks"][u.client] = int(u.rank)
        new["extra"] = merge_extra(self, state, uploads)
        return RoundResult(state=new)
