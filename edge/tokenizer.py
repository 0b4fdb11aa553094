"""The client's tokenizer, refused when it cannot be the model's.

A folder written by ``model.save_pretrained`` holds no tokenizer files, yet
``AutoTokenizer`` still builds one from the config alone: a BERT tokenizer with
its 5 special tokens, a GPT-2 one with 1. Every word then becomes [UNK] and
training runs at chance without an error. So a tokenizer folder must hold a
vocabulary file, and the loaded tokenizer must fit the model's embedding.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

# Files that carry a vocabulary. tokenizer_config.json and special_tokens_map.json
# alone carry none: with only those, transformers falls back to the tiny vocabulary above.
VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                    "vocab.json")


class TokenizerError(ValueError):
    """A tokenizer that cannot be used with the model; the message says what to do."""


def vocabulary_files(folder: Path) -> list[str]:
    """The vocabulary files present in ``folder``."""
    return [name for name in VOCABULARY_FILES if (folder / name).is_file()]


def load_tokenizer(source: str | Path, model_vocab_size: int, default: bool = False):
    """The tokenizer of ``source`` (a folder or a hub id), with a pad token
    (end-of-sequence where none is set). ``model_vocab_size`` is the model's
    embedding rows; ``default`` says ``source`` is the model folder because no
    --tokenizer was given (the error then says so)."""
    flag = "--model folder" if default else "--tokenizer"
    path = Path(source).expanduser()
    if path.is_dir() and not vocabulary_files(path):
        raise TokenizerError(
            f"{flag} {path} holds no tokenizer files (none of {', '.join(VOCABULARY_FILES)}); a folder written "
            "by model.save_pretrained has none, and a tokenizer built without them maps every word to "
            "[UNK]. Save the tokenizer into the folder (tokenizer.save_pretrained(folder)) or pass "
            "--tokenizer PATH_OR_HUB_ID")
    if path.is_file():
        raise TokenizerError(f"{flag} {path}: expected a tokenizer folder or hub id, got a file")
    try:
        tok = AutoTokenizer.from_pretrained(str(path) if path.is_dir() else str(source))
    except (OSError, ValueError, TypeError) as exc:
        raise TokenizerError(f"{flag} {source}: no tokenizer could be loaded ({type(exc).__name__}: "
                             f"{str(exc)[:300]})") from None
    check_fits(tok, model_vocab_size, source)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def check_fits(tok, model_vocab_size: int, source) -> None:
    """Refuse a tokenizer whose ids do not fit the model's embedding.

    The rule: every id must have an embedding row (len(tok) <= vocab_size, else
    the embedding lookup fails mid-run), and the tokenizer must cover at least
    half of the rows. Models round their embedding up for speed (Qwen2: 151,665
    tokens in 151,936 rows) and leave a few hundred rows unused at most; a
    fallback tokenizer covers a handful. Half separates the two by orders of
    magnitude on every family fedsplit supports.
    """
    size = len(tok)
    if size > model_vocab_size:
        raise TokenizerError(f"the tokenizer {source} has {size} tokens but the model's embedding has only "
                             f"{model_vocab_size} rows: it is not this model's tokenizer; pass the model's own "
                             "with --tokenizer")
    if size < model_vocab_size / 2:
        raise TokenizerError(f"the tokenizer {source} has {size} tokens for a model with {model_vocab_size}: it "
                             "is not this model's tokenizer (or a fallback built without vocabulary files); pass "
                             "the model's own with --tokenizer")
