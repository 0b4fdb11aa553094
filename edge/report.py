"""``fedsplit report RUN_DIR``: plots of a run folder's round records.

Reads ``clients.jsonl`` (``split.runfolder``; a server's folder holds every
client's rounds, a client's its own) and writes four PNGs:

- ``accuracy.png``: accuracy of the global model per round, per client that evaluated;
- ``bytes.png``: MB sent and received per client per round;
- ``memory.png``: each client's peak memory against its device budget;
- ``time.png``: each client's training time split into compute, network and server
  (for emulated devices, ``--emulate``: their compute and link as on the device,
  from the records' ``emulated_*`` keys, and the server's compute).

The file is input like any other: every line is checked (``split.records``)
and a bad one is an error naming the file and the line. matplotlib is an
optional dependency (the ``report`` extra): a device that only trains never
needs it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from split.json_files import parse_json_object
from split.records import RecordError, check_record
from split.runfolder import CLIENTS, STEPS
from split.summary import MB, client_totals, sent

EXAMPLE = "fedsplit report runs/federation --out plots"
PLOTS = ("accuracy.png", "bytes.png", "memory.png", "time.png")
MAX_CLIENT_ID = 200


class ReportError(ValueError):
    """A run folder that cannot be reported on; the text says what was expected."""


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``fedsplit report`` on the CLI's subparsers."""
    text = "plot a run folder's round records as PNGs"
    p = sub.add_parser("report", help=text, description=text[0].upper() + text[1:] + ": " + ", ".join(PLOTS) + ".",
                       epilog=f"example:\n  {EXAMPLE}", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR",
                   help="a folder given as --run-dir to `fedsplit server` (every client) or `fedsplit client`")
    p.add_argument("--out", default=None, metavar="DIR", help="where the PNGs go (default: RUN_DIR)")
    return p


def run(args) -> int:
    """``fedsplit report``: read, plot, say where the plots are."""
    rows = load_rows(args.run_dir)
    written = write_plots(rows, Path(args.out or args.run_dir))
    clients = len({r["client"] for r in rows})
    print(f"{len(rows)} round records of {clients} client{'s' * (clients != 1)}; wrote "
          + ", ".join(str(p) for p in written))
    return 0


def load_rows(run_dir: str | Path) -> list[dict]:
    """The round records of ``run_dir/clients.jsonl``, each checked; the last
    record of a client's round wins (a resumed run may redo a round)."""
    folder = Path(run_dir)
    if not folder.is_dir():
        raise ReportError(f"RUN_DIR {folder} is not a folder; give the folder passed as --run-dir to "
                          "`fedsplit server` or `fedsplit client`")
    path = folder / CLIENTS
    if not path.is_file():
        plain = " (its steps.jsonl is from plain split training, which has no rounds)" if (folder / STEPS).is_file() \
            else ""
        raise ReportError(f"{folder} holds no round records{plain}: expected {CLIENTS}, which `fedsplit server "
                          "--run-dir` and `fedsplit client --run-dir` write as the rounds of a federation finish")
    rows: dict[tuple[str, int], dict] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                row = parse_row(line, f"{path}:{number}")
                rows[(row["client"], row["round"])] = row
    if not rows:
        raise ReportError(f"{path} is empty: no round of this run finished")
    return list(rows.values())


def parse_row(line: str, where: str) -> dict:
    """One line of clients.jsonl: a JSON object with a client id, a round and a round record."""
    row = parse_json_object(line, ReportError, where)
    client, round_index = row.pop("client", None), row.pop("round", None)
    if not isinstance(client, str) or not 0 < len(client) <= MAX_CLIENT_ID:
        raise ReportError(f"{where}: 'client' must be a client id of 1 to {MAX_CLIENT_ID} characters")
    if isinstance(round_index, bool) or not isinstance(round_index, int) or round_index < 0:
        raise ReportError(f"{where}: 'round' must be an integer >= 0, got {round_index!r}")
    try:
        record = check_record(row)
    except RecordError as exc:
        raise ReportError(f"{where}: {exc}") from None
    return {"client": client, "round": round_index, **record}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ReportError("fedsplit report draws with matplotlib, which is not installed: "
                          "pip install 'fedsplit[report]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def write_plots(rows: list[dict], out: Path) -> list[Path]:
    """Write the four PNGs of ``rows`` into ``out``; returns their paths."""
    plt = _pyplot()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"--out {out}: cannot make the folder ({exc.strerror})") from None
    by_client: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda r: (r["client"], r["round"])):
        by_client.setdefault(row["client"], []).append(row)
    paths = []
    for name, draw in zip(PLOTS, (_accuracy, _bytes, _memory, _time)):
        fig = draw(plt, by_client)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(out / name)
    return paths


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True, color="0.3")
    ax.set_xticks([])
    ax.set_yticks([])


