"""A federated client's side of adapter compression (split/adapter_codec.py).

With fp16 uploads the factors and head travel in fp16. With top-k uploads the
client keeps what it decoded from the round's offer and sends, per tensor,
the top-k of its update against it plus the residual that earlier uploads
left out (error feedback, keyed by tensor name); the residual stays with the
client through rounds it is not sampled for. A tensor the offer did not carry
(the head before the server holds one, FedSA-LoRA's local B) has nothing to
be added to on the server and goes whole, lossless.

The residuals as they were when a round began are kept, so a round that must
be redone (the server lost the session) does not feed its residual twice.
"""

from __future__ import annotations

import copy

import torch

from split.adapter_codec import delta_coded, parse_adapter_codec, update
from split.codecs import ErrorFeedback
from split.protocol import FACTOR_A, FACTOR_B, HEAD, FederationSettings, RoundOffer, UploadPayload, pack

KINDS = {FACTOR_A: "A", FACTOR_B: "B", HEAD: "head"}
# Which factor groups a round trains, by the offer's ``trainable``; the head always trains.
TRAINED = {"both": (FACTOR_A, FACTOR_B, HEAD), "A": (FACTOR_A, HEAD), "B": (FACTOR_B, HEAD)}


class AdapterUploads:
    """Upload codec, references and residuals of one federated client."""

    def __init__(self, settings: FederationSettings):
        self.up = parse_adapter_codec(settings.adapter_up, "the federation's adapter_up")
        self.texts = (settings.adapter_up, settings.adapter_down)
        self.feedback = ErrorFeedback()
        self.received: dict[str, torch.Tensor] = {}  # packed name -> this round's offer as decoded
        self._at_start = ErrorFeedback()

    def follows(self, settings: FederationSettings) -> bool:
        """Whether this state was made for ``settings`` (a server that restarted may announce others)."""
        return self.texts == (settings.adapter_up, settings.adapter_down)

    def begin(self, offer: RoundOffer) -> None:
        """A "train" offer was applied: keep what it carried, and the residuals as the round begins."""
        if delta_coded(self.up):
            self.received = {n: t.detach().clone() for n, t in pack(A=offer.A, B=offer.B, head=offer.head).items()}
        self._at_start = copy.deepcopy(self.feedback)

    def rewind(self) -> None:
        """The round is redone from its start: its residuals as they were then."""
        self.feedback = copy.deepcopy(self._at_start)

    def prepare(self, payload: UploadPayload, trainable: str) -> UploadPayload:
        """The upload as it travels: its codecs set and, for top-k, each tensor
        the offer carried replaced by its (error-corrected) update."""
        if self.up.lossless:
            return payload
        groups = {FACTOR_A: payload.A, FACTOR_B: payload.B, HEAD: payload.head}
        if not delta_coded(self.up):
            payload.codecs = {prefix + name: self.up for prefix, tensors in groups.items() for name in tensors}
            return payload
        codecs = {}
        for prefix, tensors in groups.items():
            for name, local in list(tensors.items()):
                key = prefix + name
                received = self.received.get(key)
                if received is None:
                    continue  # not in the offer: whole and lossless
                delta = update(local.detach().float(), received.float(), KINDS[prefix])
                if prefix in TRAINED[trainable]:
                    delta = self.feedback.correct(key, delta, self.up)
                # A factor frozen this round has an update of exact zeros: its
                # residual waits for a round that trains it. The update goes in
                # float32, the dtype its residual was taken in.
                tensors[name] = delta
                codecs[key] = self.up
        payload.codecs, payload.delta = codecs, True
        return payload
