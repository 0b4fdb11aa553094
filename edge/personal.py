"""FedDPA's client half (docs/algorithms.md#feddpa): a personal adapter beside
the global one on the client-side modules, trained locally and never uploaded.

The personal adapter starts with B = 0, so it is a no-op until trained. Both
adapters are active while training; the global one alone is what the
federation aggregates and what "global accuracy" measures.
"""

from __future__ import annotations

from pathlib import Path

import torch

from split.lora import adapter_state, init_lora, lora_layers, save_adapter
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

    def save(self, folder: str | Path, labels: list[str] | None = None, tokenizer=None) -> Path:
        """Save the personal adapter as a PEFT adapter of the client-side blocks
        (it has no server-side part), with the head (and, if given, the label
        names and tokenizer). FedDPA's personalised model is the global adapter
        with this one added on top."""
        client = self.client
        cut, layers = client.cut, client.segment.num_layers
        blocks = list(range(cut.front)) + list(range(layers - cut.back, layers))
        # The head has one copy, shared by both adapters; it is saved with each so
        # that either loads on its own (peft expects a classification head with any adapter).
        return save_adapter(folder, adapter_state(client.model, PERSONAL), client.config.lora, client.family,
                            client.config.task, str(client.segment.path), client.family.trained_heads(
                                client.config.task), blocks, labels=labels, tokenizer=tokenizer)
