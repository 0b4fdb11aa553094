"""The client runtime's own resident memory, before any model.

What a fedsplit client holds before it loads a model: the interpreter, torch,
transformers, peft and ZeroMQ imported (the ``split`` modules a client is built
on), and torch's compute libraries loaded by a first small training step. It is measured once per process, in a fresh
subprocess (this process has already imported and allocated other things), and
cached: the cost model adds it to every prediction.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys

from split.launch import child_env

# Run in the fresh interpreter: import what a client imports, take one tiny
# autograd step, report the resident size (VmRSS) and its peak (VmHWM).
_PROBE = """
import json, pathlib, torch
# What a client imports (edge/client.py): torch, transformers, peft, accelerate,
# ZeroMQ and msgpack come with these, and psutil with its meter.
import resource, sys, psutil, split.lora, split.partition, split.protocol, split.transport
threads = {threads}
if threads:
    torch.set_num_threads(threads)
w = torch.randn(64, 64, requires_grad=True)
(torch.randn(8, 64) @ w).tanh().sum().backward()
proc = pathlib.Path("/proc/self/status")
status = dict(line.split(":", 1) for line in proc.read_text().splitlines()) if proc.exists() else {{}}
if "VmHWM" in status:
    peak = int(status["VmHWM"].split()[0]) * 1024
else:  # as edge/meter.py reads it where there is no /proc: macOS reports bytes, others kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
print(json.dumps({{"peak": peak, "threads": torch.get_num_threads()}}))
"""


@functools.lru_cache(maxsize=None)
def runtime_baseline(threads: int = 0) -> int:
    """Resident bytes of a client process with its libraries loaded and no
    model (the peak, VmHWM, of a fresh interpreter doing just that). ``threads``:
    torch's thread count there (0: torch's default). Measured once per process."""
    probe = subprocess.run([sys.executable, "-c", _PROBE.format(threads=int(threads))], capture_output=True,
                           text=True, env=child_env(), timeout=300)
    if probe.returncode != 0:
        raise RuntimeError(f"measuring the client runtime's memory failed:\n{probe.stderr[-2000:]}")
    return int(json.loads(probe.stdout.strip().splitlines()[-1])["peak"])
