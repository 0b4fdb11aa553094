"""Invariant 2: a side loads only what it owns. A fresh client process loading a
12-block model of over 400 MB must peak at under 1.5x the bytes it owns."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from split.launch import child_env

MEASURE = textwrap.dedent("""
    import json, sys
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from edge.meter import current_rss, peak_rss, reset_peak
    from split.partition import Cut, build_segment
    path = sys.argv[1]
    with init_empty_weights():  # import every module the load needs before measuring
        AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(path))
    exact = reset_peak()
    before_peak, before_rss = peak_rss(), current_rss()
    segment = build_segment(path, sys.argv[2], Cut(1, 1), num_labels=2)
    after_peak = peak_rss()
    base = before_rss if exact else before_peak
    print(json.dumps({"growth": after_peak - base, "owned": segment.owned_bytes,
                      "checkpoint": segment.checkpoint_bytes, "exact_reset": exact}))
""")


@pytest.fixture(scope="module")
def big_gpt2(tmp_path_factory):
    """A random 12-block, 1024-wide GPT-2 classifier saved as safetensors (~640 MB)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForSequenceClassification, GPT2Config

    folder = tmp_path_factory.mktemp("big-gpt2")
    config = GPT2Config(n_embd=1024, n_layer=12, n_head=16, n_positions=256, vocab_size=8192,
                        pad_token_id=0, num_labels=2)
    config.save_pretrained(folder)
    with init_empty_weights():
        skeleton = AutoModelForSequenceClassification.from_config(config)
    gen = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(p.shape, generator=gen) * 0.02 for name, p in skeleton.named_parameters()}
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("side", ["client", "server"])
def test_peak_memory_tracks_the_owned_share(big_gpt2, side):
    out = subprocess.run([sys.executable, "-c", MEASURE, str(big_gpt2), side], capture_output=True, text=True,
                         env=child_env(), timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = r["growth"] / r["owned"]
    print(f"{side} cut 1,1: checkpoint {r['checkpoint'] / 1e6:.0f} MB, owned {r['owned'] / 1e6:.0f} MB, "
          f"peak growth while loading {r['growth'] / 1e6:.0f} MB = {ratio:.2f}x owned, "
          f"{r['growth'] / r['checkpoint']:.2f}x the checkpoint")
    assert r["checkpoint"] > 400e6
    assert ratio < 1.5
    assert r["growth"] < 0.5 * r["checkpoint"] if side == "client" else r["growth"] < 0.95 * r["checkpoint"]
