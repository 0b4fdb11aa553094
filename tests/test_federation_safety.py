"""A server under a hostile federation member, in this process (a serving
thread, honest clients in threads): refused joins and uploads leave the
server serving and the round completing for the honest clients; nothing
non-finite reaches a server-side adapter; a forward never backwarded stops
holding back a shared server-side LoRA after the pending timeout."""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import VOCAB, random_batch, status, threaded_server
from edge.client import ClientConfig, SplitClient
from edge.federated import FederatedClient, FederatedOptions, head_params
from server.rounds import FederationConfig
from split.lora import LoraSpec, get_factors
from split.protocol import RoundOffer, UploadPayload
from split.transport import ServerError
from split.wire import Message

RANK = 4


def split_client(path, endpoint, client_id, rank=RANK, seed=0) -> SplitClient:
    return SplitClient(ClientConfig(server=endpoint, model=str(path), num_labels=3, dropout=False, seed=seed,
                                    lora=LoraSpec(rank, 8.0), client_id=client_id, lr=5e-3, timeout=60))


def federated(client: SplitClient, index: int) -> FederatedClient:
    train = [random_batch(1000 * index + i, VOCAB, num_labels=3) for i in range(3)]
    return FederatedClient(client, train, num_samples=10 * (index + 1),
                           options=FederatedOptions(poll=0.05, labels=("ant", "bee", "cat")))


def honest_run(client: SplitClient, index: int):
    try:
        return federated(client, index).run()
    finally:
        client.close()


