"""A fine-tuned adapter the server serves (``fedsplit server --adapter DIR``).

For split inference the server runs its blocks with the server-side half of
one saved whole-model adapter: the folder a client saved (``--out``) or a
federation's ``round_N`` checkpoint, the same folder ``fedsplit export`` made
the client's ONNX segments from. Every session opened on such a server starts
from that adapter's factors for the blocks it runs, so the client and server
halves always come from the same file; ``fedsplit infer`` checks the digest of
what the server holds against its export's manifest before it sends anything.

A hello whose LoRA rank, alpha or targets differ from the adapter's is refused:
the server could not give it the adapter it serves.
"""

from __future__ import annotations

import logging
from pathlib import Path

from split.adapter_folder import AdapterFolder, read_adapter
from split.families import block_of
from split.lora import LoraSpec, lora_layers, set_factors
from split.partition import Cut, Segment

from .sessions import RequestError, Session, Sessions

log = logging.getLogger(__name__)


def check_serving(federation: bool, server_lora: str, cut: Cut) -> None:
    """Refuse --adapter where a served adapter has no meaning: a federation
    (its rounds decide every adapter), a shared server-side LoRA (every client
    would train the served one) and a two-part split (the head is then the
    server's, and an export keeps it on the client)."""
    if federation:
        raise ValueError("--adapter serves a trained adapter for inference; a federation (--strategy) starts "
                         "from its own: leave one of them out")
    if server_lora != "per-client":
        raise ValueError("--adapter needs --server-lora per-client: with a shared server-side LoRA every client "
                         "would train the served adapter")
    if cut.two_part:
        raise ValueError(f"--adapter with --cut {cut}: a two-part split keeps the head on the server; split "
                         "inference needs K2 >= 1")


class ServedAdapter:
    """The server blocks' half of a saved adapter, installed into every new session."""

    def __init__(self, adapter: AdapterFolder, segment: Segment):
        if adapter.task != segment.task:
            raise ValueError(f"--adapter {adapter.path} is a {adapter.task} adapter; this server runs "
                             f"{segment.task!r} (--task)")
        hosted = set(segment.cut.server_blocks(segment.num_layers))
        factors = adapter.lora_factors()
        self.factors = {m: pair for m, pair in factors.items() if block_of(m) in hosted}
        if not self.factors:
            raise ValueError(f"--adapter {adapter.path} has no LoRA in the blocks this server hosts "
                             f"({min(hosted)}..{max(hosted)}); it is not an adapter for this model and --cut")
        self.base_delta = {m: d for m, d in adapter.base_delta.items() if block_of(m) in hosted}
        self.spec = adapter.spec
        self.targets = frozenset(adapter.spec.target_modules(segment.family))
        self.family = segment.family
        self.path = adapter.path

    @classmethod
    def load(cls, folder: str | Path, segment: Segment) -> "ServedAdapter":
        """Read ``folder`` (``split.adapter_folder``) for ``segment``."""
        return cls(read_adapter(folder), segment)

    def describe(self) -> str:
        return (f"{self.path} (LoRA r={self.spec.rank}, alpha={self.spec.alpha:g}, targets "
                f"{','.join(sorted(self.targets))})")

    def check(self, spec: LoraSpec) -> None:
        """Refuse a hello that asks for another LoRA than the served one."""
        theirs = (spec.rank, spec.alpha, frozenset(spec.target_modules(self.family)))
        if theirs != (self.spec.rank, self.spec.alpha, self.targets):
            raise RequestError(
                f"this server serves the adapter {self.describe()}; the hello asks for LoRA r={spec.rank}, "
                f"alpha={spec.alpha:g}, targets {','.join(sorted(theirs[2]))}: register with the adapter's "
                "settings (fedsplit infer takes them from its export)")

    def install(self, sessions: Sessions, session: Session) -> None:
        """Give ``session`` the served factors for every LoRA module it has."""
        modules = lora_layers(sessions.model, session.adapter)
        missing = sorted(set(modules) - set(self.factors))
        if missing:
            raise RequestError(f"the served adapter {self.path} has no LoRA for {', '.join(missing[:4])}, which "
                               "this cut runs on the server")
        try:
            set_factors(sessions.model, {m: self.factors[m]["A"] for m in modules},
                        {m: self.factors[m]["B"] for m in modules}, adapter=session.adapter)
        except ValueError as exc:
            raise RequestError(f"the served adapter {self.path} does not fit this session: {exc}") from None
        log.info("client %s starts from the served adapter %s", session.client, self.path)
