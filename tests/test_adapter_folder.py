"""The adapter folder a client saves names its labels and holds its tokenizer,
and the README's loading snippet runs on it as written and agrees with the
split model."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from conftest import threaded_server
from edge.client import ClientConfig, SplitClient
from edge.data import Batches, load_dataset
from edge.tokenizer import load_tokenizer
from split.launch import ROOT, child_env
from split.partition import resolve_model_path


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- adapter-snippet -->\n```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its adapter loading snippet"
    return match.group(1)


@pytest.mark.slow
def test_saved_adapter_names_its_labels_and_the_readme_snippet_loads_it(tmp_path):
    rows = [{"text": f"{w} is a {kind} word", "label": kind}
            for kind, words in (("zebra", ["red", "blue", "teal"]), ("apple", ["fig", "pear", "plum"]),
                                ("mango", ["oak", "elm", "ash"]))
            for w in words]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = load_dataset(str(data), str(data), seed=0)
    tokenizer = load_tokenizer(resolve_model_path(None), 30522)
    batch = next(iter(Batches(dataset.train, dataset, tokenizer, 16, 9, False)))
    with threaded_server(resolve_model_path(None), "1,1", num_labels=3) as (endpoint, _):
        client = SplitClient(ClientConfig(server=endpoint, num_labels=3, lr=5e-3))
        try:
            for _ in range(3):
                client.train_step(batch)
            split_logits = client.predict(batch)
            client.save_adapter(tmp_path / "my-adapter", labels=dataset.labels, tokenizer=tokenizer)
        finally:
            client.close()

    config = json.loads((tmp_path / "my-adapter" / "config.json").read_text())
    assert config["id2label"] == {str(i): name for i, name in enumerate(dataset.labels)}
    assert config["label2id"] == {name: i for i, name in enumerate(dataset.labels)}
    assert (tmp_path / "my-adapter" / "tokenizer_config.json").exists()

    # The snippet as written, then the same model's logits on the batch.
    check = readme_snippet() + (
        "import torch\n"
        f"batch = torch.load({str(tmp_path / 'batch.pt')!r})\n"
        "with torch.no_grad():\n"
        "    out = model(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).logits\n"
        f"torch.save(out, {str(tmp_path / 'peft_logits.pt')!r})\n")
    torch.save(batch, tmp_path / "batch.pt")
    run = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True,
                         env=child_env(), timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() in dataset.labels
    torch.testing.assert_close(torch.load(tmp_path / "peft_logits.pt"), split_logits, rtol=1e-4, atol=1e-5)
