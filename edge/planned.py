"""A client started with ``--profile``: its plan from the server, before it
builds its model.

The client names its device profile (a built-in name such as ``pi5``, or a
.toml file; the plan is keyed by the profile's ``name``) in a "plan" request;
the server answers with that device's entry of its plan (``fedsplit server
--plan``). The entry's cut, rank, batch size, sequence length and trainable
blocks, dtype, weights and codecs then stand for ``--cut``, ``--rank``,
``--batch-size``, ``--max-length``, ``--blocks``, ``--dtype``, ``--quantize``,
``--codec-up`` and ``--codec-down``. An option also given on the command line
must say the same as the plan: a conflict is an error naming both, never a
silent override. The reply is checked like any input from the network.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from profiles.planfile import PlanFileError, plan_request, replied_plan
from profiles.planner import ClientPlan
from profiles.schema import resolve_profile
from split.codecs import parse_codec
from split.partition import Cut, load_config, resolve_model_path
from split.security import load_client_keys
from split.transport import Connection, HandshakeFailed, ServerError

# argparse dest -> the option that sets it, for what a plan decides.
PLANNED = {"cut": "--cut", "rank": "--rank", "batch_size": "--batch-size", "max_length": "--max-length",
           "blocks": "--blocks", "dtype": "--dtype", "codec_up": "--codec-up", "codec_down": "--codec-down",
           "quantize": "--quantize"}


@dataclass(frozen=True)
class PlannedOptions:
    """A plan as client options. ``blocks`` is None when every block trains
    (what strategies without block subsets require)."""

    cut: Cut
    rank: int
    batch_size: int
    max_length: int
    blocks: list[int] | None
    dtype: str
    codec_up: str  # canonical codec texts (split.codecs)
    codec_down: str
    quantize: str = "none"

    def value(self, dest: str):
        return getattr(self, dest)


def planned_options(plan: ClientPlan, num_layers: int) -> PlannedOptions:
    """``plan`` as options for a model of ``num_layers`` blocks; a plan that
    does not fit that model (a hostile or mistaken server) is a ValueError."""
    cut = Cut(plan.k1, plan.k2)
    try:
        cut.check(num_layers)
    except ValueError as exc:
        raise ValueError(f"the server's plan for {plan.device!r} does not fit this client's model: {exc}") from None
    outside = [b for b in plan.trainable if b >= num_layers]
    if outside:
        raise ValueError(f"the server's plan for {plan.device!r} trains block {outside[0]}, but this client's model "
                         f"has blocks 0..{num_layers - 1}: are both started with the same --model?")
    blocks = None if plan.trainable == list(range(num_layers)) else list(plan.trainable)
    return PlannedOptions(cut, plan.rank, plan.batch, plan.seq_len, blocks, plan.dtype, plan.codec_up,
                          plan.codec_down, plan.quantize)


def given_options(parser: argparse.ArgumentParser, argv: list[str], dests) -> set[str]:
    """Which of ``dests`` the subcommand's own arguments ``argv`` set
    explicitly (abbreviated and ``--opt=value`` spellings included): argparse
    fills in a default only where the namespace lacks the attribute, so a
    placeholder still there marks an option left out."""
    unset = object()
    namespace = argparse.Namespace(**{d: unset for d in dests})
    parser.parse_args(argv, namespace)
    return {d for d in dests if getattr(namespace, d) is not unset}


def _shown(dest: str, value) -> str:
    if dest == "blocks":
        return "all blocks" if value is None else ",".join(map(str, value))
    return str(value)


def check_conflicts(planned: PlannedOptions, given: dict, device: str, num_layers: int) -> None:
    """Refuse an option given on the command line that says otherwise than the plan."""
    for dest, value in given.items():
        mine = planned.value(dest)
        if dest == "blocks" and value is not None:
            value = sorted(set(value))
            value = None if value == list(range(num_layers)) else value
        if dest == "cut" and isinstance(value, str):
            value = Cut.parse(value)
        if dest in ("codec_up", "codec_down"):
            value = parse_codec(value).text
        if value != mine:
            raise ValueError(f"{PLANNED[dest]} {_shown(dest, value)} conflicts with the server's plan for "
                             f"{device!r}, which gives {PLANNED[dest]} {_shown(dest, mine)}; leave {PLANNED[dest]} "
                             "out to follow the plan, or start the client without --profile")


def fetch_plan(server: str, profile: str, client_id: str, key: str | None, server_key: str | None,
               timeout: float) -> ClientPlan:
    """``profile``'s entry of the plan of the server at ``server``."""
    conn = Connection(server, client_id or "planning", timeout=timeout, keys=load_client_keys(key, server_key))
    try:
        reply = conn.request(plan_request(profile), retry=False)
    except HandshakeFailed:
        raise
    except ServerError as exc:
        raise ServerError(f"the server at {server} has no plan for this client: {exc}", exc.code) from None
    finally:
        conn.close()
    try:
        return replied_plan(reply, profile)
    except PlanFileError as exc:
        raise ServerError(f"the server at {server} sent a bad plan: {exc}") from None


def apply_profile(args: argparse.Namespace, argv: list[str]) -> ClientPlan:
    """Fetch the plan for ``args.profile`` from ``args.server`` and set the
    client's cut, rank, batch size, max length, dtype, codecs and blocks from it
    (``argv``: the client subcommand's own arguments, to tell options given
    from defaults). Returns the plan; its ``device`` is the profile name the
    client joins with, its ``capacity`` and ``train_memory`` what layer
    allocation needs."""
    device = resolve_profile(args.profile).name
    config = load_config(resolve_model_path(args.model), args.task, 2, True)
    plan = fetch_plan(args.server, device, args.id, args.key, args.server_key, args.connect_timeout)
    planned = planned_options(plan, config.num_hidden_layers)
    given = given_options(args.client_parser, argv, PLANNED)
    check_conflicts(planned, {dest: getattr(args, dest) for dest in given}, device, config.num_hidden_layers)
    args.cut = str(planned.cut)
    args.rank, args.batch_size, args.max_length, args.blocks, args.dtype, args.quantize = (
        planned.rank, planned.batch_size, planned.max_length, planned.blocks, planned.dtype, planned.quantize)
    args.codec_up, args.codec_down = planned.codec_up, planned.codec_down
    weights = "" if planned.quantize == "none" else f", blocks' linear weights {planned.quantize}"
    print(f"fedsplit client: plan for {device!r}: cut {planned.cut}, rank {planned.rank}, batch "
          f"{planned.batch_size}, max length {planned.max_length}, {planned.dtype}{weights}, codecs up "
          f"{planned.codec_up} down {planned.codec_down}, blocks {_shown('blocks', planned.blocks)} (predicted peak "
          f"{plan.predicted_peak_bytes / 2**30:.2f} GiB of {plan.budget_bytes / 2**30:.2f} GiB, "
          f"{plan.predicted_step_s:.3f} s a step)", flush=True)
    return plan
