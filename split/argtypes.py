"""Range-checked value types for command-line options.

Each function parses one option value or raises ``argparse.ArgumentTypeError``,
so argparse names the option in its error (``argument --epochs: must be > 0,
got 0``) and exits before any model loads. Floats refuse NaN and infinity:
``float("nan")`` parses, and every comparison with it is false, so it would
slip through each range check below.
"""

from __future__ import annotations

import argparse
import math


def _number(text: str, cast):
    try:
        value = cast(text)
    except ValueError:
        kind = "an integer" if cast is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
    if cast is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def int_at_least(low: int):
    """A parser of integers >= ``low``."""

    def parse(text: str) -> int:
        value = _number(text, int)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"int_at_least_{low}"
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    """A finite number >= 0."""
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    """A share in (0, 1]."""
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def trim_share(text: str) -> float:
    """A share trimmed at each end, in (0, 0.5) (half or more would trim everything)."""
    value = _number(text, float)
    if not 0 < value < 0.5:
        raise argparse.ArgumentTypeError(f"must be in (0, 0.5), got {text}")
    return value


def dropout_rate(text: str) -> float:
    """A probability in [0, 1) (1 would drop everything)."""
    value = _number(text, float)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def positive_int_list(text: str) -> list[int]:
    """``"4,8,16"`` -> [4, 8, 16], each >= 1."""
    return _int_list(text, positive_int, "4,8,16")


def index_list(text: str) -> list[int]:
    """``"0,3,5"`` -> [0, 3, 5], each >= 0."""
    return _int_list(text, nonnegative_int, "0,3,5")


def _int_list(text: str, parse, example: str) -> list[int]:
    items = [x.strip() for x in text.split(",")]
    try:
        if not text.strip() or any(not x for x in items):
            raise argparse.ArgumentTypeError("an empty item")
        return [parse(x) for x in items]
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as {example}, got {text!r} "
                                         f"({exc})") from None


def codec_spec(text: str) -> str:
    """A codec spec ("int8", "topk:density=0.1"; split/codecs.py), as its canonical text."""
    from .codecs import parse_codec

    try:
        return parse_codec(text).text
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_command(sub, name: str, help: str, example: str, formatter_class=None) -> argparse.ArgumentParser:
    """A subcommand's parser: ``help`` in the command list, the same as a
    sentence for its description, and ``example`` under it."""
    extra = {"formatter_class": formatter_class} if formatter_class else {}
    return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                          epilog=f"example:\n  {example}", **extra)
