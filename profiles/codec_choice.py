"""The planner's choice of a wire codec per client and direction.

Rule: among the codecs the user allows (``fedsplit plan --codecs``), take the
most precise one whose predicted step time is within ``SLACK`` (10%) of the
fastest allowed choice: compression is only worth its error when it buys
time. The two directions are chosen one after the other, the uplink first
(client to server: the hidden state of the forward and the gradient of the
backward), then the downlink (the server's replies), each the most precise
codec that keeps the step within the slack given the one chosen before it;
so the step with both choices is within 10% of the fastest.

Precision is a fixed order (``precision``), not a measured error: lossless
fp32, then fp16 (10 mantissa bits), bf16 (7), int8 (more outlier channels
sent apart: more precise), 4-bit NF4 (smaller blocks: more precise), top-k
(higher density: more precise). Pure: a step-time function in, two codec
texts out.
"""

from __future__ import annotations

from typing import Callable, Sequence

from split.codecs import CodecSpec, parse_codec, split_codec_list

SLACK = 0.10  # a more precise codec may cost this share of the fastest step time
# Codec families from the most precise to the least; within one, ``_finer`` decides.
ORDER = ("fp32", "fp16", "bf16", "int8", "nf4", "topk")


def _finer(spec: CodecSpec) -> float:
    """Within a family, larger is more precise."""
    if spec.name == "int8":
        return float(spec.param("outliers") or 0)
    if spec.name == "nf4":
        return -float(spec.param("block"))
    if spec.name == "topk":
        return float(spec.param("density"))
    return 0.0


def precision(spec: CodecSpec) -> tuple[int, float]:
    """A sort key: larger is more precise (module docstring's order)."""
    if spec.name not in ORDER:
        raise ValueError(f"codec {spec.text!r} has no place in the planner's precision order "
                         f"({', '.join(ORDER)})")
    return -ORDER.index(spec.name), _finer(spec)


def parse_codec_list(text: str) -> tuple[CodecSpec, ...]:
    """Codecs from ``"fp32,fp16,int8:outliers=4"`` (comma-separated codec
    texts), each checked by ``parse_codec``; a codec listed twice, or an empty
    list, is a ValueError naming it."""
    if not text.strip():
        raise ValueError(f"codecs {text!r}: expected codec texts separated by commas, such as fp32,fp16,int8")
    items = split_codec_list(text)
    specs = []
    for item in items:
        spec = parse_codec(item)
        if spec in specs:
            raise ValueError(f"codecs {text!r}: {spec.text} is listed twice; list each codec once")
        specs.append(spec)
    return tuple(specs)


def choose_codecs(step_time: Callable[[CodecSpec, CodecSpec], float],
                  allowed: Sequence[CodecSpec]) -> tuple[CodecSpec, CodecSpec]:
    """(up, down): the module docstring's rule. ``step_time(up, down)`` is the
    predicted step time with those codecs."""
    if not allowed:
        raise ValueError("no codecs to choose from: allow at least one (fp32 is lossless)")
    ranked = sorted(allowed, key=precision, reverse=True)  # most precise first
    # Step time is the compute plus each direction's bytes over its link, so the
    # fastest pair is the fastest uplink choice with the fastest downlink choice.
    fastest_up = min(ranked, key=lambda up: min(step_time(up, down) for down in ranked))
    fastest_down = min(ranked, key=lambda down: step_time(fastest_up, down))
    limit = step_time(fastest_up, fastest_down) * (1 + SLACK)
    up = next(u for u in ranked if min(step_time(u, d) for d in ranked) <= limit)
    down = next(d for d in ranked if step_time(up, d) <= limit)
    return up, down
