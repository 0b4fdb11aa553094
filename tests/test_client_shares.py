"""Client shares of a dataset (non-IID partitioners)."""

from __future__ import annotations

from collections import Counter

import pytest

from edge.client_shares import client_shares, dirichlet, iid, label_table, shards

LABELS = [i % 5 for i in range(500)]


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_every_sample_goes_to_exactly_one_client_and_seeds_repeat(scheme):
    parts = client_shares(LABELS, 4, scheme, alpha=0.5, seed=3)
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(len(LABELS)))
    assert parts == client_shares(LABELS, 4, scheme, alpha=0.5, seed=3)
    assert parts != client_shares(LABELS, 4, scheme, alpha=0.5, seed=4)


def test_iid_is_even_and_balanced():
    parts = iid(LABELS, 4)
    assert sorted(len(p) for p in parts) == [125] * 4
    for p in parts:
        assert max(Counter(LABELS[i] for i in p).values()) < 40


def test_dirichlet_skew_grows_as_alpha_shrinks():
    def skew(alpha):
        parts = dirichlet(LABELS, 4, alpha, seed=0)
        return sum(max(Counter(LABELS[i] for i in p).values()) / len(p) for p in parts) / 4

    assert skew(0.1) > skew(1.0) > skew(100.0)
    assert skew(100.0) < 0.3  # near uniform over 5 labels


def test_shards_give_each_client_few_labels():
    parts = shards(LABELS, 5, shards_per_client=2, seed=0)
    assert all(len({LABELS[i] for i in p}) <= 2 for p in parts)


def test_errors_and_table():
    with pytest.raises(ValueError, match="alpha must be > 0"):
        dirichlet(LABELS, 4, 0.0)
    with pytest.raises(ValueError, match="cannot be split among"):
        iid([0, 1], 3)
    with pytest.raises(ValueError, match="unknown partition scheme"):
        client_shares(LABELS, 2, "zipf")
    table = label_table(LABELS, iid(LABELS, 2))
    assert table.row_count == 2 and len(table.columns) == 7
