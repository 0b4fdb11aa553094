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
import io
import json
import os
import random
import sys
import sysconfig
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

MIN_DOCSTRING = 40
NUM_CLASSES = 10
_SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages"}


@dataclass(frozen=True)
class Sample:
    text: str
    label: str
    # "file:line" of a sample read from a user file, for error messages; not part of its identity.
    where: str = field(default="", compare=False, repr=False)


class DataError(ValueError):
    """Bad user data: the message says which file, which line and what to fix."""


# ---------------------------------------------------------------- user files


def read_text(path: Path) -> str:
    """A data file's text: UTF-8, with or without a byte-order mark (Excel's
    "CSV UTF-8" and PowerShell write one). Other encodings are refused with the
    line of the first byte that is not UTF-8."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} cannot be decoded; the file "
                        "is probably Latin-1 or Windows-1252): re-save it as UTF-8, e.g. 'CSV UTF-8' in Excel or "
                        "encoding UTF-8 in your editor") from None


def _rows(path: Path, fields: tuple[str, ...]) -> list[tuple[int, dict]]:
    """(line number, row) of each record of a JSONL or CSV file, each with the
    non-empty ``fields``."""
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: a folder, not a data file")
    wanted = " and ".join(repr(f) for f in fields)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = []
        for lineno, line in enumerate(read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: each line must be a JSON object with {wanted}")
            rows.append((lineno, row))
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
        rows = []
        for row in reader:
            rows.append((reader.line_num, row))
        found = reader.fieldnames or []
        missing = [k for k in fields if k not in found]
        if rows and missing:
            raise DataError(f"{path}: the CSV header has no {' or '.join(missing)} column (found: {found})")
    else:
        raise DataError(f"{path}: unknown format {suffix!r}; use .jsonl or .csv with {wanted} fields")
    if not rows:
        raise DataError(f"{path}: the file holds no samples")
    for lineno, row in rows:
        for key in fields:
            if row.get(key) in (None, ""):
                raise DataError(f"{path}:{lineno}: missing field {key!r}")
    return rows


def load_records(path: str | Path) -> list[Sample]:
    """Samples from a JSONL or CSV file with ``text`` and ``label`` fields."""
    path = Path(path)
    return [Sample(str(row["text"]), str(row["label"]), f"{path}:{lineno}")
            for lineno, row in _rows(path, ("text", "label"))]


def load_texts(path: str | Path) -> list[str]:
    """Texts from a JSONL or CSV file with a ``text`` field (language modelling;
    other fields are ignored)."""
    return [str(row["text"]) for _, row in _rows(Path(path), ("text",))]


def load_inputs(path: str | Path) -> list[Sample | str]:
    """Texts to classify from a JSONL or CSV file with a ``text`` field: a
    ``Sample`` per record where the file gives labels, else the text. A label
    on some records only is refused (an accuracy over part of a file would
    read as the whole file's)."""
    path = Path(path)
    rows = _rows(path, ("text",))
    labelled = [row.get("label") not in (None, "") for _, row in rows]
    if any(labelled) and not all(labelled):
        lineno = rows[labelled.index(False)][0]
        raise DataError(f"{path}:{lineno}: no 'label', while other records have one; label every record or none")
    if not any(labelled):
        return [str(row["text"]) for _, row in rows]
    return [Sample(str(row["text"]), str(row["label"]), f"{path}:{lineno}") for lineno, row in rows]


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
    tmp.write_text("".join(json.dumps({"text": s.text, "label": s.label}) + "\n" for s in samples),
                   encoding="utf-8")
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
    held_out_from: str | None = None  # the test split was held out of this source (None: a test file)

    def label_id(self, label: str) -> int:
        return self.labels.index(label)


BUILTIN = "the built-in task"


def load_dataset(data: str | None, test_data: str | None = None, test_fraction: float = 0.2,
                 seed: int = 0) -> Dataset:
    """``data`` None or "builtin": the stdlib task. Otherwise a JSONL/CSV file,
    split by ``test_fraction`` unless ``test_data`` names the test file."""
    held_out_from = None
    if data in (None, "", "builtin"):
        if test_data:
            raise DataError("--test-data needs --data: the built-in task brings its own test split")
        train, test = split_train_test(stdlib_docstrings(), test_fraction, seed)
        held_out_from = BUILTIN
    else:
        samples = load_records(data)
        if test_data:
            train, test = samples, load_records(test_data)
        else:
            train, test = split_train_test(samples, test_fraction, seed)
            held_out_from = str(data)
            if not train or not test:
                raise DataError(f"{data}: {len(samples)} samples are too few to hold out {test_fraction:.0%} of "
                                "each label for evaluation; add samples or give --test-data")
    labels = sorted({s.label for s in train})
    unseen = [s for s in test if s.label not in set(labels)]
    if unseen:
        names = sorted({s.label for s in unseen})
        raise DataError(f"{unseen[0].where or test_data}: test label {unseen[0].label!r} never appears in the "
                        f"training data {data}; the test data has labels the training data never shows: "
                        f"{names[:5]}; add training samples for them or drop them from {test_data}")
    if len(labels) < 2:
        raise DataError(f"{data}: classification needs at least two labels, the training data has {labels}")
    return Dataset(train, test, labels, held_out_from)


@dataclass
class TextDataset:
    """Texts for language modelling: a train/test pair."""

    train: list[str]
    test: list[str]
    held_out_from: str | None = None  # the test split was held out of this source (None: a test file)


def load_text_dataset(data: str | None, test_data: str | None = None, test_fraction: float = 0.2,
                      seed: int = 0) -> TextDataset:
    """Texts of a JSONL/CSV file with a ``text`` field, split by
    ``test_fraction`` (seeded) unless ``test_data`` names the test file."""
    if data in (None, "", "builtin"):
        raise DataError("--task causal-lm needs --data: a JSONL or CSV file with a 'text' field (the built-in "
                        "task is classification only)")
    texts = load_texts(data)
    if test_data:
        return TextDataset(texts, load_texts(test_data))
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_test = round(len(texts) * test_fraction)
    if n_test == 0 or n_test == len(texts):
        raise DataError(f"{data}: {len(texts)} texts are too few to hold out {test_fraction:.0%} for evaluation; "
                        "add texts or give --test-data")
    test = [texts[i] for i in order[:n_test]]
    train = [texts[i] for i in order[n_test:]]
    return TextDataset(train, test, str(data))


# ---------------------------------------------------------------- batching


class Batches:
    """Tokenised samples served as padded batches (padded to the longest
    sequence of each batch, never further)."""

    def __init__(self, samples: list[Sample], dataset: Dataset, tokenizer, max_length: int,
                 batch_size: int, shuffle: bool, seed: int = 0):
        self._tokenise([s.text for s in samples], tokenizer, max_length, batch_size, shuffle, seed)
        self.labels = [dataset.label_id(s.label) for s in samples]

    def _tokenise(self, texts: list[str], tokenizer, max_length: int, batch_size: int, shuffle: bool,
                  seed: int) -> None:
        if not texts:
            raise DataError("no samples to batch: a training or test split is empty; add data or give --test-data")
        self.ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
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
            yield self._collate(order[start:start + self.batch_size])

    def _collate(self, rows: list[int]) -> dict[str, torch.Tensor]:
        return collate([self.ids[i] for i in rows], [self.labels[i] for i in rows], self.pad_id)


def pad_batch(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids right-padded to the batch's longest sequence, and the attention mask."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return input_ids, mask


def collate(ids: list[list[int]], labels: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest sequence."""
    input_ids, mask = pad_batch(ids, pad_id)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor(labels, dtype=torch.long)}

