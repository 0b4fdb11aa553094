"""FedEx-LoRA: exact aggregation through a residual folded into the frozen
weights (docs/algorithms.md#fedex). Per module and round, with one rank r and
s = alpha / r for every client:

    M = sum p_k s B_k A_k,   Ā = sum p_k A_k,   B̄ = sum p_k B_k
    R = M - s B̄ Ā                   -> base_deltas (d_out x d_in)
    W0' + s B̄ Ā = W0 + M            exactly: the ideal average of the products

Clients continue from (B̄, Ā) with no re-initialisation. The residual is
folded in the layer's own orientation (``split.lora.fold_into``). State:
FedIT's.
"""

from __future__ import annotations

import torch

from .base import Factors, RoundResult, Upload
from .common import FACTOR_NAMES, check_uploads, clone_tree, merge_head, weighted_mean, weights
from .fedit import FedIT
from .products import factor_sum


def residual(ws: list[float], factors: list[Factors], A_bar: torch.Tensor, B_bar: torch.Tensor,
             scale: float) -> torch.Tensor:
    """``sum w_k s_k B_k A_k - scale * B̄ Ā`` (d_out x d_in), in at least float32."""
    dtype = torch.promote_types(A_bar.dtype, torch.float32)
    M = factor_sum([w * f.scale for w, f in zip(ws, factors)], factors, dtype)
    return M.addmm_(B_bar.to(dtype), A_bar.to(dtype), alpha=-scale)


class FedExLoRA(FedIT):
    """FedEx-LoRA (Singhal et al., ACL 2025): FedAvg of A and B plus the residual
    M - s B̄Ā merged into the frozen weights, so the served model equals the
    exact weighted mean of the clients' updates. One rank for every client.
    """

    name = "fedex"
    frozen_updates = True

    def aggregate(self, state: dict, uploads: list[Upload], round_index: int) -> RoundResult:
        """Ā, B̄ per module and the residual M - s B̄Ā as the base delta."""
        check_uploads(self, state, uploads, FACTOR_NAMES)
        p = weights(uploads)
        scale = state["alpha"] / state["rank"]
        new = clone_tree(state)
        deltas = {}
        for m in state["A"]:
            factors = [u.factors[m] for u in uploads]
            A_bar = weighted_mean([f.A for f in factors], p, state["A"][m])
            B_bar = weighted_mean([f.B for f in factors], p, state["B"][m])
            new["A"][m], new["B"][m] = A_bar, B_bar
            # From the stored (possibly half-precision) pair: the residual must
            # complete exactly what the clients will load.
            deltas[m] = residual(p, factors, A_bar, B_bar, scale)
        new["head"] = merge_head(self, state, uploads)
        return RoundResult(state=new, base_deltas=deltas)
