"""Measure this machine into a device profile (``fedsplit profile``): matrix
product throughput, the accelerator, the memory fedsplit may use, whether
bitsandbytes works, and, given a running server, the link to it.

Every figure's source says it was measured, where and when, and how.
"""

from __future__ import annotations

import math
import socket
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import psutil
import torch

from split.devices import resolve_device

from .schema import GIB, MAX_NAME, DeviceProfile

# Share of the memory available now (not of the total) that a measured profile
# budgets: what other programs hold already is not fedsplit's, and a tenth is
# left for them to grow.
MEMORY_SHARE = 0.9
# A half-precision figure is kept only when it differs from fp32 by more than this.
HALF_DIFFERS = 0.1
TEGRA_RELEASE = Path("/etc/nv_tegra_release")  # present on NVIDIA Jetson (L4T) systems
MAX_MATMUL_SIDE = {"cpu": 2048}  # other devices: 8192


def matmul_gflops(device: str = "cpu", dtype: torch.dtype = torch.float32, seconds: float = 0.3) -> float:
    """This machine's throughput in GFLOP/s for square matrix products on
    ``device`` in ``dtype``, with torch's current thread count.

    The side doubles from 128 while a product takes under a fiftieth of
    ``seconds`` (the timer's resolution and the call's overhead must not
    count) or a larger side still gains a quarter in throughput (threads
    that wait for a busy core stall a small product as long as a large
    one), up to a cap and about ``seconds`` of trying; the quickest of three
    products after a warm-up decides. Then products are timed one by one for
    ``seconds`` (at least 5) and the median is reported: the speed a
    training step typically sees, where the best would be an upper bound set
    by a moment of turbo clock or an idle machine, and the median is not
    moved by a single interrupted product."""
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"seconds must be a finite number > 0, got {seconds!r}")
    dev = torch.device(device)
    cap = MAX_MATMUL_SIDE.get(dev.type, 8192)
    side, rate = 64, 0.0
    start = time.perf_counter()
    with torch.no_grad():
        while True:
            side *= 2
            a, b = (torch.randn(side, side, device=dev).to(dtype) for _ in range(2))
            out = torch.empty(side, side, device=dev, dtype=dtype)
            _timed_matmul(a, b, out)  # warm-up: kernels chosen, memory touched
            quickest = min(_timed_matmul(a, b, out) for _ in range(3))
            short, gaining = quickest < seconds / 50, 2 * side ** 3 / quickest > 1.25 * rate
            rate = 2 * side ** 3 / quickest
            if side >= cap or not (short or gaining) or time.perf_counter() - start > seconds:
                break
        median = median_product_seconds(a, b, out, seconds)
    if not median > 0:
        raise RuntimeError(f"a {side}x{side} product timed at {median} s: this clock cannot time it")
    return 2 * side ** 3 / median / 1e9


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _timed_matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, clock=time.perf_counter) -> float:
    """Seconds one product takes by ``clock``, the device's queue drained before and after."""
    _synchronize(a.device)
    start = clock()
    torch.matmul(a, b, out=out)
    _synchronize(a.device)
    return clock() - start


def median_product_seconds(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, seconds: float,
                           clock=time.perf_counter) -> float:
    """The median time of products ``a @ b`` timed one by one by ``clock`` for
    ``seconds`` of that clock (at least 5 products)."""
    times = []
    start = clock()
    while clock() - start < seconds or len(times) < 5:
        times.append(_timed_matmul(a, b, out, clock))
    return statistics.median(times)


@dataclass(frozen=True)
class Accelerator:
    """What this machine computes on: the profile's ``kind`` (cpu, cuda,
    unified), the torch ``device`` to measure, and what was found."""

    kind: str
    device: str
    found: str


