"""Adapter compression (split/adapter_codec.py): the download mask, updates
and their reconstruction, upload error feedback, the settings on the wire and
on the command line, and a federated run in each codec."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import VOCAB, random_batch, save_tiny, threaded_server
from edge.adapter_uploads import AdapterUploads
from edge.client import ClientConfig, SplitClient
from edge.federated import FederatedClient, FederatedOptions
from round_helpers import CLIENT_MODULE, HEAD, coordinator, payload
from server.rounds import FederationConfig, FederationError
from split.adapter_codec import parse_adapter_codec, rank_slice, rebuild, update
from split.cli import build_parser
from split.codecs import parse_codec, roundtrip
from split.lora import LoraSpec
from split.protocol import FederationSettings, ProtocolError, RoundOffer, UploadPayload
from split.wire import decode, encode, frame_len

TOPK = "topk:density=0.25"


def over_wire(msg):
    """What the receiver decodes of ``msg``."""
    return decode(encode(msg))


# ---------------------------------------------------------------- pure math


def test_rank_slice_takes_the_updated_part_and_refuses_what_does_not_fit():
    A, B, head = torch.randn(4, 5), torch.randn(6, 4), torch.randn(3, 6)
    assert torch.equal(rank_slice(A, (2, 5), "A"), A[:2])
    assert torch.equal(rank_slice(B, (6, 2), "B"), B[:, :2])
    assert torch.equal(rank_slice(head, (3, 6), "head"), head)
    for received, shape, kind in ((A, (5, 5), "A"), (A, (4, 4), "A"), (B, (6, 5), "B"), (B, (5, 4), "B"),
                                  (head, (3, 5), "head"), (A, (4,), "A")):
        with pytest.raises(ValueError, match="does not fit the received"):
            rank_slice(received, shape, kind)
    local = torch.randn(2, 5)
    assert torch.allclose(rebuild(A, update(local, A, "A"), "A"), local)


def test_topk_download_keeps_each_tensors_largest_entries():
    coord, _ = coordinator(1, adapter_down=TOPK)
    coord.tick(0.0)
    offer = coord.poll("c0")
    assert set(offer.codecs) == {"A:" + CLIENT_MODULE, "B:" + CLIENT_MODULE}  # no head before round 0 aggregates
    sent = offer.A[CLIENT_MODULE]
    got = RoundOffer.from_message(over_wire(offer.to_message("c0"))).A[CLIENT_MODULE]
    kept = got != 0
    k = round(0.25 * sent.numel())
    assert int(kept.sum()) == k
    threshold = sent.abs().flatten().sort(descending=True).values[k - 1]
    assert bool((sent.abs()[kept] >= threshold).all()) and bool((sent.abs()[~kept] <= threshold).all())
    assert torch.allclose(got[kept], sent[kept], rtol=1e-3)  # values in fp16
    assert got.dtype == torch.float32


def test_lossless_default_sets_no_codec_and_frozen_weight_updates_never_get_one():
    coord, _ = coordinator(1)
    coord.tick(0.0)
    offer = coord.poll("c0")
    assert offer.codecs == {} and coord.config.settings().adapter_up == "fp32"
    coord, _ = coordinator(1, adapter_down="fp16")
    coord.deltas.append({CLIENT_MODULE: torch.randn(6, 5)})
    coord.tick(0.0)
    offer = coord.poll("c0")
    assert offer.deltas and not any(name.startswith("D:") for name in offer.codecs)
    assert set(offer.codecs.values()) == {parse_codec("fp16")}
    fp16 = sum(len(f) for f in encode(offer.to_message("c0"))[1:])
    offer.codecs = {}
    fp32 = sum(len(f) for f in encode(offer.to_message("c0"))[1:])
    delta_bytes = 6 * 5 * 4
    assert fp16 - delta_bytes == pytest.approx((fp32 - delta_bytes) / 2, abs=2 * 2)  # + a 2-byte scale per tensor


# ---------------------------------------------------------------- error feedback


def settings(up=TOPK, down="fp32") -> FederationSettings:
    return FederationSettings("fedit", 5, 1, adapter_up=up, adapter_down=down)


def test_upload_error_feedback_carries_the_residual_across_rounds_and_skipped_rounds():
    # Two clients, one sampled per round: c0 sits some rounds out and keeps its residual.
    coord, _ = coordinator(2, adapter_up=TOPK, adapter_down=TOPK, fraction=0.5, rounds=8, seed=1)
    client = AdapterUploads(settings(TOPK, TOPK))
    gen = torch.Generator().manual_seed(0)
    true_sum = torch.zeros(4, 5)
    server_sum = torch.zeros(4, 5)
    sampled = 0
    coord.tick(0.0)
    for r in range(8):
        for c in coord.selected:
            offer = RoundOffer.from_message(over_wire(coord.poll(c).to_message(c)))
            body = payload(coord, c, 0.0, delta=True)  # c1 changes nothing
            if c == "c0":
                sampled += 1
                client.begin(offer)
                local = offer.A[CLIENT_MODULE] + torch.randn(4, 5, generator=gen)  # the round's training
                true_sum += local - offer.A[CLIENT_MODULE]
                body.A = {CLIENT_MODULE: local}
                body.B = {CLIENT_MODULE: offer.B[CLIENT_MODULE].clone()}
                body.head = {HEAD: offer.head.get(HEAD, torch.zeros(3, 6)).clone()}
                body = client.prepare(body, "both")
                assert body.delta and body.codecs["A:" + CLIENT_MODULE].name == "topk"
            coord.upload(c, UploadPayload.from_message(over_wire(body.to_message())))
            if c == "c0":
                server_sum += coord.uploads[c].factors[CLIENT_MODULE].A - offer.A[CLIENT_MODULE]
        coord.tick(float(r + 1))
    assert 0 < sampled < 8
    residual = client.feedback.residual("A:" + CLIENT_MODULE)
    assert residual is not None and residual.abs().sum() > 0
    assert torch.allclose(server_sum + residual, true_sum, atol=1e-5)


def test_a_factor_frozen_this_round_sends_zeros_and_keeps_its_residual():
    client = AdapterUploads(settings())
    A, B = torch.randn(4, 5), torch.randn(6, 4)
    offer = RoundOffer("train", 0, A={CLIENT_MODULE: A}, B={CLIENT_MODULE: B}, rank=4)
    client.begin(offer)
    sent = client.prepare(UploadPayload(0, 1, 4, A={CLIENT_MODULE: A + 1}, B={CLIENT_MODULE: B + 1}), "both")
    assert sent.delta
    residual_b = client.feedback.residual("B:" + CLIENT_MODULE).clone()
    client.begin(offer)
    sent = client.prepare(UploadPayload(1, 1, 4, A={CLIENT_MODULE: A + 1}, B={CLIENT_MODULE: B}), "A")
    assert torch.equal(sent.B[CLIENT_MODULE], torch.zeros(6, 4))  # RoLoRA's frozen B: nothing moves
    assert torch.equal(client.feedback.residual("B:" + CLIENT_MODULE), residual_b)


def test_a_redone_round_does_not_feed_its_residual_twice():
    client = AdapterUploads(settings())
    A = torch.randn(4, 5)
    offer = RoundOffer("train", 0, A={CLIENT_MODULE: A}, B={CLIENT_MODULE: torch.zeros(6, 4)}, rank=4)
    client.begin(offer)
    first = client.prepare(UploadPayload(0, 1, 4, A={CLIENT_MODULE: A + 1}, B={CLIENT_MODULE: torch.zeros(6, 4)}),
                           "both").A[CLIENT_MODULE]
    client.rewind()  # the server lost the session: the round is redone
    again = client.prepare(UploadPayload(0, 1, 4, A={CLIENT_MODULE: A + 1}, B={CLIENT_MODULE: torch.zeros(6, 4)}),
                           "both").A[CLIENT_MODULE]
    assert torch.equal(first, again)


def test_fp16_uploads_whole_tensors_in_fp16():
    client = AdapterUploads(settings("fp16"))
    body = client.prepare(payload(coordinator(1)[0], "c0", 0.1), "both")
    assert not body.delta and {s.name for s in body.codecs.values()} == {"fp16"} and len(body.codecs) == 3
    got = UploadPayload.from_message(over_wire(body.to_message()))
    assert got.A[CLIENT_MODULE].dtype == torch.float32
    assert torch.equal(got.A[CLIENT_MODULE], roundtrip(torch.full((4, 5), 0.1), parse_codec("fp16")))


# ---------------------------------------------------------------- refusals


def test_the_server_refuses_uploads_that_do_not_follow_its_upload_codec():
    coord, _ = coordinator(2, adapter_up=TOPK)
    coord.tick(0.0)
    coord.poll("c0"), coord.poll("c1")
    with pytest.raises(FederationError, match="sent whole tensors"):
        coord.upload("c0", payload(coord, "c0"))
    coord, _ = coordinator(2, adapter_up=TOPK)
    coord.tick(0.0)
    coord.poll("c0")
    with pytest.raises(FederationError, match="does not fit the received A"):
        coord.upload("c0", payload(coord, "c0", A={CLIENT_MODULE: torch.zeros(4, 4)}, delta=True))
    coord, _ = coordinator(1)
    coord.tick(0.0)
    coord.poll("c0")
    with pytest.raises(FederationError, match="uploads are fp32"):
        coord.upload("c0", payload(coord, "c0", delta=True))


def test_a_delta_coded_upload_is_rebuilt_before_the_strategy_sees_it():
    coord, _ = coordinator(1, adapter_up=TOPK)
    coord.tick(0.0)
    offer = coord.poll("c0")
    body = payload(coord, "c0", 0.5, delta=True, head={HEAD: torch.full((3, 6), 0.5)})
    coord.upload("c0", body)
    taken = coord.uploads["c0"]
    assert torch.allclose(taken.factors[CLIENT_MODULE].A, offer.A[CLIENT_MODULE] + 0.5)
    assert torch.equal(taken.head[HEAD], torch.full((3, 6), 0.5))  # not in the offer: taken whole


@pytest.mark.parametrize("value, error", [
    ("int8", "not int8"), ("topk:density=2", "out of range"), ("topk", "needs density"), ("zip", "unknown codec"),
    (5, "must be a string"), ("x" * 100, "at most 64 characters"), ("topk:density=0.1,ef=1", "density=D only")])
def test_bad_adapter_codecs_are_refused_on_the_wire_by_field(value, error):
    meta = {**settings().to_meta(), "adapter_down": value}
    with pytest.raises(ProtocolError, match=f"'adapter_down'.*{error}"):
        FederationSettings.from_meta(meta, "join reply")
    assert FederationSettings.from_meta(settings().to_meta(), "join reply") == settings()


@pytest.mark.parametrize("argv, error", [
    (["--adapter-up", "nf4"], "--adapter-up: .*not nf4"), (["--adapter-down", "topk:density=0"], "out of range"),
    (["--adapter-down", "topk:dens=0.1"], "is not a parameter")])
def test_bad_adapter_codecs_are_refused_on_the_command_line(argv, error, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["server", "--strategy", "fedit", *argv])
    assert re.search(error, capsys.readouterr().err)


def test_topk_uploads_need_downloads_that_carry_factors():
    with pytest.raises(ValueError, match="--client-init local"):
        FederationConfig(client_init="local", adapter_up="topk:density=0.1")
    assert FederationConfig(client_init="local", adapter_up="fp16").adapter_up == parse_adapter_codec("fp16")


# ---------------------------------------------------------------- a federated run


class Meter(FederatedClient):
    """A federated client noting the tensor bytes of each upload it sends."""

    def __post_init__(self):
        super().__post_init__()
        self.upload_tensor_bytes: list[int] = []

    def _request(self, msg):
        if msg.op == "upload":
            self.upload_tensor_bytes.append(sum(frame_len(f) for f in encode(msg)[1:]))
        return super()._request(msg)


@pytest.fixture(scope="module")
def wide_bert(tmp_path_factory):
    """A 4-block BERT 128 wide: its LoRA factors outweigh the upload's header."""
    return save_tiny("bert", tmp_path_factory.mktemp("bert128"), hidden_size=128, intermediate_size=128)


