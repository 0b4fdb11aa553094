"""Shared fixtures: tiny random models on disk, real server processes, batches."""

from __future__ import annotations

import contextlib
import shutil
import threading
from pathlib import Path

import pytest
import torch
import zmq
from safetensors.torch import load_file, save_file
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, BertConfig, DistilBertConfig,
                          ElectraConfig, Gemma2Config, Gemma3TextConfig, GemmaConfig, GPT2Config, GPTBigCodeConfig,
                          GPTNeoXConfig, LlamaConfig, MistralConfig, OPTConfig, Phi3Config, Qwen2Config, Qwen3Config,
                          RobertaConfig, SmolLM3Config)

from server.service import BackboneServer, ServerConfig
from split.launch import running_server
from split.partition import Cut, resolve_model_path
from split.transport import Connection
from split.wire import Message

FAMILIES = ("gpt2", "llama", "qwen2", "mistral", "bert", "roberta", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
            "gpt_neox", "opt", "distilbert", "electra")
DECODERS = ("gpt2", "llama", "qwen2", "mistral", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt_neox", "opt")
VOCAB = 96


def tiny_config(family: str, **overrides):
    """A 4-block, 32-wide random config of ``family``."""
    common = dict(vocab_size=VOCAB, num_labels=3)
    decoder = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                   eos_token_id=2, **common)
    encoder = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                   max_position_embeddings=72, **common)
    configs = {
        "gpt2": lambda: GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=64, pad_token_id=0,
                                   bos_token_id=1, eos_token_id=2, **common),
        "llama": lambda: LlamaConfig(**decoder),
        "qwen2": lambda: Qwen2Config(**decoder),
        "mistral": lambda: MistralConfig(**decoder, sliding_window=None),
        "bert": lambda: BertConfig(**encoder),
        "roberta": lambda: RobertaConfig(**encoder, pad_token_id=1),
        "qwen3": lambda: Qwen3Config(**decoder, head_dim=8),
        "gemma": lambda: GemmaConfig(**decoder, head_dim=8),
        "gemma2": lambda: Gemma2Config(**decoder, head_dim=8, sliding_window=8),
        # Two sliding-window layers and a global one, as in the real model.
        "gemma3_text": lambda: Gemma3TextConfig(**decoder, head_dim=8, sliding_window=8, sliding_window_pattern=3),
        "phi3": lambda: Phi3Config(**decoder),
        "gpt_neox": lambda: GPTNeoXConfig(**decoder),
        "opt": lambda: OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=4, num_attention_heads=4,
                                 max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=0,
                                 bos_token_id=1, eos_token_id=2, **common),
        "distilbert": lambda: DistilBertConfig(dim=32, hidden_dim=64, n_layers=4, n_heads=4,
                                               max_position_embeddings=72, **common),
        # A narrower embedding than the blocks, as ELECTRA-small has: the projection runs on the client.
        "electra": lambda: ElectraConfig(**encoder, embedding_size=16),
        # Model types with no entry in split.families: their layout is read off the model.
        "smollm3": lambda: SmolLM3Config(**decoder),
        "gpt_bigcode": lambda: GPTBigCodeConfig(n_embd=32, n_layer=4, n_head=4, n_positions=64, pad_token_id=0,
                                                bos_token_id=1, eos_token_id=2, **common),
    }
    config = configs[family]()
    for k, v in overrides.items():
        setattr(config, k, v)
    return config


def save_tiny(family: str, folder: Path, task: str = "classification", seed: int = 0, **overrides) -> Path:
    """Save a random-initialised tiny ``family`` model as safetensors."""
    cls = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    torch.manual_seed(seed)
    cls.from_config(tiny_config(family, **overrides)).save_pretrained(folder, safe_serialization=True)
    return folder


def rewrite_checkpoint(src: Path, dst: Path, rename) -> Path:
    """Copy a model folder with its tensors renamed by ``rename`` (None drops a tensor)."""
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    renamed = {rename(k): v for k, v in tensors.items() if rename(k) is not None}
    save_file(renamed, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def legacy_layernorm_name(name: str) -> str:
    """The pre-2019 name BERT checkpoints gave LayerNorm scales and shifts."""
    return name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """family -> folder of a tiny classification model (built on first use)."""
    cache: dict[tuple[str, str], Path] = {}

    def get(family: str, task: str = "classification") -> Path:
        key = (family, task)
        if key not in cache:
            cache[key] = save_tiny(family, tmp_path_factory.mktemp(f"{family}-{task}"), task)
        return cache[key]

    return get


def minilm_path() -> Path:
    return resolve_model_path(None)


def random_batch(seed: int, vocab: int, batch: int = 4, max_len: int = 12, num_labels: int = 3,
                 task: str = "classification", low: int = 3, pad: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded random token ids with varying lengths and labels."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max_len // 2, max_len + 1, (batch,), generator=gen)
    lengths[0] = max_len
    ids = torch.randint(low, vocab, (batch, max_len), generator=gen)
    mask = (torch.arange(max_len)[None, :] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, pad)
    if task == "classification":
        labels = torch.randint(0, num_labels, (batch,), generator=gen)
    else:
        labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@contextlib.contextmanager
def threaded_server(model, cut: str = "1,1", **config):
    """A ``BackboneServer`` in this process, serving from a thread on a free
    loopback port; yields (endpoint, server). For tests where a separate
    process is not the point (it saves the process start-up)."""
    server = BackboneServer(ServerConfig(model=str(model), cut=Cut.parse(cut), bind="tcp://127.0.0.1:*", **config))
    endpoint = server.bind()
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop.is_set,), kwargs={"poll_ms": 20}, daemon=True)
    thread.start()
    try:
        yield endpoint, server
    finally:
        stop.set()
        thread.join(10)
        server.close()


@contextlib.contextmanager
def server_process(model, cut: str = "1,1", *extra: str):
    """A real ``fedsplit server`` process on a free loopback port; yields its endpoint."""
    with running_server(model, cut, *extra) as endpoint:
        yield endpoint


def dealer(endpoint: str) -> zmq.Socket:
    """A raw DEALER socket connected to ``endpoint``, for sending frames no client would."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def status(endpoint: str) -> dict:
    conn = Connection(endpoint, "probe", timeout=10.0)
    try:
        return conn.request(Message("status")).meta
    finally:
        conn.close()


def save_tiny_with_tokenizer(family: str, folder: Path, task: str = "classification") -> Path:
    """A tiny ``family`` model with a real tokenizer beside it: the built-in
    MiniLM's (a BERT WordPiece vocabulary), the embedding sized to match."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    tok.save_pretrained(folder)
    return save_tiny(family, folder, task, vocab_size=len(tok))
