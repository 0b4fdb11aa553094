"""FFA-LoRA: A is frozen and identical on every client, and only B trains.

    init: A shared by every client (from the initial LoRA), B as initialised
    round: clients train B_k; server B <- sum_k p_k B_k; A never changes

Since A is the same everywhere, averaging is exact:
(sum p_k B_k) A == sum p_k (B_k A) (docs/algorithms.md#ffa).

``FrozenFactorStrategy`` is the common machinery of the methods that, in a
given round, train one factor while the other stays frozen and shared. RoLoRA
(rolora.py) is the same machinery with the trained factor alternating by round.

State layout:
    the slot layout (common.py), plus
    "updated": {"A": int, "B": int}   # last round each factor was aggregated (-1: never)
    "held": {client: int}             # last round each client uploaded in
"""

from __future__ import annotations

from abc import abstractmethod

from .base import TRAIN_B, ClientInfo, Download, Factors, GlobalModel, RoundResult, Strategy, Upload
from .common import (FACTOR_NAMES, check_client, check_uploads, clone, clone_tree, client_modules, export_slots,
                     initial_state, mean_factor, merge_head, weights)


class FrozenFactorStrategy(Strategy):
    """A method that, each round, trains one LoRA factor with the other frozen and shared.

    Subclasses say which factor trains in a round (``trained``). Aggregation
    averages that factor only (weights p_k). The frozen factor is the same on
    every client, so the averaged product is exact.

    ``resend_frozen`` (default True) sends both factors in every download, so a
    client that joins late or restarts still has the shared frozen factor. With
    False, a factor is left out of a client's download when that client is
    known to hold its current global value: the client uploaded in round u,
    the factor was frozen in round u, and the factor has not been aggregated
    since. Downloads then carry about r*d_out (FFA-LoRA), or one factor per
    round (RoLoRA). That saving assumes that
    clients keep their LoRA between rounds.
    """

    def __init__(self, seed: int = 0, resend_frozen: bool = True):
        super().__init__(seed)
        self.resend_frozen = bool(resend_frozen)

    @abstractmethod
    def trained(self, round_index: int) -> str:
        """The factor ("A" or "B") that clients train in ``round_index``."""

    def init_state(self, initial: dict[str, Factors], clients: list[ClientInfo]) -> dict:
        """State with the initial LoRA (its A or B is the first frozen factor)."""
        state = initial_state(self, initial, clients)
        state["updated"] = {"A": -1, "B": -1}
        state["held"] = {}
        return state

    def _holds(self, state: dict, client: str, factor: str) -> bool:
        """Whether ``client`` is known to hold the current global ``factor``."""
        u = state["held"].get(client)
        return u is not None and self.trained(u) != factor and state["updated"][factor] < u

    def download(self, state: dict, client: ClientInfo, round_index: int) -> Download:
        """The shared factors of the client's modules. The client trains only
        ``trained(round_index)``."""
        check_client(self, state, client)
        modules = client_modules(state["A"], client)
        send = {f: self.resend_frozen or not self._holds(state, client.client, f) for f in FACTOR_NAMES}
        return Download(
            A={m: clone(state["A"][m]) for m in modules} if send["A"] else {},
            B={m: clone(state["B"][m]) for m in modules} if send["B"] else {},
            rank=state["rank"], alpha=state["alpha"], trainable=self.trained(round_index),
            head=clone_tree(state["head"]))

    def aggregate(self, state: dict, uploads: list[Upload], round_index: int) -> RoundResult:
        """Average the factor trained this round with weights p_k. The frozen
        factor in the uploads is ignored, since it is the state's own."""
        factor = self.trained(round_index)
        check_uploads(self, state, uploads, (factor,))
        p = weights(uploads)
        new = clone_tree(state)
        new[factor] = mean_factor(state, uploads, factor, p)
        new["head"] = merge_head(self, state, uploads)
        new["updated"][factor] = round_index
        new["held"].update({u.client: round_index for u in uploads})
        return RoundResult(state=new)

    def export(self, state: dict) -> GlobalModel:
        """The shared A and B and the head."""
        return export_slots(state)


class FFALoRA(FrozenFactorStrategy):
    """FFA-LoRA: freeze the shared initial A and aggregate B <- sum_k p_k B_k.

    Options: ``resend_frozen`` (see ``FrozenFactorStrategy``).
    """

    name = "ffa"

    def trained(self, round_index: int) -> str:
        """Always B."""
        return TRAIN_B
