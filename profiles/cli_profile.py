"""``fedsplit profile``: measure this machine into a device profile, print it
as TOML, and write it with ``--out``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from split.argtypes import nonnegative_float, positive_float

EXAMPLE = ("fedsplit profile --server tcp://SERVER_HOST:5555 --key keys/client1.key_secret "
           "--server-key keys/server.key --out my-device.toml")
HELP = "measure this machine into a device profile (TOML)"
EPILOG = f"""\
measures compute (timed matrix products), the accelerator, the memory fedsplit
may use (90% of what is available now), whether bitsandbytes works, and the
link to a running fedsplit server (probe round trips); schema and built-in
devices: docs/devices.md

example:
  {EXAMPLE}
without a server, give the link's figures:
  fedsplit profile --uplink-mbps 20 --downlink-mbps 50 --rtt-ms 15 --out my-device.toml"""


def add_parser(sub, formatter_class=argparse.RawDescriptionHelpFormatter) -> argparse.ArgumentParser:
    """Add the ``profile`` subcommand to the ``fedsplit`` subparsers ``sub``
    (``formatter_class``: the command's help formatter)."""
    p = sub.add_parser("profile", help=HELP, description=HELP[0].upper() + HELP[1:] + ".", epilog=EPILOG,
                       formatter_class=formatter_class)
    p.add_argument("--server", default=None,
                   help="a running fedsplit server's ZeroMQ endpoint: the link to it is measured with probes "
                        "(one on another machine needs --key and --server-key)")
    p.add_argument("--key", default=None, metavar="FILE", help="this client's NAME.key_secret (CurveZMQ)")
    p.add_argument("--server-key", default=None, metavar="FILE", help="the server's public NAME.key")
    p.add_argument("--uplink-mbps", type=positive_float, default=None, metavar="MBPS",
                   help="Mbit/s from this device to the server, instead of measuring it (needed without --server)")
    p.add_argument("--downlink-mbps", type=positive_float, default=None, metavar="MBPS",
                   help="Mbit/s from the server to this device, instead of measuring it (needed without --server)")
    p.add_argument("--rtt-ms", type=nonnegative_float, default=None, metavar="MS",
                   help="round-trip time to the server in ms, instead of measuring it (needed without --server)")
    p.add_argument("--name", default=None, help="the profile's name (default: this machine's host name)")
    p.add_argument("--out", default=None, metavar="FILE", help="write the profile to this .toml file")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--device", default="auto",
                   help="what to measure: auto (CUDA, else MPS, else the CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--seconds", type=positive_float, default=0.3,
                   help="seconds of timed matrix products per precision")
    p.add_argument("--timeout", type=positive_float, default=30.0, help="seconds to wait for any server reply")
    return p


def run(args) -> int:
    """Measure, print the TOML, write it to ``--out``."""
    from split.security import load_client_keys

    from .measure import measure_profile
    from .schema import parse_profile, profile_to_toml

    out = Path(args.out) if args.out else None
    if out is not None:
        _check_out(out, args.force)  # before measuring: a bad path fails at once
    keys = load_client_keys(args.key, args.server_key)
    if keys is not None and args.server is None:
        raise ValueError("--key and --server-key are for the link to a server: give --server too")
    profile = measure_profile(args.server, keys=keys, name=args.name, uplink_mbps=args.uplink_mbps,
                              downlink_mbps=args.downlink_mbps, rtt_ms=args.rtt_ms, device=args.device,
                              seconds=args.seconds, timeout=args.timeout)
    text = profile_to_toml(profile)
    parse_profile(text, "the measured profile")  # what is written must load
    print(text, end="")
    if out is not None:
        _write(out, text, args.force)
        print(f"# written to {out}")
    return 0


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise ValueError(f"--out {out} exists: give --force to overwrite it, or another file name")
    if out.exists() and not out.is_file():
        raise ValueError(f"--out {out} is not a file")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: folder {out.parent} does not exist; create it first")


def _write(out: Path, text: str, force: bool) -> None:
    """Write ``text`` to ``out``; with ``force`` whole or not at all (a
    temporary file renamed over it), without it never over an existing file."""
    if not force:
        try:
            with open(out, "x", encoding="utf-8") as f:
                f.write(text)
        except FileExistsError:
            raise ValueError(f"--out {out} exists: give --force to overwrite it, or another file name") from None
        return
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