def _accuracy(plt, by_client: dict[str, list[dict]]):
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.set_title("Accuracy of the global model at each round's start")
    shown = 0
    for client, rows in by_client.items():
        points = [(r["round"], 100 * r["accuracy"]) for r in rows if "accuracy" in r]
        if points:
            ax.plot(*zip(*points), marker="o", label=client)
            shown += 1
    if not shown:
        _note(ax, "no client evaluated the global model\n(run a client with --eval-rounds)")
        return fig
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(title="evaluated by", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _integer_ticks(ax)
    return fig


def _unit(largest: float) -> tuple[float, str]:
    """A byte unit that keeps ``largest`` readable: (bytes per unit, label)."""
    for scale, name in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if largest >= scale:
            return scale, f"{name} (10^{len(str(int(scale))) - 1} bytes)"
    return 1.0, "bytes"


def _bytes(plt, by_client: dict[str, list[dict]]):
    fig, (up, down) = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    fig.suptitle("Traffic per client per round (frames on the wire, headers included)")
    rows_all = [r for rows in by_client.values() for r in rows]
    scale, unit = _unit(max(max(sent(r), r.get("bytes_down", 0)) for r in rows_all))
    for client, rows in by_client.items():
        rounds = [r["round"] for r in rows]
        up.plot(rounds, [sent(r) / scale for r in rows], marker="o", label=client)
        down.plot(rounds, [r.get("bytes_down", 0) / scale for r in rows], marker="o", label=client)
    for ax, what in ((up, "sent (steps and upload; evaluation aside)"),
                     (down, "received (download and steps; evaluation aside)")):
        ax.set_title(what)
        ax.set_xlabel("round")
        ax.set_ylabel(unit)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        _integer_ticks(ax)
    down.legend(title="client", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def _memory(plt, by_client: dict[str, list[dict]]):
    totals = client_totals([r for rows in by_client.values() for r in rows])
    names = list(totals)
    series = [("peak RSS", [totals[c].peak_rss for c in names]), ("peak USS", [totals[c].peak_uss for c in names])]
    if any(t.peak_cuda is not None for t in totals.values()):
        series.append(("peak CUDA", [totals[c].peak_cuda for c in names]))
    budgets = [(i, totals[c].budget_bytes) for i, c in enumerate(names) if totals[c].budget_bytes is not None]
    fig, ax = plt.subplots(figsize=(max(8.0, 1.4 * len(names) + 3.5), 4.6))
    ax.set_title("Peak memory per client (its largest round)"
                 + ("" if budgets else "\nno budget recorded: the clients ran without a device profile"))
    width = 0.8 / len(series)
    for k, (label, values) in enumerate(series):
        shown = [(i, v) for i, v in enumerate(values) if v is not None]  # no CUDA bar for a CPU client
        bars = ax.bar([i + (k - (len(series) - 1) / 2) * width for i, _ in shown], [v / MB for _, v in shown],
                      width, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize="x-small", padding=2)
    for n, (i, budget) in enumerate(budgets):
        ax.hlines(budget / MB, i - 0.45, i + 0.45, colors="red", linestyles="--", linewidth=2,
                  label="device budget" if n == 0 else None)
    over = {i for i, budget in budgets if totals[names[i]].peak_rss > budget}
    ax.set_xticks(range(len(names)), [f"{c}\nOVER BUDGET" if i in over else c for i, c in enumerate(names)])
    for i in over:
        ax.get_xticklabels()[i].set_color("red")
    ax.set_xlabel("client")
    ax.set_ylabel("MB (10^6 bytes)")
    peaks = [v / MB for _, values in series for v in values if v is not None] + [b / MB for _, b in budgets]
    ax.set_ylim(0, 1.15 * max(peaks + [1.0]))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


MEASURED = (("client compute", "compute_s", "tab:blue"),
            ("waiting: network and server queue", "network_s", "tab:orange"),
            ("server compute", "server_s", "tab:green"))
EMULATED = (("device compute", "emulated_compute_s", "tab:blue"), ("device link", "emulated_link_s", "tab:orange"),
            ("server compute", "server_s", "tab:green"))


def _time(plt, by_client: dict[str, list[dict]]):
    rows = [r for rows in by_client.values() for r in rows]
    totals = client_totals(rows)
    names = list(totals)
    fig, ax = plt.subplots(figsize=(max(9.0, 1.3 * len(names) + 5), 4.4))
    # Emulated devices: their wall-clock holds the dilation's sleeps, so their own figures say more.
    emulated = all("emulated_compute_s" in r for r in rows)
    ax.set_title("Where each emulated device's rounds spent their time (all rounds)" if emulated else
                 "Where each client's training steps spent their time (all rounds)")
    bottom = [0.0] * len(names)
    for label, key, color in EMULATED if emulated else MEASURED:
        values = [sum(r.get(key, 0.0) for r in by_client[c]) for c in names]
        ax.bar(names, values, 0.6, bottom=bottom, label=label, color=color)
        bottom = [b + v for b, v in zip(bottom, values)]
    for i, total in enumerate(bottom):
        ax.annotate(f"{total:.1f} s", (i, total), textcoords="offset points", xytext=(0, 3), ha="center",
                    fontsize="x-small")
    ax.set_xlabel("client")
    ax.set_ylabel("seconds")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def _integer_ticks(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
