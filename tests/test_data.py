"""Built-in data and user files."""

from __future__ import annotations

from collections import Counter

import pytest

from edge.data import (DataError, collate, load_dataset, load_records, split_train_test, stdlib_docstrings)


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


def test_unknown_test_label_is_an_error(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    (tmp_path / "test.jsonl").write_text('{"text": "c", "label": "z"}\n')
    with pytest.raises(DataError, match=r"labels the training data never shows: \['z'\]"):
        load_dataset(str(tmp_path / "train.jsonl"), str(tmp_path / "test.jsonl"))


def test_collate_pads_to_the_longest_in_the_batch_only():
    batch = collate([[5, 6, 7], [8]], [0, 1], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [0, 1]
