"""FedSA-LoRA: share A, keep B (and the head) on each client
(docs/algorithms.md#fedsa).

    client k: starts each round from the global A and its own previous B_k;
              trains both; uploads A_k (B_k never needs to leave the client)
    server:   A <- sum_k p_k A_k

Downloads carry A only, so each client's B and classification head stay
personal. State: the slot layout (common.py) without a global B.
"""

from __future__ import annotations

from .base import TRAIN_A, TRAIN_BOTH, ClientInfo, Download, Factors, GlobalModel, RoundResult, Strategy, Upload
from .common import (check_client, check_uploads, clone, clone_tree, client_modules, export_slots,
                     initial_state, mean_factor, weights)


class FedSALoRA(Strategy):
    """FedSA-LoRA: A is averaged with weights p_k, and B stays local.

    A download holds A only, with an empty B dict and no head, so the client
    keeps its own B and head. Any B or head in an upload is ignored. Clients
    start B from their own LoRA initialisation (zero under PEFT).
    """

    name = "fedsa"

    def init_state(self, initial: dict[str, Factors], clients: list[ClientInfo]) -> dict:
        """State with the initial A only (B is each client's own)."""
        state = initial_state(self, initial, clients)
        del state["B"]
        return state

    def download(self, state: dict, client: ClientInfo, round_index: int) -> Download:
        """The global A of the client's modules; B and the head are left to the client."""
        check_client(self, state, client)
        modules = client_modules(state["A"], client)
        return Download(A={m: clone(state["A"][m]) for m in modules}, B={},
                        rank=state["rank"], alpha=state["alpha"], trainable=TRAIN_BOTH)

    def aggregate(self, state: dict, uploads: list[Upload], round_index: int) -> RoundResult:
        """A <- sum_k p_k A_k per module. B and the head are ignored."""
        check_uploads(self, state, uploads, (TRAIN_A,))
        p = weights(uploads)
        new = clone_tree(state)
        new["A"] = mean_factor(state, uploads, TRAIN_A, p)
        return RoundResult(state=new)

    def export(self, state: dict) -> GlobalModel:
        """The global A; B and the head are the clients' own, so none is global."""
        return export_slots(state)
