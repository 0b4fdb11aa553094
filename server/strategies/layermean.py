"""LayerMean: average each module over the clients that trained it: FedRA's
aggregation and the stand-in for Fed-piLot's (docs/algorithms.md#layermean).
For each module m, with C_m the clients whose upload contains m:

    C_m non-empty: A_m <- sum_{k in C_m} w_k A_{k,m},  B_m likewise
    C_m empty:     A_m, B_m keep their previous value

The weights are w_k = 1/|C_m| for ``weighting="uniform"`` (FedRA, the default)
or n_k / sum_{j in C_m} n_j for ``weighting="samples"``. The head is averaged
over all uploads with the same rule. Clients may hold different block sets
(``ClientInfo.blocks``), but every client trains one rank. State: FedIT's.
"""

from __future__ import annotations

from .base import RoundResult, StrategyError, Upload
from .common import (FACTOR_NAMES, check_uploads, clone_tree, merge_head, uploads_by_module, weighted_mean,
                     weights)
from .fedit import FedIT

WEIGHTINGS = ("uniform", "samples")


class LayerMean(FedIT):
    """Per-module mean over the clients that trained the module (FedRA, Fed-piLot).

    Options: ``weighting`` is "uniform" (FedRA's rule, the default) or
    "samples". FedRA's random block allocation belongs to whoever sets
    ``ClientInfo.blocks``; the aggregation itself draws nothing.
    """

    name = "layermean"
    block_subsets = True

    def __init__(self, weighting: str = "uniform", seed: int = 0):
        super().__init__(seed)
        if weighting not in WEIGHTINGS:
            raise StrategyError(f"layermean: weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self.weighting = weighting

    def _weights(self, uploads: list[Upload]) -> list[float]:
        if self.weighting == "uniform":
            return [1.0 / len(uploads)] * len(uploads)
        return weights(uploads)

    def aggregate(self, state: dict, uploads: list[Upload], round_index: int) -> RoundResult:
        """Average each module over the uploads that contain it. A module that
        no upload contains keeps its previous value."""
        check_uploads(self, state, uploads, FACTOR_NAMES, every_module=False)
        new = clone_tree(state)
        for m, have in uploads_by_module(state["A"], uploads):
            w = self._weights(have)
            for which in FACTOR_NAMES:
                new[which][m] = weighted_mean([getattr(u.factors[m], which) for u in have], w, state[which][m])
        new["head"] = merge_head(self, state, uploads, uniform=self.weighting == "uniform")
        return RoundResult(state=new)
