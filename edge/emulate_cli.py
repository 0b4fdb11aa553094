"""The ``fedsplit client`` options that say how ``--emulate`` emulates a
device (``edge.emulate``), and their check."""

from __future__ import annotations

import argparse

from split.argtypes import positive_float

# option -> (argparse dest, default): each only means something with --emulate.
OPTIONS = {"--emulate-clock": ("emulate_clock", "wall"), "--emulate-host-gflops": ("emulate_host_gflops", None),
           "--emulate-evaluation": ("emulate_evaluation", "device"), "--emulate-memory": ("emulate_memory", "enforce")}


def add_arguments(c: argparse.ArgumentParser) -> None:
    """Add the emulation options to the client's parser."""
    c.add_argument("--emulate-clock", choices=["wall", "cpu"], default="wall",
                   help="--emulate: time compute by wall-clock, or by the CPU time of the client's one thread "
                        "(needs --threads 1; robust when other processes share the cores)")
    c.add_argument("--emulate-host-gflops", type=positive_float, default=None, metavar="GFLOPS",
                   help="--emulate: this host's speed, measured once for several clients started together "
                        "(default: measured at start, as --emulate-clock needs it)")
    c.add_argument("--emulate-evaluation", choices=["device", "host"], default="device",
                   help="--emulate: evaluate the global model as the device would, or at host speed on an "
                        "undelayed link, left out of the emulated times (a measurement, not the device's job)")
    c.add_argument("--emulate-memory", choices=["enforce", "report"], default="enforce",
                   help="--emulate: end the client when it exceeds the device's memory budget, or only report it "
                        "(the summary names the first reading over the budget)")


def emulation(args: argparse.Namespace) -> dict | None:
    """The keyword arguments of ``edge.emulate.emulated_device`` for the
    client's options, or None without ``--emulate``; an emulation option
    without ``--emulate`` is an error naming it."""
    if not args.emulate:
        given = [opt for opt, (dest, default) in OPTIONS.items() if getattr(args, dest) != default]
        if given:
            raise ValueError(f"{', '.join(given)} set(s) how a device is emulated: add --emulate PROFILE")
        return None
    return {"profile": args.emulate, "device": args.device, "dtype": args.dtype,
            "host_gflops": args.emulate_host_gflops, "clock": args.emulate_clock,
            "evaluation": args.emulate_evaluation, "memory": args.emulate_memory}
