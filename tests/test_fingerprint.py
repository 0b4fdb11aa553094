"""Checkpoint fingerprints (split/fingerprint.py): equal for the same weights
however they are stored, different for any change of weights or config."""

from __future__ import annotations

import json
import shutil

from safetensors.torch import load_file, save_file

from conftest import save_tiny
from split.fingerprint import checkpoint_fingerprint


def test_fingerprint_follows_weights_and_config_not_file_layout(tmp_path):
    base = save_tiny("llama", tmp_path / "base")
    print_ = checkpoint_fingerprint(base)
    tensors = load_file(base / "model.safetensors")

    # The same tensors in another order, and a config re-saved by another release.
    moved = tmp_path / "moved"
    shutil.copytree(base, moved)
    save_file(dict(reversed(list(tensors.items()))), moved / "model.safetensors")
    config = json.loads((moved / "config.json").read_text())
    config["transformers_version"] = "9.9.9"
    (moved / "config.json").write_text(json.dumps(config))
    assert checkpoint_fingerprint(moved) == print_

    # One element in the middle of one tensor changed.
    changed = tmp_path / "changed"
    shutil.copytree(base, changed)
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name].view(-1)[tensors[name].numel() // 2] += 1.0
    save_file(tensors, changed / "model.safetensors")
    assert checkpoint_fingerprint(changed) != print_

    # A config value that changes the model (here the norm epsilon).
    retuned = tmp_path / "retuned"
    shutil.copytree(base, retuned)
    config = json.loads((retuned / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (retuned / "config.json").write_text(json.dumps(config))
    assert checkpoint_fingerprint(retuned) != print_
