"""Layer allocation every round: which blocks each selected client trains.

``--allocation`` picks the policy (docs/algorithms.md#allocation):

- ``fixed``: the blocks a client joined with (``--blocks``; all without it);
- ``fedra``: FedRA's random matrix, client i getting L_i blocks (its
  ``capacity``, capped by what its memory budget holds in the worst case);
  ``--cover-all`` makes the participants cover every block when they can;
- ``fedpilot``: per client an exact 0/1 knapsack over its memory budget, the
  value of a block its Fed-piLot score from the latest updates;
- ``fisher``: the same knapsack valued by squared gradients measured while
  the client trained the block (client side) and while the server ran its
  backward steps (server side).

The allocator is told who joined with what resources, plans each round for
the selected clients, and learns from each round's uploads; the coordinator
applies the plan (the round's download names the blocks, the server-side
adapter trains only those, an upload carries only those). It does no I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from profiles.selection import (DEFAULT_RESOLUTION, chain_knapsack, fedpilot_scores, fedra_matrix, fisher_scores,
                                knapsack, worst_case_count)
from split.families import block_of
from split.protocol import ALLOCATIONS

from .admission import Refused
from .strategies.base import GlobalModel, Upload

log = logging.getLogger(__name__)

MB = 1 << 20


@dataclass(frozen=True)
class Resources:
    """What a client can afford, as it said at join: ``capacity``, blocks it
    can train per round; ``train_memory``, bytes for trainable blocks;
    ``block_costs``, each block's training memory in bytes on that client."""

    capacity: int | None = None
    train_memory: int | None = None
    block_costs: Mapping[int, int] | None = None


def check_resources(policy: str, num_layers: int, resources: Resources, blocks: frozenset[int] | None) -> None:
    """Refuse a join whose resources the allocation cannot use: a fixed block
    set where the server allocates, a capacity outside 1..L, a memory budget
    without the block costs (or the reverse), costs that do not name exactly
    the model's blocks, and a budget that holds no block at all."""
    if policy != "fixed" and blocks is not None:
        raise Refused(f"this server allocates the blocks every round (--allocation {policy}); join without "
                      "--blocks, and say what this client affords with --capacity or --train-memory-mb")
    cap, budget, costs = resources.capacity, resources.train_memory, resources.block_costs
    if cap is not None and not 1 <= cap <= num_layers:
        raise Refused(f"capacity {cap} is outside 1..{num_layers}, the blocks of the model")
    if (budget is None) != (costs is None):
        raise Refused("a memory budget for trainable blocks comes with the memory cost of each block: the join "
                      "needs both train_memory and block_costs, or neither")
    if costs is None:
        return
    if set(costs) != set(range(num_layers)):
        odd = sorted(set(costs) ^ set(range(num_layers)))
        raise Refused(f"block_costs must name every block 0..{num_layers - 1} of the model and no other; they "
                      f"differ in {odd[:5]}")
    cheapest = min(costs.values())
    if budget < cheapest:
        raise Refused(f"the memory budget for trainable blocks, {budget / MB:.1f} MiB, holds no block (the "
                      f"cheapest needs {cheapest / MB:.1f} MiB); give a larger --train-memory-mb")


def check_fisher(scores: Mapping[int, float] | None, wanted: bool, blocks: frozenset[int] | None) -> None:
    """An upload's gradient scores: present exactly when the offer asked for
    them, and only for blocks the client trained this round."""
    if not wanted:
        if scores is not None:
            raise Refused("the upload carries gradient scores this server did not ask for")
        return
    if scores is None:
        raise Refused("this server allocates blocks by gradient scores (--allocation fisher): the upload must "
                      "carry 'fisher', one score per client-side block it trained")
    outside = sorted(b for b in scores if blocks is not None and b not in blocks)
    if outside:
        raise Refused(f"the upload carries gradient scores of blocks {outside[:5]}, which it did not train this "
                      f"round (its blocks: {sorted(blocks)})")


def below_cut(client_modules, server_modules) -> tuple[int, ...]:
    """A client's blocks below the cut, lowest first: those under its lowest
    server-side block (all its blocks when the server holds none). Training
    one makes backward run through every one above it."""
    mine = {block_of(m) for m in client_modules} - {None}
    server = {block_of(m) for m in server_modules} - {None}
    return tuple(sorted(b for b in mine if not server or b < min(server)))


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in tensors]) if tensors else torch.zeros(0, dtype=torch.float64)


