"""The client's tokenizer: a model folder without one is refused, not silently
replaced by a fallback vocabulary of [UNK]s."""

from __future__ import annotations

import pytest
from conftest import save_tiny, save_tiny_with_tokenizer
from edge.tokenizer import TokenizerError, load_tokenizer
from split.cli import main
from split.launch import free_port


@pytest.fixture(scope="module")
def bare_model(tmp_path_factory):
    """What model.save_pretrained writes: config and weights, no tokenizer."""
    return save_tiny("bert", tmp_path_factory.mktemp("bare"), vocab_size=30522)


@pytest.fixture(scope="module")
def model_with_tokenizer(tmp_path_factory):
    return save_tiny_with_tokenizer("bert", tmp_path_factory.mktemp("tokenized"))


def test_a_folder_without_tokenizer_files_is_refused(bare_model):
    with pytest.raises(TokenizerError, match="holds no tokenizer files") as info:
        load_tokenizer(bare_model, 30522, default=True)
    assert f"--model folder {bare_model}" in str(info.value) and "--tokenizer" in str(info.value)


def test_a_folder_with_a_tokenizer_loads_it(model_with_tokenizer):
    tok = load_tokenizer(model_with_tokenizer, 30522)
    assert len(tok) == 30522
    assert tok.unk_token_id not in tok("the river bank")["input_ids"]


def test_a_tiny_fallback_vocabulary_is_refused(tmp_path):
    # The vocabulary a BERT tokenizer falls back to: its five special tokens.
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizer"}')
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    with pytest.raises(TokenizerError, match="has 5 tokens for a model with 30522"):
        load_tokenizer(tmp_path, 30522)


def test_a_tokenizer_larger_than_the_embedding_is_refused(model_with_tokenizer):
    with pytest.raises(TokenizerError, match="30522 tokens but the model's embedding has only 96 rows"):
        load_tokenizer(model_with_tokenizer, 96)


def test_client_refuses_a_model_folder_without_tokenizer(bare_model, capsys):
    code = main(["client", "--model", str(bare_model), "--server", f"tcp://127.0.0.1:{free_port()}",
                 "--connect-timeout", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fedsplit client: error: --model folder {bare_model} holds no tokenizer files")


def test_client_takes_the_tokenizer_from_tokenizer_option(bare_model, model_with_tokenizer, capsys):
    # The tokenizer is accepted, so the client goes on to the server, which is absent here.
    code = main(["client", "--model", str(bare_model), "--tokenizer", str(model_with_tokenizer),
                 "--server", f"tcp://127.0.0.1:{free_port()}", "--connect-timeout", "1"])
    assert code == 2
    assert "no answer from the server" in capsys.readouterr().err
