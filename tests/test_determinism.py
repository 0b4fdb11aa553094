"""Runs repeat: with dropout on, the same seed gives the same losses and the same
adapter on both sides of the split, whatever the process drew before."""

from __future__ import annotations

import contextlib

import torch

from conftest import VOCAB, random_batch, threaded_server
from edge.client import ClientConfig, SplitClient
from split.wire import Message

STEPS = 4


def _run(endpoint, path, seed: int):
    torch.rand(1000)  # whatever ran before must not matter
    client = SplitClient(ClientConfig(server=endpoint, model=str(path), num_labels=3, seed=seed, dropout=True))
    try:
        losses = [client.train_step(random_batch(i, VOCAB)) for i in range(STEPS)]
        return losses, client.adapter_state()
    finally:
        client.close()


def test_same_seed_same_run_with_dropout_on_both_sides(tiny_models):
    path = tiny_models("bert")  # hidden and attention dropout 0.1 on every block
    with threaded_server(path, "1,1", num_labels=3) as (endpoint, _):
        first, first_state = _run(endpoint, path, seed=5)
        again, again_state = _run(endpoint, path, seed=5)
        other, _ = _run(endpoint, path, seed=6)
    assert first == again
    assert first_state.keys() == again_state.keys()
    for name, value in first_state.items():
        assert torch.equal(value, again_state[name]), name
    # The seed matters: another seed gives another run.
    assert other != first



def _server_outputs_of_a(endpoint, path, interleave: bool) -> list[torch.Tensor]:
    """What the server returns for client a's training forwards of one fixed
    hidden state at steps 0..STEPS-1 (dropout on: each is a function of a's
    server-side masks); with ``interleave``, client b (another seed) sends a
    training forward between each two of a's.

    The forwards are sent raw: a SplitClient in this process seeds the global
    generator around its own steps, which would hide a server that draws from
    that one generator."""
    a = SplitClient(ClientConfig(server=endpoint, model=str(path), num_labels=3, seed=5, client_id="a"))
    b = SplitClient(ClientConfig(server=endpoint, model=str(path), num_labels=3, seed=6, client_id="b"))
    hidden = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(0))
    tensors = {"hidden": hidden, "attention_mask": torch.ones(2, 6, dtype=torch.uint8)}
    try:
        outputs = []
        for step in range(STEPS):
            reply = a.conn.request(Message("forward", step=step, meta={"train": True}, tensors=tensors))
            outputs.append(reply.tensors["hidden"])
            if interleave:
                b.conn.request(Message("forward", step=step, meta={"train": True}, tensors=tensors))
        return outputs
    finally:
        a.close()
        b.close()


def _same(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(xs, ys, strict=True))


def test_server_side_dropout_masks_do_not_depend_on_other_clients_traffic(tiny_models, monkeypatch):
    path = tiny_models("bert")  # hidden and attention dropout 0.1 on every block
    with threaded_server(path, "1,1", num_labels=3) as (endpoint, _):
        alone = _server_outputs_of_a(endpoint, path, interleave=False)
        assert not torch.equal(alone[0], alone[1])  # dropout is on: each step has its own masks
        assert _same(_server_outputs_of_a(endpoint, path, interleave=True), alone)
        # The check has teeth: with one generator for every client (the server's
        # draws not seeded per session and step), b's forwards change a's masks.
        import server.compute

        monkeypatch.setattr(server.compute, "seeded_rng", lambda *args: contextlib.nullcontext())
        torch.manual_seed(0)
        shared_alone = _server_outputs_of_a(endpoint, path, interleave=False)
        torch.manual_seed(0)
        assert _same(_server_outputs_of_a(endpoint, path, interleave=False), shared_alone)
        torch.manual_seed(0)
        assert not _same(_server_outputs_of_a(endpoint, path, interleave=True), shared_alone)
