"""``fedsplit server --adapter-up/--adapter-down``: the codecs of a
federation's adapter uploads and downloads (split/adapter_codec.py)."""

from __future__ import annotations

import argparse

from .adapter_codec import USAGE, parse_adapter_codec


def adapter_codec(text: str):
    """An argparse type: the spec of ``text``, or an error naming the choices."""
    try:
        return parse_adapter_codec(text, "adapter codec")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(group) -> None:
    """The two options, in the server's federation group."""
    group.add_argument("--adapter-up", type=adapter_codec, default="fp32", metavar="SPEC",
                       help=f"how clients upload their LoRA factors and head each round: {USAGE} (the top D of "
                            "each tensor's update, with error feedback; docs/adapter-compression.md)")
    group.add_argument("--adapter-down", type=adapter_codec, default="fp32", metavar="SPEC",
                       help=f"how round offers carry the global LoRA factors and head: {USAGE} (each tensor "
                            "masked to its top D entries)")


def config(args) -> dict:
    """The FederationConfig fields the options set."""
    return {"adapter_up": args.adapter_up, "adapter_down": args.adapter_down}