def wait_for(condition, seconds=60.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def poisoned(kind: str, client: SplitClient, offer_round: int) -> UploadPayload:
    """An upload of ``client``'s own LoRA for the round, spoiled as ``kind`` says."""
    factors = get_factors(client.model)
    A = {m: a for m, (a, _) in factors.items()}
    B = {m: b for m, (_, b) in factors.items()}
    head = {n: p.detach().clone() for n, p in head_params(client).items()}
    first = sorted(A)[0]
    if kind == "b-shape":
        B[first] = torch.zeros(B[first].shape[0], RANK - 1)
    elif kind == "nan":
        A[first] = A[first].clone()
        A[first][0, 0] = math.nan
    elif kind == "base-weight-head":
        head["bert.encoder.layer.0.attention.self.query.weight"] = torch.zeros(32, 32)
    return UploadPayload(offer_round, 10, RANK, A, B, head)


@pytest.mark.parametrize("kind, match", [
    ("b-shape", r"B \(32, 3\); at the upload's rank 4 they must be"),
    ("nan", "holds 1 NaN value"),
    ("base-weight-head", "not the model's trained head"),
])
def test_refused_members_leave_the_server_serving_and_the_round_completing(kind, match, tiny_models, tmp_path):
    path = tiny_models("bert")
    fed = FederationConfig(strategy="fedit", rounds=1, min_clients=3, local_steps=2, deadline=120.0)
    with threaded_server(path, "1,1", num_labels=3, dropout=False, federation=fed,
                         checkpoint_dir=str(tmp_path)) as (endpoint, server):
        coord = server.coordinator
        # Models are built in this thread only: accelerate's meta-device context,
        # entered while a model is built, would catch another thread's parameters.
        clients = [split_client(path, endpoint, f"c{k}") for k in range(2)]
        with ThreadPoolExecutor(2) as pool:
            honest = [pool.submit(honest_run, client, k) for k, client in enumerate(clients)]
            wait_for(lambda: len(coord.members) == 2)
            # A benign client with another rank is told at once; round 0 then starts as usual.
            other_rank = split_client(path, endpoint, "benign", rank=2)
            with pytest.raises(ServerError, match="fedit needs one LoRA rank.*ranks \\[2, 4\\]"):
                federated(other_rank, 5).join()
            other_rank.close()
            mallory = split_client(path, endpoint, "mallory")
            federated(mallory, 2).join()
            wait_for(lambda: RoundOffer.from_message(mallory.conn.request(Message("round"))).status == "train")
            with pytest.raises(ServerError, match=f"upload refused: .*{match}"):
                mallory.conn.request(poisoned(kind, mallory, 0).to_message())
            records = [f.result(timeout=120) for f in honest]
        assert [[r.round for r in rec] for rec in records] == [[0], [0]]
        entry = coord.history[0]
        assert entry.aggregated and entry.uploaded == ["c0", "c1"] and "mallory refused" in entry.note
        assert status(endpoint)["sessions"] >= 1  # still serving
        mallory.close()
    assert (tmp_path / "round_0" / "adapter_model.safetensors").exists()


# ---------------------------------------------------------------- non-finite values on the split step


def adapter(client: SplitClient) -> dict[str, torch.Tensor]:
    return client.conn.request(Message("adapter")).tensors


def raw_forward(client: SplitClient, step: int, hidden: torch.Tensor, train: bool = True) -> Message:
    mask = torch.ones(hidden.shape[:2], dtype=torch.uint8)
    return client.conn.request(Message("forward", step=step, meta={"train": train},
                                       tensors={"hidden": hidden, "attention_mask": mask}))


def test_non_finite_hidden_states_and_gradients_never_reach_a_shared_adapter(tiny_models):
    path = tiny_models("bert")
    with threaded_server(path, "1,1", num_labels=3, dropout=False, server_lora="shared") as (endpoint, _):
        a, b = split_client(path, endpoint, "a"), split_client(path, endpoint, "b")
        try:
            b.train_step(random_batch(0, VOCAB))
            before = adapter(b)
            for poison in (math.nan, math.inf):
                hidden = torch.randn(2, 5, 32)
                hidden[0, 1, 2] = poison
                with pytest.raises(ServerError, match="the forward's 'hidden' holds 1 .* value"):
                    raw_forward(a, 0, hidden)
                # A finite forward, then a poisoned gradient: refused before it is applied.
                raw_forward(a, 1, torch.randn(2, 5, 32))
                grad = torch.randn(2, 5, 32)
                grad[1, 0, 0] = poison
                with pytest.raises(ServerError, match="the backward's 'grad' holds 1 .* value"):
                    a.conn.request(Message("backward", step=1, tensors={"grad": grad}))
            after = adapter(b)
            assert all(bool(torch.isfinite(t).all()) for t in after.values())
            for key in before:
                assert torch.equal(before[key], after[key]), key  # nothing was applied
            losses = [b.train_step(random_batch(i, VOCAB)) for i in range(1, 3)]
            assert all(math.isfinite(x) for x in losses)
            assert any(not torch.equal(before[k], v) for k, v in adapter(b).items())  # b still trains it
        finally:
            a.close()
            b.close()


def test_a_forward_never_backwarded_stops_freezing_the_shared_adapter(tiny_models):
    path = tiny_models("bert")
    with threaded_server(path, "1,1", num_labels=3, dropout=False, server_lora="shared",
                         pending_timeout=0.5) as (endpoint, server):
        a, b = split_client(path, endpoint, "a"), split_client(path, endpoint, "b")
        try:
            raw_forward(a, 7, torch.randn(2, 5, 32))  # a never sends this step's backward
            before = adapter(b)
            b.train_step(random_batch(0, VOCAB))
            frozen = adapter(b)
            # While a's graph waits, the shared adapter cannot step (its values are in a's graph).
            assert all(torch.equal(before[k], frozen[k]) for k in before)
            wait_for(lambda: server.sessions.status()["pending"] == 0, seconds=10)
            b.train_step(random_batch(1, VOCAB))
            moved = adapter(b)
            assert any(not torch.equal(frozen[k], moved[k]) for k in frozen if "lora_B" in k)
            with pytest.raises(ServerError, match="no forward is waiting for a backward at step 7"):
                a.conn.request(Message("backward", step=7, tensors={"grad": torch.zeros(2, 5, 32)}))
        finally:
            a.close()
            b.close()


def test_pending_timeout_is_checked():
    from server.service import ServerConfig

    with pytest.raises(ValueError, match="pending_timeout must be a finite number of seconds > 0"):
        ServerConfig(pending_timeout=0.0)
