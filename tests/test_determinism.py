"""Runs repeat: with dropout on, the same seed gives the same losses and the same
adapter on both sides of the split, whatever the process drew before."""

from __future__ import annotations

import torch

from conftest import VOCAB, random_batch, threaded_server
from edge.client import ClientConfig, SplitClient

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
