"""Devices and precisions: each side picks its own, the wire carries dtype and
plain CPU bytes, and a bf16 server with an fp32 client still trains.

This machine has no GPU: the CUDA tests at the bottom run only where torch sees
one; everything above exercises the same casting and placement code on CPU."""

from __future__ import annotations

import pytest
import torch

from conftest import VOCAB, random_batch, threaded_server
from edge.client import ClientConfig, SplitClient
from edge.meter import cuda_peak
from split.devices import resolve_device, resolve_dtype
from split.seeds import seeded_rng
from split.wire import Message

CUDA = torch.cuda.is_available()


def _train(endpoint, path, steps: int, cut=None, **client):
    batch = random_batch(0, VOCAB, batch=8)
    c = SplitClient(ClientConfig(server=endpoint, model=str(path), num_labels=3, lr=1e-2, head_lr=1e-2,
                                 dropout=False, cut=cut, **client))
    try:
        losses = [c.train_step(batch) for _ in range(steps)]
        probe = None if c.cut.two_part else c.conn.request(Message("forward", step=10_000, meta={"train": False},
            tensors={"hidden": torch.randn(2, 5, 32), "attention_mask": torch.ones(2, 5, dtype=torch.uint8)}))
        return losses, probe, c.predict(batch)
    finally:
        c.close()


def test_bf16_server_fp32_client_trains_and_the_wire_carries_each_sides_dtype(tiny_models):
    path = tiny_models("llama")
    with threaded_server(path, "1,1", num_labels=3, dropout=False) as (endpoint, _):
        exact, _, _ = _train(endpoint, path, 30)
    with threaded_server(path, "1,1", num_labels=3, dropout=False, dtype="bfloat16") as (endpoint, server):
        assert all(p.dtype == torch.bfloat16 for n, p in server.segment.model.named_parameters()
                   if "lora_" not in n)
        losses, probe, logits = _train(endpoint, path, 30)
    # Every step differs from the all-fp32 run only by bf16 rounding in the backbone.
    print("largest relative loss difference, bf16 server:", max(abs(a - b) / b for a, b in zip(losses, exact)))
    assert losses == pytest.approx(exact, rel=5e-2)
    assert losses[-1] < 0.5 * losses[0], losses
    assert probe.tensors["hidden"].dtype == torch.bfloat16  # the server answers in its dtype
    assert logits.dtype == torch.float32  # ... and the client computes in its own


def test_bf16_two_part_server_tracks_the_fp32_run_and_returns_float32(tiny_models):
    from split.partition import Cut

    path = tiny_models("bert")
    with threaded_server(path, "1,0", num_labels=3, dropout=False) as (endpoint, _):
        exact, _, _ = _train(endpoint, path, 20, cut=Cut(1, 0))
    with threaded_server(path, "1,0", num_labels=3, dropout=False, dtype="bfloat16") as (endpoint, server):
        losses, _, logits = _train(endpoint, path, 20, cut=Cut(1, 0))
        head = server.segment.model.get_submodule("classifier")
    assert head.weight.dtype == torch.float32  # a trained head stays float32 over bf16 weights
    assert losses == pytest.approx(exact, rel=3e-2)
    assert losses[-1] < 0.85 * losses[0], losses
    assert logits.dtype == torch.float32


def test_bf16_client_with_fp32_server_tracks_the_fp32_run(tiny_models):
    path = tiny_models("bert")
    with threaded_server(path, "1,1", num_labels=3, dropout=False) as (endpoint, _):
        exact, _, _ = _train(endpoint, path, 30)
        losses, _, _ = _train(endpoint, path, 30, dtype="bfloat16")
    assert losses == pytest.approx(exact, rel=5e-2, abs=2e-2)
    assert losses[-1] < 0.75 * losses[0], losses


def test_device_and_dtype_names_are_checked():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if CUDA else resolve_device("auto").type)
    assert resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="use one of cpu, cuda, mps, auto"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="use one of float32, bfloat16, float16"):
        resolve_dtype("int8")
    with pytest.raises(ValueError, match="frozen weights are held in"):
        resolve_dtype(torch.int8)
    if not CUDA:
        with pytest.raises(ValueError, match="sees no CUDA device.*--device cpu"):
            resolve_device("cuda")
        with pytest.raises(ValueError, match="sees no CUDA device"):
            ClientConfig(device="cuda")
        assert cuda_peak(torch.device("cpu")) is None


def test_seeded_rng_restores_the_global_generator():
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    with seeded_rng("cpu", 7, "dropout"):
        inside = torch.rand(3)
    assert torch.equal(torch.rand(3), expected)
    with seeded_rng("cpu", 7, "dropout"):
        assert torch.equal(torch.rand(3), inside)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_server_and_cpu_client_match_an_all_cpu_run(tiny_models):
    path = tiny_models("llama")
    with threaded_server(path, "1,1", num_labels=3, dropout=False) as (endpoint, _):
        cpu, _, _ = _train(endpoint, path, 5)
    with threaded_server(path, "1,1", num_labels=3, dropout=False, device="cuda") as (endpoint, _):
        gpu, _, _ = _train(endpoint, path, 5)
    assert gpu == pytest.approx(cpu, rel=1e-3)
    assert cuda_peak(torch.device("cuda")) > 0