def detect_accelerator(device: str = "auto") -> Accelerator:
    """The accelerator ``device`` names ("auto": CUDA, else MPS, else the
    CPU). A CUDA GPU is "unified" on a Jetson (``/etc/nv_tegra_release``) or
    when torch reports it integrated: it shares the CPU's memory."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        what = f"{props.name}, CUDA {torch.version.cuda}"
        if TEGRA_RELEASE.exists() or getattr(props, "is_integrated", False):
            why = "a Jetson (L4T)" if TEGRA_RELEASE.exists() else "torch reports an integrated GPU"
            return Accelerator("unified", str(dev), f"{what}: shares memory with the CPU ({why})")
        return Accelerator("cuda", str(dev), f"{what}: memory of its own")
    if dev.type == "mps":
        return Accelerator("unified", "mps", "Apple GPU (MPS): shares memory with the CPU")
    cause = "asked for the CPU" if device == "cpu" else "torch sees no CUDA or MPS device"
    return Accelerator("cpu", "cpu", f"the CPU ({cause})")


def memory_budget(accelerator: Accelerator) -> tuple[int, str]:
    """(bytes fedsplit may use, how that was found): ``MEMORY_SHARE`` of the
    memory available now, the GPU's own on a CUDA device, the system's
    otherwise (a CPU, or a GPU that shares it)."""
    if accelerator.kind == "cuda":
        free, total = torch.cuda.mem_get_info(torch.device(accelerator.device))
        where = f"GPU memory free on {accelerator.device}"
    else:
        memory = psutil.virtual_memory()
        free, total = memory.available, memory.total
        where = "memory available (psutil)"
    share = int(free * MEMORY_SHARE)
    return share, (f"{MEMORY_SHARE:.0%} of the {free / GIB:.2f} GiB {where} of {total / GIB:.2f} GiB total; "
                   f"the rest is left to what else runs")


def bitsandbytes_usable(device: str) -> tuple[bool, str]:
    """(whether bitsandbytes works on ``device``, what was tried): it must
    import, and quantize a small tensor to 8 bits blockwise and back there
    (on a CPU: its CPU backend)."""
    try:
        import bitsandbytes
        from bitsandbytes import functional
    except Exception as exc:  # noqa: BLE001 - any failure to import means it does not work here
        return False, f"bitsandbytes does not import ({type(exc).__name__}: {_first_line(exc)})"
    version = getattr(bitsandbytes, "__version__", "?")
    try:
        x = torch.randn(1024, device=device)
        q, state = functional.quantize_blockwise(x)
        error = (functional.dequantize_blockwise(q, state) - x).abs().max().item()
    except Exception as exc:  # noqa: BLE001 - a backend that fails here fails in training too
        return False, (f"bitsandbytes {version} imports, but quantizing a tensor on {device} failed "
                       f"({type(exc).__name__}: {_first_line(exc)})")
    if not error <= 0.05 * x.abs().max().item():
        return False, f"bitsandbytes {version} quantized a tensor on {device} with an error of {error:.3g}"
    return True, f"bitsandbytes {version} quantized a tensor to 8 bits and back on {device}"


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:200]


def host_facts() -> dict:
    """This machine's name, cores (physical, logical) and torch's thread count."""
    return {"host": socket.gethostname() or "this machine", "cores": psutil.cpu_count(logical=False),
            "logical": psutil.cpu_count(logical=True), "threads": torch.get_num_threads()}


def _figure(value: float) -> float:
    """A figure to 4 significant digits: what a measurement supports."""
    return float(f"{value:.4g}")


def measure_profile(server: str | None = None, *, keys=None, name: str | None = None,
                    uplink_mbps: float | None = None, downlink_mbps: float | None = None,
                    rtt_ms: float | None = None, device: str = "auto", seconds: float = 0.3,
                    timeout: float = 30.0) -> DeviceProfile:
    """A profile of this machine. Compute, memory and bitsandbytes are
    measured here; the link is measured against the fedsplit ``server``
    (a ZeroMQ endpoint; ``keys``: the client's ``split.security.ClientKeys``
    for an encrypted one) unless given: a figure given as an argument wins
    over the measured one, and without a server all three must be given."""
    given = {"uplink_mbps": uplink_mbps, "downlink_mbps": downlink_mbps, "rtt_ms": rtt_ms}
    missing = [k for k, v in given.items() if v is None]
    if server is None and missing:
        options = ", ".join("--" + k.replace("_", "-") for k in missing)
        raise ValueError(f"the link to the server cannot be measured without one: give --server ADDR of a running "
                         f"fedsplit server, or the link's figures ({options})")
    if server is not None and not missing:
        raise ValueError("--server is there to measure the link, and all its figures are given (--uplink-mbps, "
                         "--downlink-mbps, --rtt-ms): drop --server, or the figures to be measured")
    accel = detect_accelerator(device)  # a device this machine lacks fails before anything is measured
    facts = host_facts()
    stamp = (f"measured by fedsplit profile on {facts['host']} at "
             f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
    values, sources = {}, {}
    if missing:  # first, so that a server out of reach fails before the slow part
        values.update(_link(server, keys, timeout, stamp, sources))
    for key, value in given.items():
        if value is not None:
            values[key] = value
            sources[key] = f"given on the command line (--{key.replace('_', '-')}) to fedsplit profile on " \
                           f"{facts['host']}"
    sources["accelerator"] = f"{stamp}: {accel.found}"
    memory, how = memory_budget(accel)
    sources["memory_gb"] = f"{stamp}: {how}"
    threads = f"{facts['threads']} torch threads, {facts['cores']} cores ({facts['logical']} logical)"
    fp32 = matmul_gflops(accel.device, torch.float32, seconds)
    sources["gflops_fp32"] = f"{stamp}: median of timed float32 square matrix products on {accel.device} ({threads})"
    fp16 = None
    if accel.kind != "cpu":  # fedsplit computes in float32 on a CPU, where half precision is rarely faster
        half = matmul_gflops(accel.device, torch.float16, seconds)
        if abs(half - fp32) > HALF_DIFFERS * fp32:
            fp16 = _figure(half)
            sources["gflops_fp16"] = f"{stamp}: median of timed float16 square matrix products on {accel.device}"
    usable, tried = bitsandbytes_usable(accel.device)
    sources["bitsandbytes"] = f"{stamp}: {tried}"
    return DeviceProfile(
        name=(name or facts["host"])[:MAX_NAME], memory_gb=_figure(memory / GIB), gflops_fp32=_figure(fp32),
        gflops_fp16=fp16, accelerator=accel.kind, bitsandbytes=usable, sources=sources,
        uplink_mbps=values["uplink_mbps"], downlink_mbps=values["downlink_mbps"], rtt_ms=values["rtt_ms"])


def _link(server: str, keys, timeout: float, stamp: str, sources: dict) -> dict:
    """The link figures measured against ``server``, their sources added to ``sources``."""
    from split.transport import Connection, ServerUnavailable

    from .link import measure_link

    conn = Connection(server, "profile-" + socket.gethostname()[:100], timeout=timeout, keys=keys)
    try:
        link = measure_link(conn)
    except ServerUnavailable:
        raise ConnectionError(f"no answer from the server at {server} within {timeout:g}s: is `fedsplit server` "
                              "running there, and is the address reachable from this machine? (--timeout waits "
                              "longer)") from None
    finally:
        conn.close()
    how = {"rtt_ms": f"median of {link.round_trips} empty probe round trips",
           "uplink_mbps": f"median of {link.repeats} probes carrying {link.up_bytes} bytes up, less one round trip",
           "downlink_mbps": f"median of {link.repeats} probes carrying {link.down_bytes} bytes down, less one round "
                            f"trip"}
    for key, text in how.items():
        sources[key] = f"{stamp}: {text}, to {server}"
    return {"rtt_ms": _figure(link.rtt_ms), "uplink_mbps": _figure(link.uplink_mbps),
            "downlink_mbps": _figure(link.downlink_mbps)}
