"""Round checkpoints (server/checkpoint.py): the global model is one standard
PEFT adapter plus a frozen-weight delta that, applied to the stock model, give
the model the federation holds; the coordinator's state reads back as written."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from conftest import VOCAB, random_batch
from server.checkpoint import apply_base_delta, last_round, read_coordinator, write_round
from server.round_eval import RoundError, round_accuracy, round_labels
from server.strategies.base import GlobalModel
from split.families import family_for
from split.partition import load_config

RANK, ALPHA = 4, 8.0


def plain_model(path):
    config = load_config(path, "classification", 3, dropout=False)
    return AutoModelForSequenceClassification.from_pretrained(path, config=config).eval()


def lora_modules(model, family) -> dict[str, torch.nn.Module]:
    """Whole-model name -> layer of the family's default LoRA targets."""
    return {name: module for name, module in model.named_modules()
            if name.rsplit(".", 1)[-1] in family.lora_targets}


def written_round(family_name, tiny_models, tmp_path, labels=None):
    """A round written from random factors, head and frozen-weight delta, and
    the stock model with the same updates merged by hand; (folder, reference, path, A)."""
    path = tiny_models(family_name)
    reference = plain_model(path)
    family = family_for(reference.config)
    modules = lora_modules(reference, family)
    gen = torch.Generator().manual_seed(0)
    d_in_out = {m: (layer.weight.shape[::-1] if family.conv1d else layer.weight.shape) for m, layer in modules.items()}
    A = {m: torch.randn(RANK, d_in, generator=gen) for m, (_, d_in) in d_in_out.items()}
    B = {m: torch.randn(d_out, RANK, generator=gen) * 0.1 for m, (d_out, _) in d_in_out.items()}
    head_module = family.trained_heads("classification")[0]
    head = {f"{head_module}.{n}": torch.randn(t.shape, generator=gen)
            for n, t in reference.get_submodule(head_module).named_parameters()}
    first = sorted(modules)[0]
    base_delta = {first: torch.randn(*d_in_out[first], generator=gen) * 0.1}
    snapshot = {"round": 1, "state": {"A": A}, "merged": base_delta, "blocks": frozenset({0, 2})}

    folder = write_round(tmp_path, 0, GlobalModel(A, B, RANK, ALPHA, head), family, "classification", str(path),
                         base_delta, snapshot, labels=labels)
    with torch.no_grad():
        for m, layer in modules.items():
            update = ALPHA / RANK * B[m] @ A[m] + base_delta.get(m, 0)
            layer.weight += update.T if family.conv1d else update
        for n, t in reference.get_submodule(head_module).named_parameters():
            t.copy_(head[f"{head_module}.{n}"])
    return folder, reference, path, A


@pytest.mark.parametrize("family_name", ["bert", "gpt2"])  # nn.Linear and Conv1D (in x out) weights
def test_written_round_reproduces_the_federated_model(family_name, tiny_models, tmp_path):
    folder, reference, path, A = written_round(family_name, tiny_models, tmp_path)
    assert folder == tmp_path / "round_0" and last_round(tmp_path) == folder
    assert not (tmp_path / "round_0.tmp").exists()

    base = plain_model(path)
    assert apply_base_delta(base, folder) == 1
    loaded = PeftModel.from_pretrained(base, folder).eval()
    batch = {k: v for k, v in random_batch(5, VOCAB, num_labels=3).items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, reference(**batch).logits, rtol=1e-4, atol=1e-5)

    back = read_coordinator(folder)
    assert back["round"] == 1 and back["blocks"] == frozenset({0, 2})
    assert all(torch.equal(back["state"]["A"][m], A[m]) for m in A)


def test_round_accuracy_scores_the_global_model_the_round_holds(tiny_models, tmp_path):
    labels = ("cat", "dog", "eel")
    folder, reference, path, _ = written_round("bert", tiny_models, tmp_path, labels=labels)
    batch = random_batch(6, VOCAB, batch=8, num_labels=3)
    with torch.no_grad():
        predicted = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
    # Right on the first five samples, wrong on the last three: 5/8 if the round is scored as merged by hand.
    batch["labels"] = torch.cat([predicted[:5], (predicted[5:] + 1) % 3])
    assert round_labels(folder) == list(labels)
    assert round_accuracy(folder, path, [batch], list(labels)) == 5 / 8
    with pytest.raises(RoundError, match="differ from the data's"):
        round_accuracy(folder, path, [batch], ["dog", "cat", "eel"])  # the same classes in another order
    with pytest.raises(RoundError, match="no labelled samples"):
        round_accuracy(folder, path, [], list(labels))
    with pytest.raises(RoundError, match="missing; give a round_N/ checkpoint"):
        round_labels(tmp_path)
    (folder / "config.json").write_text('{"id2label": {"0": "cat", ')  # truncated
    with pytest.raises(RoundError, match="not valid JSON"):
        round_labels(folder)
    (folder / "config.json").write_text('{"id2label": {"0": "cat", "2": "eel"}}')
    with pytest.raises(RoundError, match="must number the classes 0..1"):
        round_labels(folder)


def test_a_new_round_replaces_a_stale_temporary_folder(tiny_models, tmp_path):
    path = tiny_models("bert")
    family = family_for(plain_model(path).config)
    (tmp_path / "round_3.tmp").mkdir()
    (tmp_path / "round_3.tmp" / "half-written").write_text("x")
    glob = GlobalModel({"bert.encoder.layer.0.attention.self.query": torch.zeros(RANK, 32)},
                       {"bert.encoder.layer.0.attention.self.query": torch.zeros(32, RANK)}, RANK, ALPHA)
    folder = write_round(tmp_path, 3, glob, family, "classification", str(path), {}, {"round": 4})
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                       "coordinator.json", "coordinator.safetensors"]
    assert not (tmp_path / "round_3.tmp").exists()
