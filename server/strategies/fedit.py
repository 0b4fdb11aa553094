"""FedIT: plain FedAvg of the LoRA factors, A and B averaged separately
(docs/algorithms.md#fedit).

    A <- sum_k p_k A_k,   B <- sum_k p_k B_k,   p_k = n_k / sum_j n_j

Every client trains every LoRA module at one shared rank. State: the slot
layout (common.py) at that rank.
"""

from __future__ import annotations

from .base import ClientInfo, Download, Factors, GlobalModel, RoundResult, Strategy, Upload
from .common import (FACTOR_NAMES, check_client, check_uploads, clone_tree, download_slots, export_slots,
                     initial_state, mean_factor, merge_head, weights)


class FedIT(Strategy):
    """FedAvg of A and of B separately, weighted by sample counts.

    Every client trains both factors of every module at one rank and downloads
    the averaged pair and the averaged head. The averaged product is not
    exact: B̄Ā differs from sum p_k B_k A_k, which is what FedEx-LoRA, FLoRA and
    others correct.
    """

    name = "fedit"

    def init_state(self, initial: dict[str, Factors], clients: list[ClientInfo]) -> dict:
        """State holding a copy of the initial LoRA."""
        return initial_state(self, initial, clients)

    def download(self, state: dict, client: ClientInfo, round_index: int) -> Download:
        """The global A and B of the client's modules, plus the averaged head."""
        check_client(self, state, client)
        return download_slots(state, client, state["rank"])

    def aggregate(self, state: dict, uploads: list[Upload], round_index: int) -> RoundResult:
        """A <- sum p_k A_k and B <- sum p_k B_k for every module; the head is averaged too."""
        check_uploads(self, state, uploads, FACTOR_NAMES)
        p = weights(uploads)
        new = clone_tree(state)
        for which in FACTOR_NAMES:
            new[which] = mean_factor(state, uploads, which, p)
        new["head"] = merge_head(self, state, uploads)
        return RoundResult(state=new)

    def export(self, state: dict) -> GlobalModel:
        """The global A and B and the head."""
        return export_slots(state)
