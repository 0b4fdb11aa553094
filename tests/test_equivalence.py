"""Invariants 1 and 6: split training over two real processes equals monolithic
peft training, and the two sides' adapters save as one loadable PEFT adapter."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from conftest import (DECODERS, FAMILIES, VOCAB, legacy_layernorm_name, minilm_path, random_batch,
                      rewrite_checkpoint, server_process)
from edge.client import ClientConfig, SplitClient
from split.families import family_for, supported_types
from split.lora import LoraSpec, adapter_state, attach_lora
from split.partition import Cut, init_missing, load_config
from split.tensorfile import CheckpointIndex

STEPS = 20
SPEC = LoraSpec(rank=4, alpha=8.0)
LR = 5e-3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread in this process, as in the server's: the two share
    the cores, and one's spinning OpenMP workers slow the other's steps tenfold."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def monolithic(path, task, num_labels, seed=0):
    """The reference: the transformers model in one process, same config, head and LoRA init."""
    config = load_config(path, task, num_labels, dropout=False)
    cls = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    model = cls.from_pretrained(path, config=config)
    fam = family_for(config)
    heads = fam.trained_heads(task)
    index = CheckpointIndex(path)
    with torch.no_grad():
        for name, param in model.named_parameters():
            in_ckpt = name in index or name.split(".", 1)[-1] in index
            if not in_ckpt and any(name.startswith(h + ".") for h in heads):
                param.copy_(init_missing(name, tuple(param.shape), seed, config.initializer_range))
    model = attach_lora(model, SPEC, fam, task, seed, modules_to_save=heads)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    return model, opt, heads


def batches(vocab, task, pad, num_labels=3):
    return [random_batch(100 + i, vocab, batch=4, max_len=12, task=task, pad=pad, num_labels=num_labels)
            for i in range(STEPS)]


def run_and_compare(path, task, cut: Cut, vocab: int, pad: int, folder_root, num_labels: int = 3):
    """Train split and monolithic side by side; ``folder_root`` receives the saved adapter."""
    data = batches(vocab, task, pad, num_labels)
    ref, opt, heads = monolithic(path, task, num_labels)
    ref.train()
    ref_losses = []
    for batch in data:
        out = ref(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        ref_losses.append(out.loss.item())

    extra = ["--no-dropout", "--num-labels", str(num_labels), "--task", task, "--threads", "1"]
    with server_process(path, str(cut), *extra) as endpoint:
        client = SplitClient(ClientConfig(server=endpoint, model=str(path), cut=cut, task=task,
                                          num_labels=num_labels, lora=SPEC, lr=LR, dropout=False))
        try:
            losses = [client.train_step(batch) for batch in data]
            split_state = client.adapter_state()
            probe = random_batch(999, vocab, task=task, pad=pad, num_labels=num_labels)
            split_logits = client.predict(probe)
            folder = folder_root / f"adapter-{path.name}-{cut.front}-{cut.back}-{task}"
            client.save_adapter(folder)
        finally:
            client.close()

    rel = [abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)]
    print(f"{config_type(path)} ({path.name}) {task} cut {cut}: max relative loss difference {max(rel):.2e}")
    assert max(rel) <= 1e-5, (losses, ref_losses)
    assert losses[-1] < losses[0] or task == "classification"

    ref_state = adapter_state(ref)
    assert set(split_state) == set(ref_state)
    worst = max((split_state[n] - v).norm().item() / max(v.norm().item(), 1e-12) for n, v in ref_state.items())
    print(f"  largest relative LoRA weight difference {worst:.2e}")
    for name, value in ref_state.items():
        torch.testing.assert_close(split_state[name], value, rtol=1e-4, atol=1e-6, msg=name)
    # LoRA B moved away from zero: the comparison is not between untouched initial values.
    assert any(v.abs().sum() > 0 for k, v in split_state.items() if "lora_B" in k)

    # Invariant 6: the saved adapter loads with stock peft and gives the split model's outputs.
    config = load_config(path, task, num_labels, dropout=False)
    cls = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    loaded = PeftModel.from_pretrained(cls.from_pretrained(path, config=config), folder).eval()
    ref.eval()
    with torch.no_grad():
        peft_logits = loaded(**{k: v for k, v in probe.items() if k != "labels"}).logits
        ref_logits = ref(**{k: v for k, v in probe.items() if k != "labels"}).logits
    torch.testing.assert_close(split_logits, peft_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(peft_logits, ref_logits, rtol=1e-3, atol=1e-4)


def config_type(path) -> str:
    return AutoConfig.from_pretrained(path).model_type


def _pad(family):
    return 1 if family == "roberta" else 0


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_split_equals_monolithic(family, tiny_models, tmp_path):
    run_and_compare(tiny_models(family), "classification", Cut(1, 1), VOCAB, _pad(family), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("model_type, task", [("smollm3", "causal-lm"), ("gpt_bigcode", "classification")])
def test_detected_layout_split_equals_monolithic(model_type, task, tiny_models, tmp_path):
    assert model_type not in supported_types()  # the layout is read off the model
    cut = Cut(1, 2) if task == "causal-lm" else Cut(1, 1)
    run_and_compare(tiny_models(model_type, task), task, cut, VOCAB, 0, tmp_path)


@pytest.mark.slow
def test_legacy_layernorm_names_split_equals_monolithic(tiny_models, tmp_path):
    # The reference loads the legacy names through transformers' own renaming.
    legacy = rewrite_checkpoint(tiny_models("bert"), tmp_path / "legacy", legacy_layernorm_name)
    run_and_compare(legacy, "classification", Cut(1, 1), VOCAB, 0, tmp_path)


@pytest.mark.slow
def test_split_equals_monolithic_minilm(tmp_path):
    path = minilm_path()
    # The real checkpoint: 6 blocks, the client keeps 2 at the input side and 1 at the output.
    run_and_compare(path, "classification", Cut(2, 1), 30522, 0, tmp_path, num_labels=4)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_two_part_split_equals_monolithic(family, tiny_models, tmp_path):
    run_and_compare(tiny_models(family), "classification", Cut(1, 0), VOCAB, _pad(family), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("family", DECODERS)
def test_causal_lm_split_equals_monolithic(family, tiny_models, tmp_path):
    run_and_compare(tiny_models(family, "causal-lm"), "causal-lm", Cut(1, 2), VOCAB, 0, tmp_path)
