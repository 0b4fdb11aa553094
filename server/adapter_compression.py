"""The server's side of adapter compression (split/adapter_codec.py).

Each round offer's LoRA factors and head go in the download codec; frozen
-weight updates (``D:``) and the final model never do (docs/adapter-compression.md).
With top-k uploads the server keeps, per client, exactly what that client
decoded from its round's offer, and turns each upload back into whole
tensors (received + update) before admission and the strategy see it, so every
strategy works unchanged, per-client downloads included.
"""

from __future__ import annotations

import logging

import torch

from split.adapter_codec import delta_coded, parse_adapter_codec, rebuild
from split.codecs import CodecSpec, roundtrip
from split.protocol import FACTOR_A, FACTOR_B, HEAD, RoundOffer, UploadPayload, pack

from .admission import Refused

log = logging.getLogger(__name__)

KINDS = {FACTOR_A: "A", FACTOR_B: "B", HEAD: "head"}


def check_adapter_codecs(config) -> None:
    """Turn a federation config's ``adapter_up``/``adapter_down`` texts into
    specs (ValueError naming the flag); refuse top-k uploads where no round
    offer carries factors to send updates against."""
    for key in ("adapter_up", "adapter_down"):
        value = getattr(config, key)
        flag = "--" + key.replace("_", "-")
        setattr(config, key, parse_adapter_codec(value.text if isinstance(value, CodecSpec) else value, flag))
    if delta_coded(config.adapter_up) and config.client_init != "avg":
        raise ValueError(f"--adapter-up {config.adapter_up.text} sends each client's update against the factors "
                         f"of its round's download, but with --client-init {config.client_init} the download "
                         "carries none (every factor would go whole); use --client-init avg, or --adapter-up fp16")


class AdapterCompression:
    """Download and upload codecs of one federation, and what each client received."""

    def __init__(self, up: CodecSpec, down: CodecSpec):
        self.up, self.down = up, down
        # client -> (round, packed name -> the tensor as that client decoded it)
        self.received: dict[str, tuple[int, dict[str, torch.Tensor]]] = {}

    def offer(self, client: str, offer: RoundOffer) -> RoundOffer:
        """Set the codecs of a "train" offer's factors and head; with top-k
        uploads, note what the client will decode of them (its reference)."""
        sent = pack(A=offer.A, B=offer.B, head=offer.head)
        if not self.down.lossless:
            offer.codecs = {name: self.down for name in sent}
        if delta_coded(self.up):
            decoded = sent if self.down.lossless else {n: roundtrip(t, self.down) for n, t in sent.items()}
            self.received[client] = (offer.round, {n: t.detach().clone() for n, t in decoded.items()})
        return offer

    def rebuild(self, client: str, payload: UploadPayload) -> UploadPayload:
        """The upload with whole tensors: each delta-coded tensor added to what
        the client received; Refused when the upload does not follow the
        federation's upload codec or does not fit what was sent."""
        if payload.delta != delta_coded(self.up):
            if payload.delta:
                raise Refused(f"the upload holds updates (top-k), but this federation's uploads are {self.up.text}: "
                              "start the client again so it reads the federation's settings")
            raise Refused(f"this federation's uploads are updates against the round's download "
                          f"(--adapter-up {self.up.text}), but the client sent whole tensors: update the client")
        if not payload.delta:
            return payload
        round_index, received = self.received.get(client, (None, {}))
        if round_index != payload.round:
            raise Refused(f"no download of round {payload.round} is on record for this client, so its update has "
                          "nothing to be added to; it takes part again next round")
        groups = {FACTOR_A: payload.A, FACTOR_B: payload.B, HEAD: payload.head}
        for prefix, tensors in groups.items():
            for name, delta in list(tensors.items()):
                base = received.get(prefix + name)
                if base is None:
                    continue  # not in the offer: sent whole
                try:
                    tensors[name] = rebuild(base, delta.to(base.dtype), KINDS[prefix])
                except ValueError as exc:
                    raise Refused(f"upload tensor {prefix}{name}: {exc}") from None
        payload.delta = False
        return payload

    def forget(self, client: str) -> None:
        """Drop what a client received (its upload was taken)."""
        self.received.pop(client, None)
