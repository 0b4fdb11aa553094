"""A stand-in server for driving the round coordinator in-process (used by
test_rounds.py and test_admission.py). A plain module, not a test file: the
tests import it as ``round_helpers``, as they do ``conftest``.

The stand-in hosts a two-block model with one LoRA module per block (client
side: block 0, server side: block 1) and a head (``LAYOUT``); the clients of
``coordinator`` name 3 classes (``LABELS``). Each client's server-side LoRA is
a pair of plain tensors."""

from __future__ import annotations

import torch

from server.admission import ModelLayout
from server.rounds import Coordinator, FederationConfig
from server.strategies.base import ClientInfo
from split.protocol import UploadPayload

CLIENT_MODULE = "model.layers.0.self_attn.q_proj"
SERVER_MODULE = "model.layers.1.self_attn.q_proj"
HEAD = "classifier.weight"
LAYOUT = ModelLayout({CLIENT_MODULE: (6, 5), SERVER_MODULE: (6, 5)}, {HEAD: (None, 6)}, 2)  # None: the classes
LABELS = ("ant", "bee", "cat")


class FakeServer:
    """Server-side LoRA of each client as plain tensors."""

    def __init__(self, rank=4):
        self.rank = rank
        self.adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.loads: list[tuple] = []
        self.folded: dict[str, torch.Tensor] = {}
        self.moved = 1.0  # what a client's steps add to its server-side factors

    def modules_for(self, client):
        return {SERVER_MODULE: (6, 5)}

    def load(self, client, A, B, trainable, fresh_seed, modules):
        self.loads.append((client, trainable, fresh_seed))
        a = A.get(SERVER_MODULE, torch.zeros(self.rank, 5))
        b = B.get(SERVER_MODULE, torch.zeros(6, self.rank))
        self.adapters[client] = (a.clone(), b.clone())

    def collect(self, client):
        a, b = self.adapters[client]
        return {SERVER_MODULE: (a + self.moved, b + self.moved)}  # as if the client's steps moved them

    def fold(self, deltas):
        for m, d in deltas.items():
            self.folded[m] = self.folded.get(m, 0) + d


def coordinator(n=3, rank=4, labels=LABELS, **kw):
    """A coordinator with ``n`` clients c0.. of ``rank`` joined (samples 10, 20, ...), naming ``labels``."""
    server = FakeServer(rank)
    coord = Coordinator(FederationConfig(**{"min_clients": n, **kw}), server, LAYOUT)
    for k in range(n):
        coord.join(f"c{k}", ClientInfo(f"c{k}", rank, 8.0, None, 10 * (k + 1)), {CLIENT_MODULE: (6, 5)}, labels=labels)
    return coord, server


def payload(coord, client, value=1.0, rank=None, **changes) -> UploadPayload:
    """An honest upload of ``client`` for the running round (every value ``value``); ``changes`` replace fields."""
    rank = coord.members[client].info.rank if rank is None else rank
    fields = dict(round=coord.round, num_samples=coord.members[client].info.num_samples, rank=rank,
                  A={CLIENT_MODULE: torch.full((rank, 5), value)}, B={CLIENT_MODULE: torch.full((6, rank), value)},
                  head={HEAD: torch.full((3, 6), value)})
    return UploadPayload(**{**fields, **changes})


def upload(coord, client, value=1.0, rank=None):
    coord.upload(client, payload(coord, client, value, rank))
