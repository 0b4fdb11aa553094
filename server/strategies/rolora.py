"""RoLoRA: alternate which LoRA factor trains, round by round.

    even round: A frozen (shared), clients train B_k;  server B <- sum_k p_k B_k
    odd round:  B frozen (shared), clients train A_k;  server A <- sum_k p_k A_k

In every round the frozen factor is identical on all clients, so the mean of
the products equals the product of the means (docs/algorithms.md#rolora).
The paper's uniform 1/N mean is the special case of equal sample counts. The state, the download and the aggregation are those of FFA-LoRA
(``FrozenFactorStrategy``); only the trained factor changes with the round.
"""

from __future__ import annotations

from .base import TRAIN_A, TRAIN_B
from .ffa import FrozenFactorStrategy


class RoLoRA(FrozenFactorStrategy):
    """Alternating LoRA: B trains in even rounds and A in odd rounds.

    Only the trained factor is aggregated (weights p_k). Options:
    ``resend_frozen`` (see ``FrozenFactorStrategy``).
    """

    name = "rolora"

    def trained(self, round_index: int) -> str:
        """B in even rounds (round 0 starts from the shared initial A), A in odd rounds."""
        return TRAIN_B if round_index % 2 == 0 else TRAIN_A
