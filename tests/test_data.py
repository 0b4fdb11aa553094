"""Built-in data and user files."""

from __future__ import annotations

from collections import Counter

import pytest

from edge.data import (DataError, collate, load_dataset, load_records, load_text_dataset, load_texts,
                       split_train_test, stdlib_docstrings)
from edge.lm import collate_lm


def test_builtin_task_is_ten_stdlib_packages_and_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSPLIT_CACHE", str(tmp_path))
    fresh = stdlib_docstrings()
    assert list(tmp_path.glob("stdlib-docstrings-*.jsonl")), "the built set is cached on disk"
    cached = stdlib_docstrings()
    assert fresh == cached
    counts = Counter(s.label for s in fresh)
    assert len(counts) == 10 and len(fresh) >= 2000
    assert all(len(s.text) >= 40 for s in fresh)
    assert "test" not in counts
    a = load_dataset(None, seed=1)
    b = load_dataset(None, seed=1)
    c = load_dataset(None, seed=2)
    assert a.train == b.train and a.test == b.test and a.train != c.train
    assert not {s.text for s in a.train} & {s.text for s in a.test}
    assert abs(len(a.test) / len(fresh) - 0.2) < 0.01


def test_stratified_split_keeps_every_label_in_both_parts():
    from edge.data import Sample

    samples = [Sample(f"text {i}", "ab"[i % 2]) for i in range(50)]
    train, test = split_train_test(samples, 0.2, seed=0)
    assert Counter(s.label for s in test) == {"a": 5, "b": 5}
    assert len(train) == 40


def test_jsonl_and_csv(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "hello", "label": "x"}\n\n{"text": "bye", "label": 2}\n')
    (tmp_path / "d.csv").write_text("text,label\nhello,x\n\"a, b\",y\n")
    assert [(s.text, s.label) for s in load_records(tmp_path / "d.jsonl")] == [("hello", "x"), ("bye", "2")]
    assert [(s.text, s.label) for s in load_records(tmp_path / "d.csv")] == [("hello", "x"), ("a, b", "y")]


@pytest.mark.parametrize("name, content, message", [
    ("e.jsonl", "", "holds no samples"),
    ("m.jsonl", '{"text": "hi"}\n', "m.jsonl:1: missing field 'label'"),
    ("b.jsonl", '{"text": "hi", "label": "a"}\n{oops\n', "b.jsonl:2: not valid JSON"),
    ("l.jsonl", '[1, 2]\n', "must be a JSON object"),
    ("c.csv", "body,label\nhi,a\n", "no text column"),
    ("e.csv", "", "holds no samples"),
    ("d.txt", "hi", "unknown format"),
])
def test_bad_files_say_what_is_wrong(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=None) as info:
        load_records(tmp_path / name)
    assert message in str(info.value)


def test_unknown_test_label_is_an_error_naming_the_file_and_line(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    (tmp_path / "test.jsonl").write_text('{"text": "c", "label": "x"}\n\n{"text": "d", "label": "z"}\n')
    with pytest.raises(DataError, match=r"labels the training data never shows: \['z'\]") as info:
        load_dataset(str(tmp_path / "train.jsonl"), str(tmp_path / "test.jsonl"))
    assert str(info.value).startswith(f"{tmp_path / 'test.jsonl'}:3: test label 'z'")


def test_byte_order_mark_is_accepted(tmp_path):
    # Excel's "CSV UTF-8" and PowerShell's Out-File write a UTF-8 byte-order mark.
    (tmp_path / "d.csv").write_bytes("text,label\ncafé,x\n".encode("utf-8-sig"))
    (tmp_path / "d.jsonl").write_bytes('{"text": "café", "label": "x"}\n'.encode("utf-8-sig"))
    assert [(s.text, s.label) for s in load_records(tmp_path / "d.csv")] == [("café", "x")]
    assert [(s.text, s.label) for s in load_records(tmp_path / "d.jsonl")] == [("café", "x")]


@pytest.mark.parametrize("name, content, line", [
    ("latin.csv", "text,label\nfine,x\ncaf\u00e9,y\n", 3),
    ("latin.jsonl", '{"text": "fine", "label": "x"}\n{"text": "caf\u00e9", "label": "y"}\n', 2),
])
def test_latin1_file_names_file_line_and_fix(tmp_path, name, content, line):
    (tmp_path / name).write_bytes(content.encode("latin-1"))
    with pytest.raises(DataError) as info:
        load_records(tmp_path / name)
    assert str(info.value).startswith(f"{tmp_path / name}:{line}: not UTF-8 text")
    assert "re-save it as UTF-8" in str(info.value)


def test_held_out_split_is_recorded_and_a_test_file_is_not(tmp_path):
    lines = "".join(f'{{"text": "t{i}", "label": "{"ab"[i % 2]}"}}\n' for i in range(10))
    (tmp_path / "d.jsonl").write_text(lines)
    held = load_dataset(str(tmp_path / "d.jsonl"))
    assert held.held_out_from == str(tmp_path / "d.jsonl") and len(held.test) == 2
    assert load_dataset(str(tmp_path / "d.jsonl"), str(tmp_path / "d.jsonl")).held_out_from is None


def test_test_data_without_data_is_an_error():
    with pytest.raises(DataError, match="--test-data needs --data"):
        load_dataset(None, "test.jsonl")


def test_texts_for_language_modelling(tmp_path):
    (tmp_path / "t.jsonl").write_text("".join(f'{{"text": "line {i}"}}\n' for i in range(10)))
    (tmp_path / "t.csv").write_text("text\nhello\nworld\n")
    assert load_texts(tmp_path / "t.csv") == ["hello", "world"]
    data = load_text_dataset(str(tmp_path / "t.jsonl"), seed=0)
    assert len(data.test) == 2 and sorted(data.train + data.test) == sorted(f"line {i}" for i in range(10))
    assert data.held_out_from == str(tmp_path / "t.jsonl")
    with pytest.raises(DataError, match="--task causal-lm needs --data"):
        load_text_dataset(None)
    (tmp_path / "n.jsonl").write_text('{"label": "x"}\n')
    with pytest.raises(DataError, match="n.jsonl:1: missing field 'text'"):
        load_texts(tmp_path / "n.jsonl")


def test_language_model_batches_mask_padding_in_the_labels():
    batch = collate_lm([[5, 6, 7], [8]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_collate_pads_to_the_longest_in_the_batch_only():
    batch = collate([[5, 6, 7], [8]], [0, 1], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [0, 1]


def test_too_little_data_to_hold_out_a_test_split_is_an_error_naming_the_file(tmp_path):
    # Two samples per label: 20% of each rounds to none, which left an empty test set.
    path = tmp_path / "tiny.csv"
    path.write_text("text,label\nhello there,a\nbye now,b\nsee you,a\nciao,b\n")
    with pytest.raises(DataError, match=r"tiny.csv: 4 samples are too few to hold out 20%.*--test-data"):
        load_dataset(str(path))
