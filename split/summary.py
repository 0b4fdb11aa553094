"""Summary tables of round records (``split.records``): one row per round
for a client, one row per client for a server or a demo.

A row of ``rows`` is a round record with ``client`` and ``round`` (a line of
``clients.jsonl``). The functions here are pure: they build rich tables and
totals; the caller prints them.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich import box
from rich.table import Table

MB = 1e6


@dataclass
class ClientTotals:
    """A client's rounds added up."""

    client: str
    rounds: int = 0
    steps: int = 0
    loss: float | None = None  # of its last round
    accuracy: float | None = None  # the last it measured
    bytes_up: int = 0  # upload included
    bytes_down: int = 0
    compute_s: float = 0.0
    network_s: float = 0.0
    server_s: float = 0.0
    peak_rss: int = 0
    peak_uss: int = 0
    peak_cuda: int | None = None
    budget_bytes: int | None = None


def sent(row: dict) -> int:
    """Bytes a round sent: its traffic and its upload."""
    return row.get("bytes_up", 0) + row.get("upload_bytes", 0)


def client_totals(rows: list[dict]) -> dict[str, ClientTotals]:
    """Each client's rounds added up, clients in order of appearance, rounds in order."""
    out: dict[str, ClientTotals] = {}
    for row in sorted(rows, key=lambda r: r["round"]):
        t = out.setdefault(row["client"], ClientTotals(row["client"]))
        t.rounds += 1
        t.steps += row.get("steps", 0)
        t.loss = row.get("loss", t.loss)
        t.accuracy = row.get("accuracy", t.accuracy)
        t.bytes_up += sent(row)
        t.bytes_down += row.get("bytes_down", 0)
        t.compute_s += row.get("compute_s", 0.0)
        t.network_s += row.get("network_s", 0.0)
        t.server_s += row.get("server_s", 0.0)
        t.peak_rss = max(t.peak_rss, row.get("peak_rss", 0))
        t.peak_uss = max(t.peak_uss, row.get("peak_uss", 0))
        if "peak_cuda" in row:
            t.peak_cuda = max(t.peak_cuda or 0, row["peak_cuda"])
        t.budget_bytes = row.get("budget_bytes", t.budget_bytes)
    return dict(sorted(out.items()))


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _accuracy(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _table(title: str, columns: list[str]) -> Table:
    # No vertical rules: a table of nine columns still fits 80 characters.
    table = Table(title=title, box=box.SIMPLE_HEAD)
    for i, name in enumerate(columns):
        # A narrow terminal folds a cell onto two lines rather than cutting its numbers.
        table.add_column(name, justify="left" if i == 0 and name == "client" else "right", overflow="fold")
    return table


def client_table(rows: list[dict], title: str = "per client") -> Table:
    """One row per client: rounds, steps, last loss and accuracy, traffic,
    the steps' time split and peak memory (against the budget, when known)."""
    totals = client_totals(rows)
    cuda = any(t.peak_cuda is not None for t in totals.values())
    budget = any(t.budget_bytes is not None for t in totals.values())
    table = _table(title, ["client", "rounds", "steps", "last loss", "accuracy", "MB up/down",
                           "steps: compute/network/server s", "peak RSS/USS MB"]
                   + (["peak CUDA MB"] if cuda else []) + (["budget MB"] if budget else []))
    for t in totals.values():
        cells = [t.client, str(t.rounds), str(t.steps), _num(t.loss, ".3f"), _accuracy(t.accuracy),
                 f"{t.bytes_up / MB:.1f}/{t.bytes_down / MB:.1f}",
                 f"{t.compute_s:.1f}/{t.network_s:.1f}/{t.server_s:.1f}", f"{t.peak_rss / MB:.0f}/{t.peak_uss / MB:.0f}"]
        if cuda:
            cells.append(_num(None if t.peak_cuda is None else t.peak_cuda / MB, ".0f"))
        if budget:
            cells.append(_num(None if t.budget_bytes is None else t.budget_bytes / MB, ".0f"))
        table.add_row(*cells)
    return table


def round_table(rows: list[dict], title: str = "per round") -> Table:
    """One row per round of one client: loss, accuracy, time split, traffic, peak memory."""
    table = _table(title, ["round", "steps", "loss", "accuracy", "seconds", "steps: compute/network/server s",
                           "MB up/down", "peak RSS/USS MB"])
    for row in sorted(rows, key=lambda r: r["round"]):
        table.add_row(str(row["round"]), str(row.get("steps", 0)), _num(row.get("loss"), ".3f"),
                      _accuracy(row.get("accuracy")), f"{row.get('seconds', 0.0):.1f}",
                      f"{row.get('compute_s', 0.0):.1f}/{row.get('network_s', 0.0):.1f}/"
                      f"{row.get('server_s', 0.0):.1f}",
                      f"{sent(row) / MB:.2f}/{row.get('bytes_down', 0) / MB:.2f}",
                      f"{row.get('peak_rss', 0) / MB:.0f}/{row.get('peak_uss', 0) / MB:.0f}")
    return table