def federate(path, up: str, down: str) -> tuple[list[Meter], object]:
    fed = FederationConfig(strategy="fedit", rounds=2, local_steps=2, min_clients=2, adapter_up=up, adapter_down=down)
    with threaded_server(path, "1,1", num_labels=3, dropout=False, federation=fed) as (endpoint, server):
        runners = []
        for index in range(2):
            client = SplitClient(ClientConfig(server=endpoint, model=str(path), num_labels=3, dropout=False,
                                              lora=LoraSpec(4, 8.0), client_id=f"c{index}", lr=5e-3, timeout=60))
            batches = [random_batch(100 * index + i, VOCAB) for i in range(2)]
            runners.append(Meter(client, batches, 10, test=batches, options=FederatedOptions(evaluate=True)))

        def one(runner):
            try:
                runner.run()
            finally:
                runner.client.close()

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(one, runners))
        return runners, server.coordinator


def test_a_federation_runs_in_each_adapter_codec_and_its_uploads_shrink(wide_bert):
    runs = {up: federate(wide_bert, up, down) for up, down in
            (("fp32", "fp32"), ("fp16", "fp16"), ("topk:density=0.1", "topk:density=0.5"))}
    for runners, coord in runs.values():
        assert [h.aggregated for h in coord.history] == [True, True]
        assert all(r.final_accuracy is not None for r in runners)
    # The last round's uploads (the head is in the offer by then, so every tensor is an update).
    last = {up: runners[0].upload_tensor_bytes[-1] for up, (runners, _) in runs.items()}
    assert last["fp16"] / last["fp32"] == pytest.approx(0.5, abs=0.01)
    # 10% of the entries, each an int32 index and an fp16 value: 0.15 of fp32's bytes.
    assert last["topk:density=0.1"] / last["fp32"] == pytest.approx(0.15, abs=0.01)
    # The metered bytes are the compressed ones.
    records = {up: runners[0].records[-1].record["upload_bytes"] for up, (runners, _) in runs.items()}
    assert records["topk:density=0.1"] < 0.25 * records["fp32"] and records["fp16"] < 0.6 * records["fp32"]
    # Downloads: fp16 halves the offer; top-k at density 0.5 sends 0.75 of fp32's bytes.
    offers = {up: runners[0].records[-1].record["download_bytes"] for up, (runners, _) in runs.items()}
    assert offers["fp16"] < 0.55 * offers["fp32"] and offers["topk:density=0.1"] < 0.8 * offers["fp32"]


def test_a_pruned_rank_is_rebuilt_from_the_leading_part_of_what_was_received():
    # HetLoRA: a client may upload a smaller rank than its download had.
    coord, _ = coordinator(2, strategy="hetlora", adapter_up=TOPK)
    coord.tick(0.0)
    offer = coord.poll("c0")
    body = payload(coord, "c0", 0.25, rank=2, delta=True)
    coord.upload("c0", body)
    factors = coord.uploads["c0"].factors[CLIENT_MODULE]
    assert torch.allclose(factors.A, offer.A[CLIENT_MODULE][:2] + 0.25)
    assert torch.allclose(factors.B, offer.B[CLIENT_MODULE][:, :2] + 0.25)