def _block_modules(names, block: int) -> list[str]:
    return sorted(m for m in names if block_of(m) == block)


def update_statistics(before: GlobalModel, after: GlobalModel, uploads: list[Upload]
                      ) -> tuple[dict[int, float], dict[str, dict[int, tuple[float, float]]]]:
    """What a round's updates say per block: the norm of the global update of
    each block some upload trained (``after - before`` over its modules' A and
    B), and per client and trained block the norm of its own update (upload
    minus the round's global model) with its cosine to the global update of
    the same modules. Factor space is where layermean averages, so there the
    global update is the mean of the clients' updates."""
    trained: dict[int, set[str]] = {}
    for u in uploads:
        for m in u.factors:
            if block_of(m) is not None:
                trained.setdefault(block_of(m), set()).add(m)
    global_norms = {}
    for block, names in trained.items():
        mods = sorted(names)
        g = _flat([after.A[m] - before.A[m] for m in mods] + [after.B[m] - before.B[m] for m in mods])
        global_norms[block] = float(g.norm())
    local: dict[str, dict[int, tuple[float, float]]] = {}
    for u in uploads:
        r = u.rank
        for block in sorted({block_of(m) for m in u.factors if block_of(m) is not None}):
            mods = _block_modules(u.factors, block)
            d = _flat([u.factors[m].A - before.A[m][:r] for m in mods] + [u.factors[m].B - before.B[m][:, :r]
                                                                           for m in mods])
            g = _flat([after.A[m][:r] - before.A[m][:r] for m in mods] + [after.B[m][:, :r] - before.B[m][:, :r]
                                                                           for m in mods])
            dn, gn = float(d.norm()), float(g.norm())
            cosine = float(d @ g) / (dn * gn) if dn > 0 and gn > 0 else 0.0
            local.setdefault(u.client, {})[block] = (dn, cosine)
    return global_norms, local


