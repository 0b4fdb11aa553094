"""The partitioner: who owns what, placeholders, tied weights, clear errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FAMILIES, legacy_layernorm_name, rewrite_checkpoint, save_tiny
from split.families import family_for
from split.partition import CLIENT, SERVER, Cut, build_segment
from split.placeholders import Absent, Injected, Passthrough, ZeroEmbedding
from split.tensorfile import CheckpointIndex


def _names(segment):
    return {n for n, _ in segment.model.named_parameters()}


@pytest.mark.parametrize("family", FAMILIES)
def test_u_shaped_sides_own_disjoint_parts_that_cover_the_checkpoint(family, tiny_models):
    path = tiny_models(family)
    client = build_segment(path, CLIENT, Cut(1, 1), num_labels=3)
    server = build_segment(path, SERVER, Cut(1, 1), num_labels=3)
    fam = family_for(client.config)
    blocks = f"{fam.prefix}.{fam.blocks}"
    c, s = _names(client), _names(server)
    assert not c & s
    assert {n.split(".")[len(blocks.split("."))] for n in s} == {"1", "2"}
    assert all(n.startswith(blocks + ".") for n in s)
    assert not any(n.startswith(f"{blocks}.1.") or n.startswith(f"{blocks}.2.") for n in c)
    ckpt = set(load_file(str(path / "model.safetensors")))
    ckpt = {k for k in ckpt if not k.endswith("position_ids")}  # a buffer some checkpoints carry
    assert c | s == ckpt
    assert client.owned_bytes + server.owned_bytes <= client.checkpoint_bytes
    assert isinstance(server.blocks()[0], Passthrough) and isinstance(client.blocks()[1], Passthrough)
    assert isinstance(server.injected, Injected)


def test_loaded_values_equal_the_checkpoint(tiny_models):
    path = tiny_models("llama")
    client = build_segment(path, CLIENT, Cut(1, 1), num_labels=3)
    ckpt = load_file(str(path / "model.safetensors"))
    for name, param in client.model.named_parameters():
        assert torch.equal(param, ckpt[name]), name
    assert client.initialised == []


def test_two_part_server_holds_norm_and_head(tiny_models):
    path = tiny_models("llama")
    server = build_segment(path, SERVER, Cut(1, 0), num_labels=3)
    client = build_segment(path, CLIENT, Cut(1, 0), num_labels=3)
    assert "score.weight" in _names(server) and "model.norm.weight" in _names(server)
    assert not any(n.startswith("score") or n.startswith("model.norm") for n in _names(client))
    assert isinstance(client.model.score, Absent)
    with pytest.raises(RuntimeError, match="held by the other side"):
        client.model.score(torch.zeros(1, 32))


def test_tied_lm_head_shares_the_embedding_on_the_client(tmp_path):
    path = save_tiny("gpt2", tmp_path / "lm", task="causal-lm")
    client = build_segment(path, CLIENT, Cut(1, 1), task="causal-lm")
    assert client.model.lm_head.weight is client.model.transformer.wte.weight
    # Two-part: the server holds the head but not the embedding it is tied to.
    server = build_segment(path, SERVER, Cut(1, 0), task="causal-lm")
    ckpt = load_file(str(path / "model.safetensors"))
    assert torch.equal(server.model.lm_head.weight, ckpt["transformer.wte.weight"])


def test_missing_head_is_initialised_deterministically():
    from conftest import minilm_path

    a = build_segment(minilm_path(), CLIENT, Cut(1, 1), num_labels=5, seed=3)
    b = build_segment(minilm_path(), CLIENT, Cut(1, 1), num_labels=5, seed=3)
    c = build_segment(minilm_path(), CLIENT, Cut(1, 1), num_labels=5, seed=4)
    assert a.initialised == ["classifier.weight", "classifier.bias"]
    assert torch.equal(a.model.classifier.weight, b.model.classifier.weight)
    assert not torch.equal(a.model.classifier.weight, c.model.classifier.weight)


@pytest.mark.parametrize("cut, message", [
    (Cut(0, 1), "front >= 1"),
    (Cut(2, 2), "leaves no block for the server"),
    (Cut(1, -1), "back >= 0"),
])
def test_bad_cuts_are_refused(cut, message, tiny_models):
    with pytest.raises(ValueError, match=message):
        build_segment(tiny_models("bert"), CLIENT, cut, num_labels=3)


def test_cut_parsing():
    assert Cut.parse("2,1") == Cut(2, 1)
    with pytest.raises(ValueError, match="two integers"):
        Cut.parse("2")


def test_unsupported_family_and_task(tmp_path, tiny_models):
    from transformers import T5Config

    with pytest.raises(ValueError, match="'t5' is not supported: T5Model does not hold exactly one list of its 6 "
                                         "blocks. fedsplit partitions bert, distilbert"):
        family_for(T5Config())
    with pytest.raises(ValueError, match="not supported for the bert family"):
        build_segment(tiny_models("bert"), CLIENT, Cut(1, 1), task="causal-lm")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        CheckpointIndex(tmp_path)


def test_tensorfile_reads_every_dtype_exactly(tmp_path):
    from safetensors.torch import save_file

    tensors = {"f32": torch.randn(3, 4), "bf16": torch.randn(5).to(torch.bfloat16), "f16": torch.randn(2, 2).half(),
               "i64": torch.arange(6), "u8": torch.arange(4, dtype=torch.uint8), "scalar": torch.tensor(1.5),
               "b": torch.tensor([True, False])}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    index = CheckpointIndex(tmp_path)
    for name, value in tensors.items():
        got = index.read(name)
        assert got.dtype == value.dtype and torch.equal(got, value), name
    assert index.read("bf16", torch.float32).dtype == torch.float32


def _parameters(segment) -> dict[str, torch.Tensor]:
    return dict(segment.model.named_parameters())


def test_legacy_layernorm_names_load_like_the_original(tiny_models, tmp_path):
    path = tiny_models("bert")
    legacy = rewrite_checkpoint(path, tmp_path / "legacy", legacy_layernorm_name)
    assert "bert.embeddings.LayerNorm.gamma" in CheckpointIndex(legacy)
    for side in (CLIENT, SERVER):
        original = _parameters(build_segment(path, side, Cut(1, 1), num_labels=3))
        renamed = build_segment(legacy, side, Cut(1, 1), num_labels=3)
        assert renamed.initialised == []
        assert _parameters(renamed).keys() == original.keys()
        for name, value in _parameters(renamed).items():
            assert torch.equal(value, original[name]), name


def test_a_missing_block_tensor_is_refused_by_name(tiny_models, tmp_path):
    gone = "model.layers.2.self_attn.k_proj.weight"  # a server block under cut 1,1
    broken = rewrite_checkpoint(tiny_models("llama"), tmp_path / "broken", lambda k: None if k == gone else k)
    with pytest.raises(ValueError, match=f"no tensor for {gone} .*Only a new classification head may be absent"):
        build_segment(broken, SERVER, Cut(1, 1), num_labels=3)
    assert build_segment(broken, CLIENT, Cut(1, 1), num_labels=3).initialised == []  # not the client's tensor


def test_an_untied_lm_head_is_read_under_its_legacy_name_and_never_invented(tmp_path):
    path = save_tiny("gpt_neox", tmp_path / "neox", task="causal-lm")
    ckpt = load_file(str(path / "model.safetensors"))
    assert "embed_out.weight" in ckpt and "lm_head.weight" not in ckpt  # transformers saves the legacy name
    client = build_segment(path, CLIENT, Cut(1, 1), task="causal-lm")
    assert torch.equal(client.model.lm_head.weight, ckpt["embed_out.weight"])
    headless = rewrite_checkpoint(path, tmp_path / "headless", lambda k: None if k == "embed_out.weight" else k)
    with pytest.raises(ValueError, match="no tensor for lm_head.weight"):
        build_segment(headless, CLIENT, Cut(1, 1), task="causal-lm")


def test_unused_checkpoint_tensors_are_reported_by_the_side_that_owns_them(tiny_models, tmp_path, caplog):
    extra = "model.layers.1.self_attn.unused.weight"
    path = tiny_models("llama")
    grown = tmp_path / "grown"
    rewrite_checkpoint(path, grown, lambda k: k)
    tensors = load_file(str(grown / "model.safetensors"))
    save_file({**tensors, extra: torch.zeros(2)}, str(grown / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level("WARNING", logger="split.partition"):
        build_segment(grown, CLIENT, Cut(1, 1), num_labels=3)
    assert extra not in caplog.text  # block 1 runs on the server
    with caplog.at_level("WARNING", logger="split.partition"):
        build_segment(grown, SERVER, Cut(1, 1), num_labels=3)
    assert f"the checkpoint has 1 tensors the model does not use (not loaded): {extra}" in caplog.text


def test_weights_outside_the_family_layout_are_refused(tmp_path):
    # OPT-350m style: a projection between a narrower embedding and the blocks.
    path = save_tiny("opt", tmp_path / "opt", word_embed_proj_dim=16)
    with pytest.raises(ValueError, match="model.decoder.project_out.weight, model.decoder.project_in.weight"):
        build_segment(path, CLIENT, Cut(1, 1), num_labels=3)


def test_zero_embedding_takes_any_call_and_follows_dtype_and_device(tiny_models):
    zero = ZeroEmbedding(8, torch.bfloat16)
    mask = torch.ones(2, 5, dtype=torch.long)
    out = zero(mask, 0, position_ids=mask)  # OPT's learned positions
    assert out.shape == (2, 5, 8) and out.dtype == torch.bfloat16 and out.device == mask.device and not out.any()
    assert zero.to(torch.float16)(input_ids=mask).dtype == torch.float16  # BERT's keyword call
    server = build_segment(tiny_models("gpt2"), SERVER, Cut(1, 1), num_labels=3, dtype=torch.bfloat16)
    assert server.injected(mask).dtype == torch.bfloat16
    assert server.model.transformer.wpe(mask).dtype == torch.bfloat16


def test_an_unlisted_llama_like_model_gets_its_layout_read_off_the_model():
    from conftest import tiny_config

    fam = family_for(tiny_config("smollm3"))
    assert fam.name == "detected:smollm3"
    assert (fam.prefix, fam.blocks, fam.embeddings, fam.norm) == ("model", "layers", ("embed_tokens",), "norm")
    assert fam.heads == {"causal-lm": ("lm_head",), "classification": ("score",)}
    assert fam.lora_targets == ("q_proj", "v_proj") and not fam.conv1d
