"""Each client's share of a labelled dataset: IID, Dirichlet or shard splits
(the non-IID settings of federated-learning experiments).

All are deterministic for a seed (a private ``random.Random``) and return, per
client, the sorted indices of its samples.
"""

from __future__ import annotations

import random
from collections import Counter

from rich.table import Table


def _check(labels: list, clients: int) -> None:
    if clients < 1:
        raise ValueError(f"need at least one client, got {clients}")
    if len(labels) < clients:
        raise ValueError(f"{len(labels)} samples cannot be split among {clients} clients")


def iid(labels: list, clients: int, seed: int = 0) -> list[list[int]]:
    """A shuffled, even split (sizes differ by at most one)."""
    _check(labels, clients)
    order = list(range(len(labels)))
    random.Random(seed).shuffle(order)
    return [sorted(order[k::clients]) for k in range(clients)]


def dirichlet(labels: list, clients: int, alpha: float, seed: int = 0, min_size: int = 1) -> list[list[int]]:
    """Per label, client shares drawn from Dirichlet(alpha): small alpha, strong skew.

    Draws again (up to 100 times, from the same stream) until every client has
    at least ``min_size`` samples.
    """
    _check(labels, clients)
    if alpha <= 0:
        raise ValueError(f"Dirichlet alpha must be > 0, got {alpha}")
    rng = random.Random(seed)
    by_label: dict = {}
    for i, y in enumerate(labels):
        by_label.setdefault(y, []).append(i)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for y in sorted(by_label, key=str):
            idx = by_label[y][:]
            rng.shuffle(idx)
            draws = [rng.gammavariate(alpha, 1.0) for _ in range(clients)]
            total = sum(draws)
            start, acc = 0, 0.0
            for k in range(clients):
                acc += draws[k] / total
                end = len(idx) if k == clients - 1 else round(acc * len(idx))
                parts[k] += idx[start:end]
                start = end
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise ValueError(f"could not give each of {clients} clients {min_size} samples with alpha={alpha}; "
                     "raise alpha or use fewer clients")


def shards(labels: list, clients: int, shards_per_client: int = 2, seed: int = 0) -> list[list[int]]:
    """Sort by label, cut into clients x shards_per_client shards, deal them at random."""
    _check(labels, clients)
    n = clients * shards_per_client
    if n > len(labels):
        raise ValueError(f"{n} shards need at least {n} samples, the data has {len(labels)}")
    order = sorted(range(len(labels)), key=lambda i: (str(labels[i]), i))
    bounds = [round(j * len(order) / n) for j in range(n + 1)]
    pieces = [order[bounds[j]:bounds[j + 1]] for j in range(n)]
    deal = list(range(n))
    random.Random(seed).shuffle(deal)
    return [sorted(i for j in deal[k * shards_per_client:(k + 1) * shards_per_client] for i in pieces[j])
            for k in range(clients)]


def client_shares(labels: list, clients: int, scheme: str = "dirichlet", alpha: float = 0.5, seed: int = 0,
                  shards_per_client: int = 2) -> list[list[int]]:
    """Dispatch on ``scheme``: "iid", "dirichlet" or "shards"."""
    if scheme == "iid":
        return iid(labels, clients, seed)
    if scheme == "dirichlet":
        return dirichlet(labels, clients, alpha, seed)
    if scheme == "shards":
        return shards(labels, clients, shards_per_client, seed)
    raise ValueError(f"unknown partition scheme {scheme!r}: use iid, dirichlet or shards")


def label_table(labels: list, parts: list[list[int]]):
    """A rich Table of each client's label counts."""
    names = sorted({labels[i] for p in parts for i in p}, key=str)
    table = Table(title="samples per client and label")
    table.add_column("client")
    for name in names:
        table.add_column(str(name), justify="right")
    table.add_column("total", justify="right")
    for k, part in enumerate(parts):
        counts = Counter(labels[i] for i in part)
        table.add_row(str(k), *[str(counts.get(n, 0)) for n in names], str(len(part)))
    return table