class Allocator:
    """Plans which blocks each selected client trains, round by round."""

    def __init__(self, policy: str, num_layers: int, seed: int = 0, cover_all: bool = False,
                 resolution: int = DEFAULT_RESOLUTION):
        if policy not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {policy!r}")
        if cover_all and policy != "fedra":
            raise ValueError(f"--cover-all applies to --allocation fedra (this run allocates with {policy})")
        self.policy, self.num_layers, self.seed, self.cover_all = policy, num_layers, seed, cover_all
        self.resolution = resolution
        self.resources: dict[str, Resources] = {}
        self.chains: dict[str, tuple[int, ...]] = {}  # each client's blocks below the cut
        self.current: dict[str, frozenset[int]] = {}  # the running round's allocation
        self.local: dict[str, dict[int, tuple[float, float]]] = {}  # fedpilot: client -> block -> (norm, cosine)
        self.global_norms: dict[int, float] = {}  # fedpilot: block -> norm of its latest global update
        self.fisher: dict[str, dict[int, float]] = {}  # fisher: client -> block -> latest score
        self._warned_cover = False

    @property
    def active(self) -> bool:
        """Whether blocks are allocated every round (not the join's fixed sets)."""
        return self.policy != "fixed"

    @property
    def wants_gradients(self) -> bool:
        """Whether clients and the server measure squared gradients per block."""
        return self.policy == "fisher"

    def check(self, resources: Resources, blocks: frozenset[int] | None) -> None:
        """Refuse a join this allocation cannot plan for (``check_resources``)."""
        check_resources(self.policy, self.num_layers, resources, blocks)

    def register(self, client: str, resources: Resources, chain: tuple[int, ...] = ()) -> None:
        """Note what ``client`` affords and its blocks below the cut (``below_cut``)."""
        self.resources[client] = resources
        self.chains[client] = tuple(chain)

    # ------------------------------------------------------------ planning

    def capacity(self, client: str) -> int:
        """L_i: the blocks a client trains under FedRA: its capacity, at most
        the count its memory budget holds whichever blocks are drawn (a drawn
        block below the cut counted with the blocks between it and the cut)."""
        r = self.resources.get(client, Resources())
        cap = self.num_layers if r.capacity is None else r.capacity
        if r.train_memory is not None:
            costs = [r.block_costs[b] for b in range(self.num_layers)]
            cap = min(cap, worst_case_count(costs, r.train_memory, self.chains.get(client, ())))
        return cap

    def plan(self, round_index: int, clients: list[str]) -> dict[str, frozenset[int]]:
        """The blocks each of ``clients`` (the round's selection) trains in
        ``round_index``; kept until the next plan."""
        if not self.active:
            self.current = {}
        elif self.policy == "fedra":
            caps = [self.capacity(c) for c in clients]
            if self.cover_all and sum(caps) < self.num_layers and not self._warned_cover:
                log.warning("--cover-all: the selected clients can train %d blocks together, fewer than the "
                            "model's %d; each block is allocated at most once", sum(caps), self.num_layers)
                self._warned_cover = True
            matrix = fedra_matrix(caps, self.num_layers, self.seed, round_index, self.cover_all)
            self.current = {c: frozenset(int(b) for b in row.nonzero()[0]) for c, row in zip(clients, matrix)}
        else:
            self.current = {c: self._solve(c) for c in clients}
        return dict(self.current)

    def values(self, client: str) -> dict[int, float]:
        """The knapsack value of each block for ``client`` now."""
        blocks = list(range(self.num_layers))
        if self.policy == "fisher":
            return fisher_scores(blocks, self.fisher.get(client, {}))
        mine = self.local.get(client, {})
        return fedpilot_scores(blocks, {b: n for b, (n, _) in mine.items()}, {b: c for b, (_, c) in mine.items()},
                               self.global_norms)

    def _solve(self, client: str) -> frozenset[int]:
        """Fed-piLot's knapsack for one client: the blocks of largest total
        value whose training memory fits its budget (and at most its
        capacity), blocks below the cut taken as a tail up to the cut
        (``chain_knapsack``); by count alone without a budget."""
        r = self.resources.get(client, Resources())
        blocks = list(range(self.num_layers))
        values = self.values(client)
        v = [values[b] for b in blocks]
        if r.train_memory is not None:
            chosen = chain_knapsack(v, [r.block_costs[b] for b in blocks], r.train_memory,
                                    self.chains.get(client, ()), self.resolution, r.capacity)
        else:
            cap = self.num_layers if r.capacity is None else r.capacity
            chosen = knapsack(v, [1] * len(blocks), cap, resolution=max(cap, 1))
        return frozenset(blocks[j] for j in chosen)

    def blocks_for(self, client: str) -> frozenset[int] | None:
        """The blocks ``client`` trains in the running round (None: not allocated here)."""
        return self.current.get(client) if self.active else None

    # ------------------------------------------------------------ learning

    def observe_round(self, before: GlobalModel, after: GlobalModel, uploads: list[Upload]) -> None:
        """Fed-piLot learns from an aggregated round: each trained block's
        global update norm, each uploader's update norm and agreement."""
        if self.policy != "fedpilot" or not uploads:
            return
        global_norms, local = update_statistics(before, after, uploads)
        self.global_norms.update(global_norms)
        for client, stats in local.items():
            self.local.setdefault(client, {}).update(stats)

    def observe_gradients(self, client: str, scores: Mapping[int, float]) -> None:
        """Fisher learns a client's latest scores of the blocks it trained."""
        if self.policy == "fisher":
            self.fisher.setdefault(client, {}).update({int(b): float(v) for b, v in scores.items()})

    # ------------------------------------------------------------ checkpoints

    def snapshot(self) -> dict:
        """What the allocation has learnt, as JSON-able lists (a checkpoint's coordinator.json)."""
        return {"local": [[c, b, n, cos] for c, d in sorted(self.local.items()) for b, (n, cos) in sorted(d.items())],
                "global": [[b, n] for b, n in sorted(self.global_norms.items())],
                "fisher": [[c, b, v] for c, d in sorted(self.fisher.items()) for b, v in sorted(d.items())]}

    def restore(self, snap: dict | None) -> None:
        """Take back what ``snapshot`` saved (None: a checkpoint without allocation state)."""
        snap = snap or {}
        self.local, self.fisher = {}, {}
        for c, b, n, cos in snap.get("local", []):
            self.local.setdefault(c, {})[int(b)] = (float(n), float(cos))
        self.global_norms = {int(b): float(n) for b, n in snap.get("global", [])}
        for c, b, v in snap.get("fisher", []):
            self.fisher.setdefault(c, {})[int(b)] = float(v)
