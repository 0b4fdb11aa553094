"""FedEx-LoRA: exact aggregation through a residual folded into the frozen weights.

Per module and round (fedlora-algorithms.md, section 7), with one rank r and
s = alpha / r for every client:

    M = Σ p_k s B_k A_k,   Ā = Σ p_k A_k,   B̄ = Σ p_k B_k
    R = M − s B̄ Ā                   -> base_deltas (d_out x d_in)
    W0' + s B̄ Ā = W0 + M            exactly: the ideal average of the products

Clients continue from (B̄, Ā) with no re-initialisation. Fold the residual in
the layer's own orientation (``fold.fold_into`` with PEFT's fan_in_fan_out).

State layout: the FedIT layout (``fedit.py``):
    {"rank": int, "alpha": float, "A": {module: r x d_in}, "B": {module: d_out x r}, "extra": {...}}
"""

from __future__ import annotations

import torch

from .base import Factors, RoundResult, Upload, weights
from .fedit import (FACTOR_NAMES, FedIT, check_uploads, clone_tree,
                    merge_extra, weighted_mean)


def residual(ws: list[float], factors: list[Factors], A_bar: torch.Tensor, B_bar: torch.Tensor,
             scale: float) -> torch.Tensor:
    """``Σ w_k s_k B_k A_k − scale · B̄ Ā`` (d_out x d_in), in at least float32.

    The products are summed as one stacked product [w_k s_k B_k] @ [A_k]
    (one matmul instead of K)."""
    dtype = torch.promote_types(A_bar.dtype, torch.float32)
    L = torch.cat([f.B.detach().to(dtype) * (w * f.scale) for w, f in zip(ws, factors)], dim=1)
    R = torch.cat([f.A.detach().to(dtype) for f in factors], dim=0)
    return L @ R - scale * (B_bar.to(dtype) @ A_bar.to(dtype))


class FedExLoRA(FedIT):
    """FedEx-LoRA (Singhal et al., ACL 2025): FedAvg of A and B plus the residual
    M − s B̄Ā merged into the frozen weights, so the served model equals the
    exact weighted mean of the clients' updates. One rank for every client.

    Uses no randomness; ``seed`` is accepted so that every strategy can be
    built with the same options.
    """

    name = "fedex"

    def aggregate(self, state: dict, uploads: list[Upload], round_index: int) -> RoundResult:
        """Ā, B̄ per module and the residual M − s B̄Ā as the base delta."""
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
        new["extra"] = merge_extra(self, state, uploads)
        return RoundResult(state=new, base_deltas=deltas)
