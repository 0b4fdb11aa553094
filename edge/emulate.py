"""Running a real client under a device's limits on this machine
(``fedsplit client --emulate PROFILE``).

A device profile (``profiles.schema.DeviceProfile``) imposes three limits:

- **Compute, by time dilation.** The client's work between two network
  messages is a compute stretch: the bottom forward, the top forward and
  backward, the bottom backward with the optimizer step, an evaluation batch.
  Each stretch is followed by a sleep so that it lasts ``slowdown`` times as
  long as it took here, ``slowdown = host GFLOP/s / device GFLOP/s``, the host
  measured once with a timed matmul at the dtype the client computes in. A
  device faster than this host cannot be emulated: the client then runs at
  host speed, with a warning that says so.
- **The link.** Every message of the client's ``Connection`` (hello, forward,
  backward, round, upload, status, ...) pays the device's link: a request of
  n bytes (every frame, headers included, as the connection counts them)
  leaves n*8/uplink + rtt/2 seconds after the client hands it over, and a
  reply of m bytes is released m*8/downlink + rtt/2 seconds after it arrived.
  The client has one request in flight at a time, so this per-message delay
  is the same as a serial link with a queue: no message ever waits behind
  another. The heartbeat pings from its own socket and are not delayed.
- **Memory.** After the model is loaded and after every compute block (a
  training step, an evaluation batch) the client's peak memory is compared
  with the profile's budget; beyond it the client stops with
  ``MemoryBudgetExceeded``, naming the budget and the measured peak, before
  anything is saved.

Compute stretches are timed, by default, with ``time.perf_counter``
(``clock="wall"``), not a thread's CPU time: the host's speed is itself
wall-clock throughput of a matmul on all of torch's intra-op threads, and a
thread's CPU time leaves out the work those worker threads do (and counts
their spinning), so it would misstate a multi-threaded forward. The price is
that other load on the host lengthens stretches and is dilated with them.

On a busy machine (several emulated clients and a server sharing a few cores)
``clock="cpu"`` is the robust choice: torch computes on the calling thread
alone (one intra-op thread, ``--threads 1``), a stretch's host time is that
thread's CPU time (``time.thread_time``), which time spent waiting for a core
does not lengthen, and the sleep after it tops the stretch up to ``slowdown``
times its CPU time (less the wall-clock it already took). The host's speed
must then be a one-thread figure too (``host_speed``).

Besides the stretches' times here and as dilated, the emulator keeps the
*device-equivalent* compute time, ``host time x host GFLOP/s / device
GFLOP/s`` with no floor at 1: how long the compute would take on the device
even where the device is faster than this host and no sleep can show it.
Inside training steps (compute blocks named ``"training step ..."``) it also
keeps that compute and the link's delays apart, so a round's training can be
told from its evaluation and its idle polling (``counters``).

Evaluating the global model is emulated like any other work by default
(``evaluation="device"``). With ``evaluation="host"`` evaluation batches run
at host speed on an undelayed link and stay out of the counters: a
measurement of the run (which a deployment would make elsewhere), not the
device's job, so that it neither slows the federation down nor counts in the
device's times.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from profiles.measure import matmul_gflops, median_product_seconds
from profiles.schema import resolve_profile
from split.devices import resolve_device, resolve_dtype

from .meter import cuda_peak, peak_rss

log = logging.getLogger(__name__)

GIB = 1 << 30
CLOCKS = ("wall", "cpu")
# How the client names its compute blocks (edge.client): a training step, an evaluation batch.
TRAINING, EVALUATION = "training step", "an evaluation batch"
EVALUATIONS = ("device", "host")
MEMORY_MODES = ("enforce", "report")


class MemoryBudgetExceeded(RuntimeError):
    """The client's peak memory went past the emulated device's budget."""


def link_seconds(nbytes: int, mbps: float, rtt_ms: float) -> float:
    """Seconds one message of ``nbytes`` takes over a link of ``mbps`` Mbit/s
    (10**6 bits) one way, with half the round-trip time ``rtt_ms``."""
    return nbytes * 8 / (mbps * 1e6) + rtt_ms / 2000


def slowdown(host_gflops: float, device_gflops: float) -> float:
    """How many times longer compute takes on the device than here; at least
    1, since sleeping can slow the host down but nothing can speed it up."""
    return max(1.0, host_gflops / device_gflops)


def host_speed(device: str = "cpu", dtype: torch.dtype = torch.float32, clock: str = "wall",
               seconds: float = 1.0) -> float:
    """This host's GFLOP/s as an emulator with ``clock`` needs it: for
    "wall", ``profiles.measure.matmul_gflops`` with torch's current threads;
    for "cpu", the same products on one thread timed by that thread's CPU
    time, so that other load on the machine does not lower the figure."""
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
    if clock == "wall":
        return matmul_gflops(device, dtype, seconds)
    if torch.device(device).type != "cpu":
        raise ValueError(f"the cpu clock times work on this CPU's thread; {device} computes elsewhere: use the wall "
                         "clock")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _thread_matmul_gflops(dtype, seconds)
    finally:
        torch.set_num_threads(threads)


def _thread_matmul_gflops(dtype: torch.dtype, seconds: float) -> float:
    """GFLOP/s of 512x512 products on this thread, by its CPU time: the median
    of products timed one by one for ``seconds`` of CPU time (at least 5)."""
    side = 512  # a product of a few ms at one thread: large enough to reach the kernel's speed
    a, b = (torch.randn(side, side).to(dtype) for _ in range(2))
    out = torch.empty(side, side, dtype=dtype)
    with torch.no_grad():
        torch.matmul(a, b, out=out)  # warm-up
        median = median_product_seconds(a, b, out, seconds, clock=time.thread_time)
    if not median > 0:
        raise RuntimeError("this thread's CPU clock cannot time a 512x512 product")
    return 2 * side ** 3 / median / 1e9


@dataclass(frozen=True)
class Counters:
    """An emulator's running totals at one moment, in seconds (see
    ``EmulatedDevice``); subtract two to get what happened between them."""

    compute_s: float = 0.0
    host_compute_s: float = 0.0
    device_compute_s: float = 0.0
    network_s: float = 0.0
    train_compute_s: float = 0.0
    train_network_s: float = 0.0

    def __sub__(self, other: "Counters") -> "Counters":
        return Counters(**{k: v - getattr(other, k) for k, v in asdict(self).items()})

    @property
    def busy_s(self) -> float:
        """Device-equivalent compute plus the link's delays: the time the device was busy."""
        return self.device_compute_s + self.network_s

    @property
    def train_s(self) -> float:
        """The same, within training steps only."""
        return self.train_compute_s + self.train_network_s


