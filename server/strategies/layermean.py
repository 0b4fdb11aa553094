"""LayerMean: average each module over the clients that trained it.

This is FedRA's aggregation and the stand-in the notes give for Fed-piLot's
STAgg (fedlora-algorithms.md, sections 1 and 2). For each module m, with C_m
the clients whose upload contains m:

    C_m non-empty: A_m <- sum_{k in C_m} w_k A_{k,m},  B_m likewise
    C_m empty:     A_m, B_m keep their previous value

The weights are w_k = 1/|C_m| for ``weighting="uniform"`` (FedRA, the default)
or n_k / sum_{j in C_m} n_j for ``weighting="samples"``. The head (``extra``)
is averaged over all uploads with the same rule. Clients may hold different
block sets (``ClientInfo.layers``), but every client trains one rank.

State layout: as FedIT's, {"rank", "alpha", "A", "B", "extra"}.
"""

from __future__ import annotations

from .base import ClientInfo, Download, Factors, RoundResult, Strategy, StrategyError, Upload, weights
from .fedit import (FACTOR_NAMES, check_client, check_uploads, clone_tree, download_slots, initial_state,
                    merge_extra, outside_blocks, uploads_by_module, weighted_mean)

WEIGHTINGS = ("uniform", "samples")


class LayerMean(Strategy):
    """Per-module mean over the clients that trained the module (FedRA, Fed-piLot).

    Options: ``weighting`` is "uniform" (FedRA's rule, the default) or
    "samples". ``seed`` is unused, since the method is deterministic; FedRA's
    random layer allocation belongs to whoever sets ``ClientInfo.layers``.
    """

    name = "layermean"
    layer_subsets = True

    def __init__(self, weighting: str = "uniform", seed: int = 0):
        if weighting not in WEIGHTINGS:
            raise StrategyError(f"layermean: weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self.weighting = weighting
        self.seed = seed

    def init_state(self, initial: dict[str, Factors], clients: list[ClientInfo]) -> dict:
        """State holding a copy of the initial LoRA."""
        return initial_state(self, initial, clients)

    def download(self, state: dict, client: ClientInfo, round_index: int) -> Download:
        """The global A and B of the modules in the client's blocks, and the head."""
        check_client(self, state, client)
        return download_slots(state, client, state["rank"])

    def _weights(self, uploads: list[Upload]) -> list[float]:
        if self.weighting == "uniform":
            return [1.0 / len(uploads)] * len(uploads)
        return weights(uploads)

    def aggregate(self, state: dict, uploads: list[Upload], round_index: int) -> RoundResult:
        """Average each module over the uploads that contain it. A module that
        no upload contains keeps its previous value."""
        check_uploads(self, state, uploads, FACTOR_NAMES, every_module=False)
        for u in uploads:
            outside = outside_blocks(u)
            if outside:
                raise StrategyError(
                    f"layermean: upload from client {u.client!r} contains module(s) {outside} outside its "
                    f"blocks {sorted(u.layers)}")
        new = clone_tree(state)
        for m, have in uploads_by_module(state, uploads):  # a module nobody trained keeps its value
            w = self._weights(have)
            for which in FACTOR_NAMES:
                new[which][m] = weighted_mean([getattr(u.factors[m], which) for u in have], w,
                                              state[which][m])
        new["extra"] = merge_extra(self, state, uploads, uniform=self.weighting == "uniform")
        return RoundResult(state=new)
