"""ONNX export of a client's segments and split inference with onnxruntime:
parity with torch for GPT-2, a Llama-family model (Qwen2) and BERT at shapes
other than the export's, and a loopback inference run that agrees with the
torch client and with the monolithic model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification

from conftest import minilm_path, save_tiny, threaded_server
from edge.client import ClientConfig, ServerRefused, SplitClient
from edge.data import pad_batch
from edge.export import merged_client
from edge.infer import InferOptions, run_inference, softmax
from edge.onnx_runtime import OnnxSegments, batch_arrays
from edge.onnx_segments import back_segment, front_segment
from edge.tokenizer import load_tokenizer
from split.adapter_folder import (SPLIT_RECORD, AdapterError, read_adapter, record_split, server_part,
                                  tensors_digest)
from server.service import ServerConfig
from split.cli import main
from split.families import block_of, family_for
from split.lora import LoraSpec, adapter_state, attach_lora, save_adapter
from split.onnx_manifest import MANIFEST, ManifestError, read_manifest
from split.partition import Cut, load_config
from split.protocol import ModelInfo

FAMILIES = ("gpt2", "qwen2", "bert")
LABELS = ("neg", "neu", "pos")
SPEC = LoraSpec(rank=4, alpha=8.0)
CUT = Cut(1, 1)
TOL = 1e-4  # fp32, max abs


def make_adapter(model_dir, out, cut: Cut = CUT):
    """A whole-model adapter for ``model_dir`` as a client saves it, with
    random non-zero LoRA B everywhere and a perturbed head (so merging and
    loading the head both matter); returns the monolithic peft model."""
    config = load_config(model_dir, "classification", len(LABELS), dropout=False)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, config=config)
    fam = family_for(config)
    heads = fam.trained_heads("classification")
    peft = attach_lora(model, SPEC, fam, "classification", 0, modules_to_save=heads)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    save_adapter(out, adapter_state(peft), SPEC, fam, "classification", str(model_dir), heads, labels=list(LABELS))
    record_split(out, cut, ModelInfo.of(model_dir, config))
    return peft.eval()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """family -> (model folder, adapter folder, export folder, monolithic
    peft model), exported with ``fedsplit export`` on first use."""
    cache = {}
    vocab = len(load_tokenizer(minilm_path(), 30522))

    def get(family: str):
        if family not in cache:
            root = tmp_path_factory.mktemp(f"onnx-{family}")
            model = save_tiny(family, root / "model", vocab_size=vocab)
            peft = make_adapter(model, root / "adapter")
            code = main(["export", "--model", str(model), "--adapter", str(root / "adapter"), "--out",
                         str(root / "onnx"), "--tokenizer", str(minilm_path())])
            assert code == 0
            cache[family] = (model, root / "adapter", root / "onnx", peft)
        return cache[family]

    return get


def reference_segments(model, adapter_dir):
    """The torch modules the export is made from, rebuilt independently."""
    seg = merged_client(model, read_adapter(adapter_dir), CUT, len(LABELS))
    width = seg.config.get_text_config().hidden_size
    return (front_segment(seg.model, seg.family, CUT, seg.num_layers),
            back_segment(seg.model, seg.family, CUT, seg.num_layers, width), width)


def random_arrays(batch: int, length: int, vocab: int, width: int, seed: int) -> dict[str, np.ndarray]:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length // 2:] = 0
    ids = torch.randint(5, vocab, (batch, length), generator=gen).masked_fill(mask == 0, 0)
    arrays = batch_arrays(ids.numpy(), mask.numpy())
    arrays["hidden"] = torch.randn(batch, length, width, generator=gen).numpy()
    return arrays


@pytest.mark.parametrize("family", FAMILIES)
def test_onnxruntime_matches_torch_for_both_segments_at_other_shapes(exports, family):
    model, adapter, folder, _ = exports(family)
    manifest = read_manifest(folder)
    assert manifest.cut == CUT and manifest.labels == LABELS and manifest.lora == read_adapter(adapter).spec
    assert ("position_ids" in manifest.front.inputs) == (family == "qwen2")
    front, back, width = reference_segments(model, adapter)
    onnx = OnnxSegments(folder, manifest)
    # Exported at 2 x 8: other batch sizes and lengths run through the dynamic axes.
    for batch, length, seed in ((3, 13, 0), (1, 5, 1), (5, 2, 2)):
        arrays = random_arrays(batch, length, manifest.vocab_size, width, seed)
        inputs = {k: torch.from_numpy(v) for k, v in arrays.items()}
        with torch.no_grad():
            want_hidden = front(*(inputs[n] for n in front.input_names()))
            want_logits = back(*(inputs[n] for n in back.input_names()))
        got_hidden, got_logits = onnx.run_front(arrays), onnx.run_back(arrays)
        assert got_hidden.shape == (batch, length, width) and got_logits.shape == (batch, len(LABELS))
        assert np.abs(got_hidden - want_hidden.numpy()).max() < TOL
        assert np.abs(got_logits - want_logits.numpy()).max() < TOL
        # The merged LoRA matters: the base weights alone give another hidden state.
        assert np.abs(got_hidden).max() > 0


def _texts(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = ["red", "fig", "oak", "sky", "tin", "owl", "sea", "ink", "elm", "jam", "ivy", "gum"]
    return [{"text": " ".join(rng.choice(words, size=int(rng.integers(2, 9)))), "label": LABELS[i % 3]}
            for i in range(n)]


def _client_logits(endpoint, model, adapter_dir, texts, batch_size, save_to):
    """Logits of the torch split client holding the adapter's client half;
    the client then saves the whole adapter to ``save_to``."""
    client = SplitClient(ClientConfig(server=endpoint, model=str(model), cut=CUT, num_labels=len(LABELS), lora=SPEC,
                                      dropout=False))
    try:
        hosted = set(CUT.server_blocks(client.segment.num_layers))
        tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
        mine = {k: v for k, v in tensors.items() if block_of(k) not in hosted}
        set_peft_model_state_dict(client.model, mine)
        tok = load_tokenizer(minilm_path(), 30522)
        out = []
        for start in range(0, len(texts), batch_size):
            ids, mask = pad_batch(tok(texts[start:start + batch_size], truncation=True, max_length=64)["input_ids"],
                                  tok.pad_token_id)
            out.append(client.predict({"input_ids": ids, "attention_mask": mask}))
        client.save_adapter(save_to, labels=list(LABELS))
        return torch.cat(out)
    finally:
        client.close()


@pytest.mark.parametrize("family", ["qwen2", "bert"])
def test_split_inference_loopback_agrees_with_the_torch_client_and_the_whole_model(exports, family, tmp_path):
    model, adapter, folder, peft = exports(family)
    rows = _texts(10, seed=3)
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [r["text"] for r in rows]
    with threaded_server(model, "1,1", num_labels=len(LABELS), dropout=False, adapter=str(adapter)) as (endpoint, _):
        summary = run_inference(InferOptions(server=endpoint, onnx=str(folder), data=str(data),
                                             out=str(tmp_path / "pred.jsonl"), batch_size=4))
        torch_logits = _client_logits(endpoint, model, adapter, texts, 4, tmp_path / "saved")
    preds = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    torch_probs = softmax(torch_logits.double().numpy())
    assert [p["prediction"] for p in preds] == [LABELS[k] for k in torch_probs.argmax(-1)]
    assert max(abs(p["probability"] - torch_probs[i].max()) for i, p in enumerate(preds)) < TOL
    assert [p["label"] for p in preds] == [r["label"] for r in rows]
    assert summary["samples"] == 10 and summary["bytes_sent"] > 0
    assert summary["accuracy"] == sum(p["prediction"] == p["label"] for p in preds) / 10
    # The client's saved adapter records its cut and checkpoint, and holds the served server half.
    manifest, saved = read_manifest(folder), read_adapter(tmp_path / "saved")
    assert saved.cuts == (CUT,) and saved.model.fingerprint == manifest.model.fingerprint
    assert tensors_digest(server_part(saved, CUT, 4)) == manifest.server_adapter
    # The server served the adapter's server half: the monolithic model agrees.
    tok = load_tokenizer(minilm_path(), 30522)
    enc = tok(texts, truncation=True, max_length=64, padding=True, return_tensors="pt")
    with torch.no_grad():
        whole = peft(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    assert np.abs(softmax(whole.double().numpy()) - torch_probs).max() < TOL


def test_infer_refuses_a_server_without_the_export_adapter(exports, tmp_path, capsys):
    model, adapter, folder, _ = exports("bert")
    data = tmp_path / "unlabelled.jsonl"
    data.write_text(json.dumps({"text": "red fig"}) + "\n")
    with threaded_server(model, "1,1", num_labels=len(LABELS)) as (endpoint, _):
        assert main(["infer", "--server", endpoint, "--onnx", str(folder), "--data", str(data)]) == 2
    assert "does not serve the adapter this export was made from" in capsys.readouterr().err
    # A served adapter refuses a client that asks for another LoRA.
    with threaded_server(model, "1,1", num_labels=len(LABELS), adapter=str(adapter)) as (endpoint, _):
        with pytest.raises(ServerRefused, match="serves the adapter"):
            SplitClient(ClientConfig(server=endpoint, model=str(model), num_labels=len(LABELS),
                                     lora=LoraSpec(rank=2, alpha=8.0)))


def test_manifest_and_adapter_errors_name_what_is_wrong(exports, tmp_path):
    model, adapter, folder, _ = exports("bert")
    # A manifest edited by hand.
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    manifest = json.loads((broken / MANIFEST).read_text())
    (broken / MANIFEST).write_text(json.dumps({**manifest, "front": {**manifest["front"], "file": "../x.onnx"}}))
    with pytest.raises(ManifestError, match="front.file"):
        read_manifest(broken)
    (broken / MANIFEST).write_text(json.dumps({**manifest, "server_adapter": "00"}))
    with pytest.raises(ManifestError, match="server_adapter"):
        read_manifest(broken)
    # An adapter missing one of the client's LoRA tensors.
    partial = tmp_path / "partial"
    shutil.copytree(adapter, partial)
    tensors = load_file(str(partial / "adapter_model.safetensors"))
    gone = next(k for k in tensors if ".layer.0." in k and "lora_B" in k).removesuffix("lora_B.weight")
    save_file({k: v for k, v in tensors.items() if not k.startswith(gone)}, str(partial / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="no LoRA tensors for the client's modules"):
        merged_client(model, read_adapter(partial), CUT, len(LABELS))
    # No recorded cut and no --cut; a checkpoint other than the one it was trained on.
    (partial / SPLIT_RECORD).unlink()
    with pytest.raises(AdapterError, match="pass --cut"):
        read_adapter(partial).cut(None)
    assert read_adapter(partial).cut(Cut(2, 1)) == Cut(2, 1)
    record = json.loads((adapter / SPLIT_RECORD).read_text())
    record["model"]["fingerprint"] = "f" * 64
    (partial / SPLIT_RECORD).write_text(json.dumps(record))
    assert main(["export", "--model", str(model), "--adapter", str(partial), "--out", str(tmp_path / "x"),
                 "--tokenizer", str(minilm_path())]) == 2
    assert not (tmp_path / "x" / MANIFEST).exists()


def test_round_checkpoint_cut_comes_from_its_client_records(exports, tmp_path):
    _, adapter, _, _ = exports("bert")
    round_dir = tmp_path / "round_3"
    shutil.copytree(adapter, round_dir)
    (round_dir / SPLIT_RECORD).unlink()
    (round_dir / "clients").mkdir()
    for name, cut in (("a", [1, 1]), ("b", [1, 1])):
        save_file({"x": torch.zeros(1)}, str(round_dir / "clients" / f"{name}.safetensors"),
                  metadata={"fedsplit": json.dumps({"cut": cut})})
    folder = read_adapter(round_dir)
    assert folder.cut(None) == Cut(1, 1) and folder.model is None
    save_file({"x": torch.zeros(1)}, str(round_dir / "clients" / "c.safetensors"),
              metadata={"fedsplit": json.dumps({"cut": [2, 1]})})
    with pytest.raises(AdapterError, match="different cuts"):
        read_adapter(round_dir).cut(None)
    # The digest covers exactly the server blocks' LoRA, whatever dtype it is stored in.
    part = server_part(folder, Cut(1, 1), 4)
    assert part and all(block_of(k) in (1, 2) for k in part)
    assert tensors_digest(part) == tensors_digest({k: v.clone() for k, v in reversed(list(part.items()))})
    changed = dict(part)
    key = next(iter(changed))
    changed[key] = changed[key] + 1e-3
    assert tensors_digest(changed) != tensors_digest(part)


def test_a_served_adapter_is_refused_where_it_has_no_meaning(capsys):
    # Refused from the command line before any model loads.
    assert main(["server", "--adapter", "some-adapter", "--strategy", "fedit"]) == 2
    assert "--adapter serves a trained adapter for inference" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--server-lora per-client"):
        ServerConfig(adapter="some-adapter", server_lora="shared")
    with pytest.raises(ValueError, match="two-part split"):
        ServerConfig(adapter="some-adapter", cut=Cut(1, 0))