def _positive(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


class EmulatedDevice:
    """A device profile imposed on one client: time dilation of its compute
    stretches, delays on its messages, and its memory budget.

    ``host_gflops`` is this host's speed at ``dtype`` on ``device`` (where the
    client computes), measured as ``clock`` needs it (``host_speed``);
    ``emulated_device`` measures it unless given. ``clock`` times the compute
    stretches: "wall" (``time.perf_counter``) or "cpu" (the thread's CPU time,
    with torch on one thread; module docstring). Counters, in seconds:
    ``compute_s`` (compute as long as it lasts here under dilation: at least
    the host's time), ``host_compute_s`` (as long as it took here, by
    ``clock``), ``device_compute_s`` (as long as it would take on the device,
    even a faster one), ``network_s`` (the delays the link imposed),
    ``train_compute_s`` and ``train_network_s`` (device-equivalent compute and
    link delays inside training steps) and ``slept_s`` (all sleeps, dilation
    and link); ``stretches`` counts the compute stretches; ``counters()``
    snapshots them. ``evaluation`` ("device" or "host") says whether
    evaluation batches are emulated (module docstring); left to the host,
    their time is ``eval_host_s``. ``wall_s()`` is the real time since the emulation
    began, sleeps included: the device's wall-clock. The client's
    ``Connection`` calls ``on_send`` / ``on_receive`` for every message;
    ``computing()`` marks the client's compute blocks."""

    def __init__(self, profile, host_gflops: float, *, dtype: str = "float32", device: str | torch.device = "cpu",
                 clock: str = "wall", evaluation: str = "device", memory: str = "enforce"):
        self.profile = profile
        self.dtype = dtype
        resolve_dtype(dtype)
        self.device = torch.device(device)
        if clock not in CLOCKS:
            raise ValueError(f"clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
        if clock == "cpu" and (self.device.type != "cpu" or torch.get_num_threads() != 1):
            raise ValueError(f"the cpu clock times compute by the CPU time of the client's one thread: it needs "
                             f"--device cpu and --threads 1 (this client: {self.device}, "
                             f"{torch.get_num_threads()} threads); use the wall clock otherwise")
        self.clock = clock
        if evaluation not in EVALUATIONS:
            raise ValueError(f"evaluation must be one of {', '.join(EVALUATIONS)}, got {evaluation!r}")
        self.evaluation = evaluation
        if memory not in MEMORY_MODES:
            raise ValueError(f"memory must be one of {', '.join(MEMORY_MODES)}, got {memory!r}")
        self.memory = memory
        self.over_budget: str | None = None  # memory="report": the first reading over the budget
        if profile.accelerator == "cpu" and self.device.type != "cpu":
            raise ValueError(f"profile {profile.name!r} describes a device without a GPU, but the client would "
                             f"compute on {self.device}: emulate it with --device cpu")
        self.host_gflops = _positive("the host's GFLOP/s", host_gflops)
        self.device_gflops = _positive(f"profile {profile.name!r}'s GFLOP/s at {dtype}", profile.gflops(dtype))
        self.slowdown = slowdown(self.host_gflops, self.device_gflops)
        if self.device_gflops > self.host_gflops:
            log.warning("cannot emulate a device faster than this host: %s computes %.1f GFLOP/s at %s, this host "
                        "%.1f; the client computes at host speed (no time dilation), so its compute times are "
                        "this host's, longer than the device's", profile.name, self.device_gflops, dtype,
                        self.host_gflops)
        self.compute_s = self.host_compute_s = self.device_compute_s = self.network_s = self.slept_s = 0.0
        self.train_compute_s = self.train_network_s = 0.0
        self.eval_host_s = 0.0  # evaluation at host speed (evaluation="host"): not emulated, not in the counters
        self.stretches = 0  # compute stretches dilated so far
        self.peak_bytes = 0  # the largest memory reading checked against the budget
        self.started = time.perf_counter()
        self._depth = 0  # nested compute blocks
        self._kind = ""  # the open compute block: "training", "evaluation" (left unemulated) or ""
        self._open: tuple[float, float] | None = None  # (wall, cpu) when the open stretch began; None: none open
        self._overslept = 0.0  # seconds past their deadline the sleeps so far woke

    # ------------------------------------------------------------ time

    def wall_s(self) -> float:
        """Real seconds since the emulation began, sleeps included."""
        return time.perf_counter() - self.started

    def _sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, less what earlier sleeps overshot: a busy host
        wakes a sleeper late, and over many short stretches that would add up."""
        want = seconds - self._overslept
        if want <= 0:
            self._overslept = -want
            return
        start = time.perf_counter()
        end = start + want
        while (left := end - time.perf_counter()) > 0:  # to a deadline: a signal may wake it early
            time.sleep(left)
        slept = time.perf_counter() - start
        self.slept_s += slept
        self._overslept = slept - want

    def _start_stretch(self) -> None:
        self._open = (time.perf_counter(), time.thread_time())

    def _close_stretch(self, dilate: bool = True) -> None:
        """End the open compute stretch; with ``dilate``, sleep so that it
        lasts as long as on the device."""
        if self._open is None:
            return
        wall = time.perf_counter() - self._open[0]
        host = wall if self.clock == "wall" else time.thread_time() - self._open[1]
        self._open = None
        if self._kind == "evaluation":
            self.eval_host_s += host
            return
        self.stretches += 1
        self.host_compute_s += host
        self.compute_s += host * self.slowdown
        device = host * self.host_gflops / self.device_gflops
        self.device_compute_s += device
        if self._kind == "training":
            self.train_compute_s += device
        if dilate:
            # The cpu clock: the wall-clock the stretch took already counts towards its device time
            # (a stretch that a busy host stretched past it is not made up for by later ones).
            self._sleep(max(0.0, host * self.slowdown - wall))

    def counters(self) -> Counters:
        """The running totals now (subtract two snapshots for an interval)."""
        return Counters(self.compute_s, self.host_compute_s, self.device_compute_s, self.network_s,
                        self.train_compute_s, self.train_network_s)

    @contextmanager
    def computing(self, what: str):
        """A compute block of the client (``what``: "training step 3", ...):
        its stretches are dilated, and the memory budget is checked after it."""
        self._depth += 1
        if self._depth == 1:
            self._kind = ("training" if what.startswith(TRAINING) else
                          "evaluation" if what == EVALUATION and self.evaluation == "host" else "")
            self._start_stretch()
        try:
            yield
        except Exception:
            self._leave(dilate=True)
            raise
        except BaseException:  # an interrupt: stop at once, no sleep
            self._leave(dilate=False)
            raise
        self._leave(dilate=True)
        if self._depth == 0:
            self.check_memory(f"after {what}")

    def _leave(self, dilate: bool) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._close_stretch(dilate)
            self._kind = ""

    # ------------------------------------------------------------ the link

    def on_send(self, nbytes: int) -> None:
        """A request of ``nbytes`` is about to leave: the compute stretch before
        it ends (and is dilated), then the uplink holds the request."""
        self._close_stretch()
        self._link(link_seconds(nbytes, self.profile.uplink_mbps, self.profile.rtt_ms))

    def _link(self, delay: float) -> None:
        if self._kind == "evaluation":
            return
        self.network_s += delay
        if self._kind == "training":
            self.train_network_s += delay
        self._sleep(delay)

    def on_receive(self, nbytes: int) -> None:
        """A message of ``nbytes`` arrived: the downlink releases it after its
        transfer time; inside a compute block, a new stretch starts then."""
        self._link(link_seconds(nbytes, self.profile.downlink_mbps, self.profile.rtt_ms))
        if self._depth:
            self._start_stretch()

    # ------------------------------------------------------------ memory

    @property
    def budget_bytes(self) -> int:
        """The profile's memory budget in bytes."""
        return self.profile.memory_bytes

    def memory_used(self) -> tuple[int, str]:
        """The client's peak memory as the device would hold it, and what was
        measured: peak RSS on a CPU; on CUDA, the CUDA peak (a GPU with its
        own memory) or both together (a board whose CPU and GPU share it)."""
        rss = peak_rss()
        gpu = cuda_peak(self.device)
        if gpu is None:
            return rss, f"peak RSS {rss / GIB:.2f} GiB"
        if self.profile.accelerator == "unified":
            return rss + gpu, f"peak RSS {rss / GIB:.2f} GiB + CUDA peak {gpu / GIB:.2f} GiB (shared memory)"
        return gpu, f"CUDA peak {gpu / GIB:.2f} GiB"

    def check_memory(self, when: str = "now") -> int:
        """Compare the client's peak memory with the budget; returns the bytes
        measured, or raises ``MemoryBudgetExceeded`` naming both. With
        ``memory="report"`` the client goes on: the first reading over the
        budget is kept in ``over_budget`` (and logged), and the summary says so."""
        used, what = self.memory_used()
        self.peak_bytes = max(self.peak_bytes, used)
        if used > self.budget_bytes:
            text = (f"the client exceeds the memory budget of emulated device {self.profile.name!r}: {what} {when}, "
                    f"over its budget of {self.profile.memory_gb:g} GiB ({self.budget_bytes} bytes)")
            if self.memory == "report":
                if self.over_budget is None:
                    self.over_budget = text
                    log.warning("%s; going on, as --emulate-memory report asks", text)
                return used
            raise MemoryBudgetExceeded(
                f"{text}. This plan does not fit the device: lower --batch-size, --max-length or --rank, train "
                "fewer --blocks, or move the cut (--cut) so fewer blocks run on the client")
        return used

    # ------------------------------------------------------------ reports

    def summary(self) -> dict:
        """The emulation's settings and counters, for the client's summary."""
        p = self.profile
        return {"profile": p.name, "dtype": self.dtype, "clock": self.clock, "evaluation": self.evaluation,
                "eval_host_s": self.eval_host_s, "host_gflops": self.host_gflops,
                "device_gflops": self.device_gflops, "slowdown": self.slowdown, "uplink_mbps": p.uplink_mbps,
                "downlink_mbps": p.downlink_mbps, "rtt_ms": p.rtt_ms, "memory_budget_bytes": self.budget_bytes,
                "peak_memory_bytes": self.peak_bytes, "memory": self.memory, "over_budget": self.over_budget,
                "wall_s": self.wall_s(), **asdict(self.counters()),
                "slept_s": self.slept_s, "stretches": self.stretches}

    def describe(self) -> str:
        """One line saying what is emulated, for the start of a run."""
        p = self.profile
        speed = (f"compute {self.slowdown:.1f}x slower than this host" if self.device_gflops < self.host_gflops
                 else "compute at host speed (the device is faster than this host)")
        return (f"emulating {p.name}: {speed} ({self.device_gflops:.1f} vs {self.host_gflops:.1f} GFLOP/s at "
                f"{self.dtype}), uplink {p.uplink_mbps:g} Mbit/s, downlink {p.downlink_mbps:g} Mbit/s, RTT "
                f"{p.rtt_ms:g} ms, memory budget {p.memory_gb:g} GiB"
                + ("; compute timed by this thread's CPU time" if self.clock == "cpu" else "")
                + ("; evaluation at host speed, not emulated" if self.evaluation == "host" else ""))

    def report(self) -> str:
        """One line of emulated times and memory, for the end of a run."""
        return (f"emulated {self.profile.name}: {self.wall_s():.1f}s wall-clock (compute {self.compute_s:.1f}s, "
                f"link {self.network_s:.1f}s, slept {self.slept_s:.1f}s); peak memory "
                f"{self.peak_bytes / GIB:.2f} of {self.profile.memory_gb:g} GiB")


def emulated_device(profile: str, device: str = "cpu", dtype: str = "float32",
                    host_gflops: float | None = None, clock: str = "wall",
                    evaluation: str = "device", memory: str = "enforce") -> EmulatedDevice:
    """The device ``profile`` (a built-in name such as "pi5", or a .toml file)
    emulated for a client computing on ``device`` at ``dtype``, its stretches
    timed by ``clock``, evaluation emulated or not (``evaluation``), its
    memory budget enforced or only reported (``memory``); this host's speed is measured with a timed matmul
    (``host_speed``) unless ``host_gflops`` is given (measured once by whoever
    starts several emulated clients at once, which would otherwise measure
    each other's load)."""
    prof = resolve_profile(profile)
    dev = resolve_device(device)
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
    if host_gflops is None:
        host_gflops = host_speed(str(dev), resolve_dtype(dtype), clock, seconds=0.3)
    return EmulatedDevice(prof, host_gflops, dtype=dtype, device=dev, clock=clock, evaluation=evaluation,
                          memory=memory)
