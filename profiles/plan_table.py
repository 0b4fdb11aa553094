"""The plan as a table: one row per device, its choices and predictions."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .planfile import PlanFile

GIB = 1 << 30
WIDE = 160  # columns when the output is not a terminal (a file, a pipe): rows stay whole


def blocks_text(trainable: list[int]) -> str:
    """``[1, 2, 3, 5]`` -> ``"1-3,5"``."""
    runs, start = [], None
    for i, b in enumerate(trainable):
        if start is None:
            start = b
        if i + 1 == len(trainable) or trainable[i + 1] != b + 1:
            runs.append(str(start) if start == b else f"{start}-{b}")
            start = None
    return ",".join(runs)


def table(plan: PlanFile, title: str = "") -> Table:
    """The plan's rows: device, cut, rank, trainable blocks (L_i), batch,
    weights (when any device's are quantized), predicted peak memory against
    the budget, wire codecs, bytes per step, step time."""
    t = Table(title=title or None, title_justify="left")
    quantized = any(p.quantize != "none" for p in plan.clients.values())
    columns = [("device", "left"), ("cut", "right"), ("rank", "right"), ("blocks (L_i)", "left"), ("batch", "right")]
    if quantized:
        columns.append(("weights", "left"))
    for name, justify in (*columns, ("peak / budget GiB", "right"), ("use", "right"),
                          ("train mem MiB", "right"), ("codec up / down", "left"), ("up / down MB per step", "right"),
                          ("step s", "right")):
        t.add_column(name, justify=justify, no_wrap=True)
    for name, p in plan.clients.items():
        weights = [p.weights] if quantized else []
        t.add_row(name, f"{p.k1},{p.k2}", str(p.rank), f"{blocks_text(p.trainable)} ({p.capacity})", str(p.batch),
                  *weights, f"{p.predicted_peak_bytes / GIB:.2f} / {p.budget_bytes / GIB:.2f}",
                  f"{p.predicted_peak_bytes / p.budget_bytes:.0%}", f"{p.train_memory_bytes / 2**20:.1f}",
                  f"{p.codec_up} / {p.codec_down}",
                  f"{p.bytes_up / 1e6:.2f} / {p.bytes_down / 1e6:.2f}", f"{p.predicted_step_s:.3f}")
    return t


def render(plan: PlanFile, title: str = "", console: Console | None = None) -> None:
    """Print the plan's table."""
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=WIDE)
    console.print(table(plan, title))
