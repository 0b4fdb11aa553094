"""FedDPA's client half (docs/algorithms.md#feddpa): a personal adapter beside
the global one on the client-side modules, trained locally and never uploaded.

The personal adapter starts with B = 0, so it is a no-op until trained. Both
adapters are active while training; the global one alone is what the
federation aggregates and what "global accuracy" measures.
"""

from __future__ import annotations

import torch

from split.lora import init_lora, lora_layers
from split.seeds import stable_seed

GLOBAL, PERSONAL = "default", "local"


class PersonalAdapter:
    """The personal adapter of one ``SplitClient``."""

    def __init__(self, client):
        self.client = client
        cfg = client.config
        client.model.add_adapter(PERSONAL, cfg.lora.peft_config(client.family, None, cfg.task))
        init_lora(client.model, PERSONAL, stable_seed(cfg.seed, PERSONAL))
        self.use_both()

    def _active(self, names: list[str]) -> None:
        # Only the LoRA layers switch: the head (a module to save) has a single copy.
        for layer in lora_layers(self.client.model).values():
            layer.set_adapter(names)

    def use_both(self) -> None:
        """Global and personal adapters together (training, personalised accuracy)."""
        self._active([GLOBAL, PERSONAL])

    def use_global(self) -> None:
        """The global adapter alone."""
        self._active([GLOBAL])

    def params(self) -> list[torch.nn.Parameter]:
        """The personal adapter's factors, made trainable."""
        params = [p for n, p in self.client.model.named_parameters() if f".{PERSONAL}." in n]
        for p in params:
            p.requires_grad_(True)
        return params

    def evaluate_global(self, batches) -> float:
        """Accuracy of the global adapter alone."""
        self.use_global()
        try:
            return self.client.evaluate(batches)
        finally:
            self.use_both()

    def evaluate(self, batches) -> dict[str, float]:
        """Accuracy on the client's own held-out data with the global adapter
        alone and with global + personal adapters combined."""
        return {"global": self.evaluate_global(batches), "personalised": self.client.evaluate(batches)}
