"""Data for clients: JSONL/CSV loaders, the built-in stdlib-docstring task, batching.

The built-in task is text classification over the Python standard library that
came with the interpreter: a sample is a class or function docstring of at
least 40 characters, its label the stdlib package the source file belongs to,
and the classes are the ten packages with the most such docstrings (test
suites left out). Sources are parsed with ``ast``, never imported, so no module
runs code or prints while the set is built.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import os
import random
import sys
import sysconfig
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

MIN_DOCSTRING = 40
NUM_CLASSES = 10
_SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages"}


@dataclass(frozen=True)
class Sample:
    text: str
    label: str


class DataError(ValueError):
    """Bad user data: the message says which file, which line and what to fix."""


# ---------------------------------------------------------------- user files


def load_records(path: str | Path) -> list[Sample]:
    """Samples from a JSONL or CSV file with ``text`` and ``label`` fields."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: each line must be a JSON object with 'text' and 'label'")
            rows.append((lineno, row))
    elif suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = [(i, row) for i, row in enumerate(reader, 2)]
            fields = reader.fieldnames or []
        missing = [k for k in ("text", "label") if k not in fields]
        if rows and missing:
            raise DataError(f"{path}: the CSV header has no {' or '.join(missing)} column (found: {fields})")
    else:
        raise DataError(f"{path}: unknown format {suffix!r}; use .jsonl or .csv with 'text' and 'label' fields")
    if not rows:
        raise DataError(f"{path}: the file holds no samples")
    samples = []
    for lineno, row in rows:
        for key in ("text", "label"):
            if row.get(key) in (None, ""):
                raise DataError(f"{path}:{lineno}: missing field {key!r}")
        samples.append(Sample(str(row["text"]), str(row["label"])))
    return samples


# ---------------------------------------------------------------- built-in task


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _docstrings(file: Path) -> list[str]:
    try:
        tree = ast.parse(file.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = " ".join((ast.get_docstring(node) or "").split())
            if len(doc) >= MIN_DOCSTRING:
                out.append(doc)
    return out


def build_stdlib_docstrings(root: Path | None = None) -> list[Sample]:
    """All samples of the built-in task, in a fixed order."""
    root = root or _stdlib_root()
    by_package: dict[str, list[str]] = defaultdict(list)
    for package in sorted(p for p in root.iterdir() if p.is_dir() and (p / "__init__.py").exists()):
        if package.name in _SKIP_DIRS:
            continue
        for dirpath, dirnames, filenames in os.walk(package):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
            for name in sorted(filenames):
                if name.endswith(".py"):
                    by_package[package.name].extend(_docstrings(Path(dirpath) / name))
    # Docstrings repeated verbatim (inherited boilerplate) are kept once, and
    # dropped altogether when two packages share them.
    owners: dict[str, set[str]] = defaultdict(set)
    for package, docs in by_package.items():
        for doc in docs:
            owners[doc].add(package)
    sizes = Counter({p: len({d for d in docs if len(owners[d]) == 1}) for p, docs in by_package.items()})
    top = sorted(sizes, key=lambda p: (-sizes[p], p))[:NUM_CLASSES]
    samples, seen = [], set()
    for package in sorted(top):
        for doc in by_package[package]:
            if len(owners[doc]) == 1 and doc not in seen:
                seen.add(doc)
                samples.append(Sample(doc, package))
    return samples


def cache_dir() -> Path:
    """Where fedsplit caches built data (``FEDSPLIT_CACHE`` overrides)."""
    return Path(os.environ.get("FEDSPLIT_CACHE", Path.home() / ".cache" / "fedsplit"))


def stdlib_docstrings() -> list[Sample]:
    """The built-in task, built once per interpreter and cached as JSONL."""
    root = _stdlib_root()
    key = hashlib.sha256(f"{sys.version}|{root}|{MIN_DOCSTRING}|{NUM_CLASSES}".encode()).hexdigest()[:12]
    path = cache_dir() / f"stdlib-docstrings-{key}.jsonl"
    if path.exists():
        return [Sample(**json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines()]
    samples = build_stdlib_docstrings(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(s.__dict__) + "\n" for s in samples), encoding="utf-8")
    tmp.replace(path)
    return samples


def split_train_test(samples: list[Sample], test_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """A stratified, seeded split: each label contributes ``test_fraction`` of its samples."""
    by_label: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_label[s.label].append(s)
    rng = random.Random(seed)
    train, test = [], []
    for label in sorted(by_label):
        group = by_label[label][:]
        rng.shuffle(group)
        n_test = round(len(group) * test_fraction)
        test += group[:n_test]
        train += group[n_test:]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


@dataclass
class Dataset:
    """A labelled train/test pair with its label vocabulary."""

    train: list[Sample]
    test: list[Sample]
    labels: list[str]

    def label_id(self, label: str) -> int:
        return self.labels.index(label)


def load_dataset(data: str | None, test_data: str | None = None, test_fraction: float = 0.2,
                 seed: int = 0) -> Dataset:
    """``data`` None or "builtin": the stdlib task. Otherwise a JSONL/CSV file,
    split by ``test_fraction`` unless ``test_data`` names the test file."""
    if data in (None, "", "builtin"):
        train, test = split_train_test(stdlib_docstrings(), test_fraction, seed)
    else:
        samples = load_records(data)
        if test_data:
            train, test = samples, load_records(test_data)
        else:
            train, test = split_train_test(samples, test_fraction, seed)
    labels = sorted({s.label for s in train})
    unknown = sorted({s.label for s in test} - set(labels))
    if unknown:
        raise DataError(f"the test split has labels the training data never shows: {unknown[:5]}; "
                        "add training samples for them or drop them from the test data")
    if len(labels) < 2:
        raise DataError(f"classification needs at least two labels, the training data has {labels}")
    return Dataset(train, test, labels)


# ---------------------------------------------------------------- batching


class Batches:
    """Tokenised samples served as padded batches (padded to the longest
    sequence of each batch, never further)."""

    def __init__(self, samples: list[Sample], dataset: Dataset, tokenizer, max_length: int,
                 batch_size: int, shuffle: bool, seed: int = 0):
        enc = tokenizer([s.text for s in samples], truncation=True, max_length=max_length)
        self.ids = enc["input_ids"]
        self.labels = [dataset.label_id(s.label) for s in samples]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return (len(self.ids) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        return self._batches(self.rng if self.shuffle else None)

    def epoch(self, seed: int):
        """One pass in an order fixed by ``seed`` alone (not by earlier passes)."""
        return self._batches(random.Random(seed))

    def _batches(self, rng: random.Random | None):
        order = list(range(len(self.ids)))
        if rng is not None:
            rng.shuffle(order)
        for start in range(0, len(order), self.batch_size):
            yield collate([self.ids[i] for i in order[start:start + self.batch_size]],
                          [self.labels[i] for i in order[start:start + self.batch_size]], self.pad_id)


def collate(ids: list[list[int]], labels: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest sequence."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor(labels, dtype=torch.long)}


def load_tokenizer(model_path: Path):
    """The model's tokenizer, with a pad token (end-of-sequence where none is set)."""
    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
