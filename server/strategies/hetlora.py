"""HetLoRA: heterogeneous ranks by truncation, self-pruning and sparsity
weights (docs/algorithms.md#hetlora). The server holds B_g (d_out x r_max) and
A_g (r_max x d_in). Per round:

    download:  client k gets B_g[:, :r_k], A_g[:r_k, :] at its CURRENT rank r_k,
               and the regulariser's lambda and gamma in ``Download.options``
    client:    its half of the method (edge/hetlora.py): the rank regulariser
               in the loss and self-pruning; the upload reports the (possibly
               smaller) rank, which the state keeps from then on
    server:    zero-pad every upload to r_max,
               w_k = ||B_k A_k||_F / sum_j ||B_j A_j||_F,
               B_g = sum_k w_k pad(B_k),  A_g = sum_k w_k pad(A_k)

Choices the paper leaves open:

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

State: the slot layout (common.py) at r_max, plus
    "ranks": {client: int}          # each client's current rank (only decreases)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .base import ClientInfo, Download, Factors, GlobalModel, RoundResult, Strategy, StrategyError, Upload
from .common import (acc_dtype, check_hetero_client, check_hetero_uploads, clone_tree, download_slots,
                     export_slots, hetero_initial_state, merge_head, slot_shapes, uploads_by_module, weights)

DEFAULT_LAMBDA = 1e-3  # FlexLoRA's re-implementation of HetLoRA
DEFAULT_GAMMA = 0.99


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


# --------------------------------------------------------------------- strategy

class HetLoRA(Strategy):
    """HetLoRA: truncated downloads, rank self-pruning, sparsity-weighted zero-padding.

    Options: ``lam`` (lambda, the penalty weight, default 1e-3) and ``gamma``
    (the decay factor, default 0.99), also accepted as ``hetlora_lambda`` /
    ``hetlora_gamma``; they reach clients in ``Download.options``.
    """

    name = "hetlora"
    heterogeneous_ranks = True
    block_subsets = True

    def __init__(self, lam: float | None = None, gamma: float | None = None, seed: int = 0, *,
                 hetlora_lambda: float | None = None, hetlora_gamma: float | None = None):
        for short, long in ((lam, hetlora_lambda), (gamma, hetlora_gamma)):
            if short is not None and long is not None:
                raise StrategyError("hetlora: give lam/gamma or hetlora_lambda/hetlora_gamma, not both")
        lam = next((v for v in (lam, hetlora_lambda) if v is not None), DEFAULT_LAMBDA)
        gamma = next((v for v in (gamma, hetlora_gamma) if v is not None), DEFAULT_GAMMA)
        super().__init__(seed)
        if not float(lam) >= 0.0:
            raise StrategyError(f"hetlora: lambda must be non-negative, got {lam}")
        if not 0.0 < float(gamma) < 1.0:
            raise StrategyError(f"hetlora: gamma must lie in (0, 1), got {gamma}")
        self.lam = float(lam)
        self.gamma = float(gamma)

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
        check_hetero_uploads(self, slot_shapes(state), uploads, r_max=state["rank"], alpha=state["alpha"],
                             truncated=True)
        for u in uploads:
            before = state["ranks"].get(u.client)
            if before is not None and u.rank > before:
                raise StrategyError(
                    f"hetlora: client {u.client!r} uploaded rank {u.rank} but its rank is already {before}; "
                    "HetLoRA ranks only ever decrease")
        new = clone_tree(state)
        r_max = state["rank"]
        for m, have in uploads_by_module(state["A"], uploads):  # a module nobody trained keeps its value
            A_old = state["A"][m]
            dtype = acc_dtype(A_old.dtype)
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
        new["head"] = merge_head(self, state, uploads)
        return RoundResult(state=new)

    def export(self, state: dict) -> GlobalModel:
        """A_g and B_g at r_max, and the head."""
        return export_slots(state)
