"""A server's plan (``fedsplit server --plan``): the file checked against this
server at start, and each client's entry served by profile name.

The plan file itself is checked by ``profiles.planfile`` (types, ranges,
consistency); here it is checked against what this server runs: its model,
its cut, its limits and its federation's strategy. Any mismatch stops the
server at start with the reason, before a client depends on the plan.
"""

from __future__ import annotations

import logging

from profiles.planfile import PlanFile, plan_reply, read_plan, requested_profile
from split.partition import Cut
from split.protocol import ModelInfo
from split.wire import Message

from .sessions import RequestError

log = logging.getLogger(__name__)


class UnknownProfile(RequestError):
    """A "plan" request for a profile the plan has no entry for."""


class NoPlan(RequestError):
    """A "plan" request to a server started without --plan."""


def check_plan(plan: PlanFile, source: str, model: ModelInfo, cut: Cut, max_rank: int, max_tokens: int,
               strategy: tuple[str, bool, bool] | None) -> None:
    """Raise a ValueError naming the first way ``plan`` does not fit this
    server: its model, its ``cut``, its --max-rank and --max-tokens, and
    ``strategy`` (name, heterogeneous ranks, block subsets; None: no federation)."""
    m = plan.model
    if (m.model_type, m.num_layers, m.hidden_size) != (model.model_type, model.num_layers, model.hidden_size):
        raise ValueError(f"--plan {source}: made for {m.source or 'a model'} ({m.model_type}, {m.num_layers} blocks, "
                         f"width {m.hidden_size}), this server hosts {model.source or 'a model'} "
                         f"({model.model_type}, {model.num_layers} blocks, width {model.hidden_size}); plan again "
                         "with the server's --model")
    if m.fingerprint is not None and m.fingerprint != model.fingerprint:
        raise ValueError(f"--plan {source}: made for checkpoint {m.fingerprint[:12]} ({m.source}), this server "
                         f"hosts {model.fingerprint[:12]} ({model.source}): same architecture, other weights or "
                         "config; plan again with the server's --model")
    for name, entry in plan.clients.items():
        where = f"--plan {source}: device {name!r}"
        if entry.k1 < cut.front or entry.k2 < cut.back:
            raise ValueError(f"{where} has cut {entry.k1},{entry.k2}, which asks for blocks this server does not "
                             f"host (server --cut {cut}: blocks {cut.front}..{model.num_layers - cut.back - 1}); "
                             f"plan with --cut {cut} or start the server with the plan's cut "
                             f"{plan.server_cut[0]},{plan.server_cut[1]}")
        if entry.rank > max_rank:
            raise ValueError(f"{where} has rank {entry.rank}, above this server's --max-rank {max_rank}; plan with "
                             f"--ranks up to {max_rank} or raise --max-rank")
        if entry.batch * entry.seq_len > max_tokens:
            raise ValueError(f"{where} sends batches of {entry.batch} x {entry.seq_len} = "
                             f"{entry.batch * entry.seq_len} tokens, above this server's --max-tokens {max_tokens}; "
                             "raise --max-tokens or plan a smaller batch or --seq-len")
    _check_strategy(plan, source, strategy)


def _check_strategy(plan: PlanFile, source: str, strategy: tuple[str, bool, bool] | None) -> None:
    """Ranks and block subsets the federation can aggregate."""
    layers = plan.model.num_layers
    subsets = sorted(n for n, e in plan.clients.items() if len(e.trainable) < layers)
    if strategy is None:
        if subsets:
            raise ValueError(f"--plan {source}: device {subsets[0]!r} trains only blocks "
                             f"{plan.clients[subsets[0]].trainable}, but block subsets are for federated rounds "
                             "and this server runs none; add --strategy, or plan with --all-blocks")
        return
    name, heterogeneous_ranks, block_subsets = strategy
    ranks = sorted({e.rank for e in plan.clients.values()})
    if not heterogeneous_ranks and len(ranks) > 1:
        raise ValueError(f"--plan {source}: the plan gives ranks {ranks}, but {name} trains one rank; plan with "
                         f"--strategy {name} (or --same-rank)")
    if not block_subsets and subsets:
        raise ValueError(f"--plan {source}: device {subsets[0]!r} trains only blocks "
                         f"{plan.clients[subsets[0]].trainable}, but {name} needs every client to train every "
                         f"block; plan with --strategy {name} (or --all-blocks)")


def load_plan(source: str, model: ModelInfo, cut: Cut, max_rank: int, max_tokens: int,
              strategy: tuple[str, bool, bool] | None) -> PlanFile:
    """The plan file at ``source``, checked as a file and against this server."""
    plan = read_plan(source)
    check_plan(plan, source, model, cut, max_rank, max_tokens, strategy)
    log.info("plan %s: %d devices (%s)", source, len(plan.clients), ", ".join(plan.clients))
    return plan


def answer_plan(plan: PlanFile | None, msg: Message) -> Message:
    """The reply to a "plan" request: the named device's entry."""
    if plan is None:
        raise NoPlan("this server was started without --plan: start it with --plan plan.json (`fedsplit plan "
                     "--json plan.json` writes one), or start the client without --profile")
    name = requested_profile(msg)
    entry = plan.clients.get(name)
    if entry is None:
        known = ", ".join(repr(n) for n in sorted(plan.clients))
        raise UnknownProfile(f"the server's plan has no entry for device profile {name!r}; it plans for {known}. "
                             "Start the client with one of those profiles, or plan again with this one")
    return plan_reply(entry, msg.client)
