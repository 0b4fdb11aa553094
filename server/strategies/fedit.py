"""FedIT: plain FedAvg of the LoRA factors, A and B averaged separately.

    A <- sum_k p_k A_k,   B <- sum_k p_k B_k,   p_k = n_k / sum_j n_j

(fedlora-algorithms.md, "Common notation"). Every client trains every LoRA
module at one shared rank.

This module also holds the helpers that the other homogeneous-rank strategies
(FFA-LoRA, RoLoRA, FedSA-LoRA, LayerMean) share. They build and check the
state, check uploads, and compute weighted means without touching their inputs.

State layout (every value can be checkpointed):
    {"rank": int, "alpha": float,
     "A": {module: r x d_in}, "B": {module: d_out x r},
     "extra": {name: tensor}}        # averaged non-LoRA trainables (a head)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from .base import (TRAIN_BOTH, ClientInfo, Download, Factors, RoundResult, Strategy, StrategyError,
                   Upload, average_extra, block_of, weights)

FACTOR_NAMES = ("A", "B")


def clone(t: torch.Tensor) -> torch.Tensor:
    """A detached copy, so that state never aliases a caller's tensor."""
    return t.detach().clone()


def clone_tree(value):
    """Copy a state value: tensors are cloned, dicts are copied recursively, and
    anything else (JSON-plain values) is returned as it is."""
    if isinstance(value, torch.Tensor):
        return clone(value)
    if isinstance(value, dict):
        return {k: clone_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clone_tree(v) for v in value]
    return value


def initial_state(strategy: Strategy, initial: dict[str, Factors], clients: list[ClientInfo]) -> dict:
    """The shared state before round 0: the initial global LoRA at the one rank
    that every client trains. Refuses client sets that ``strategy`` does not
    define, as well as an initial LoRA that is inconsistent."""
    strategy.check(clients)
    if not initial:
        raise StrategyError(f"{strategy.name}: the initial LoRA has no modules")
    ranks = sorted({f.rank for f in initial.values()})
    if len(ranks) > 1:
        raise StrategyError(f"{strategy.name}: the initial LoRA mixes ranks {ranks} across modules")
    alphas = sorted({float(f.alpha) for f in initial.values()})
    if len(alphas) > 1:
        raise StrategyError(f"{strategy.name}: the initial LoRA mixes alphas {alphas} across modules")
    rank = ranks[0]
    for module, f in initial.items():
        if f.A.dim() != 2 or f.B.dim() != 2 or f.B.shape[1] != f.A.shape[0]:
            raise StrategyError(
                f"{strategy.name}: initial factors of {module} have shapes A {tuple(f.A.shape)}, "
                f"B {tuple(f.B.shape)}; expected A r x d_in and B d_out x r")
    client_ranks = sorted({c.rank for c in clients})
    if client_ranks and client_ranks != [rank]:
        raise StrategyError(
            f"{strategy.name}: the initial LoRA has rank {rank} but the clients train rank "
            f"{client_ranks[0]}")
    return {
        "rank": rank,
        "alpha": alphas[0],
        "A": {m: clone(f.A) for m, f in initial.items()},
        "B": {m: clone(f.B) for m, f in initial.items()},
        "extra": {},
    }


def check_client(strategy: Strategy, state: dict, client: ClientInfo) -> None:
    """Refuse a download for a client the state does not fit (rank, layer subsets)."""
    strategy.check([client])
    if client.rank != state["rank"]:
        raise StrategyError(
            f"{strategy.name}: client {client.client!r} trains rank {client.rank} but this run's "
            f"LoRA has rank {state['rank']}")


def client_modules(state: dict, client: ClientInfo) -> list[str]:
    """The modules a client holds: all of them when ``client.layers`` is None,
    otherwise those in its blocks (modules outside every block, if any, go to
    every client)."""
    modules = list(state["A"])
    if client.layers is None:
        return modules
    return [m for m in modules if block_of(m) is None or block_of(m) in client.layers]


def check_uploads(strategy: Strategy, state: dict, uploads: list[Upload], factors: Iterable[str],
                  every_module: bool = True) -> None:
    """Refuse uploads that do not fit the state.

    ``factors`` are the factors that this round aggregates (only their shapes
    are checked, since a client may send a frozen or a local factor in any
    form). With ``every_module`` each upload must cover every module."""
    if not uploads:
        raise StrategyError(f"{strategy.name}: no uploads to aggregate")
    names = [u.client for u in uploads]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise StrategyError(f"{strategy.name}: more than one upload from client(s) {dupes}")
    known = set(state["A"])
    rank = state["rank"]
    for u in uploads:
        who = f"{strategy.name}: upload from client {u.client!r}"
        if u.num_samples < 0:
            raise StrategyError(f"{who} has a negative sample count {u.num_samples}")
        if u.rank != rank:
            raise StrategyError(f"{who} has rank {u.rank} but this run's LoRA has rank {rank}")
        unknown = sorted(set(u.factors) - known)
        if unknown:
            raise StrategyError(f"{who} names unknown module(s) {unknown}")
        if every_module:
            missing = sorted(known - set(u.factors))
            if missing:
                raise StrategyError(f"{who} lacks module(s) {missing}; {strategy.name} trains every module")
        for module, f in u.factors.items():
            if not math.isclose(float(f.alpha), state["alpha"]):
                raise StrategyError(
                    f"{who}: {module} was trained with alpha {f.alpha} but this run uses alpha "
                    f"{state['alpha']}")
            for which in factors:
                got = tuple(getattr(f, which).shape)
                want = tuple(state[which][module].shape)
                if got != want:
                    raise StrategyError(
                        f"{who}: {which} of {module} has shape {got}, expected {want} (rank {rank})")


def weighted_mean(tensors: Sequence[torch.Tensor], ws: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """sum_k w_k t_k as a new tensor with ``like``'s dtype and device.

    Accumulates in at least float32 so that half-precision uploads do not lose
    precision in the sum."""
    acc_dtype = torch.promote_types(like.dtype, torch.float32)
    out = torch.zeros(like.shape, dtype=acc_dtype, device=like.device)
    for w, t in zip(ws, tensors, strict=True):
        out.add_(t.detach().to(device=like.device, dtype=acc_dtype), alpha=float(w))
    return out.to(like.dtype)


def merge_extra(strategy: Strategy, state: dict, uploads: list[Upload], uniform: bool = False) -> dict:
    """The state's non-LoRA trainables after this round: the mean of the
    uploaded ones (sample-weighted, or uniform over the uploads that carry each
    name); names nobody uploaded keep their previous value."""
    out = {k: clone(v) for k, v in state.get("extra", {}).items()}
    shapes: dict[str, tuple] = {k: tuple(v.shape) for k, v in out.items()}
    for u in uploads:
        for name, t in u.extra.items():
            # Catch mismatches here: the weighted sum would otherwise broadcast silently.
            if shapes.setdefault(name, tuple(t.shape)) != tuple(t.shape):
                raise StrategyError(
                    f"{strategy.name}: upload from client {u.client!r} has extra {name!r} of shape "
                    f"{tuple(t.shape)}, expected {shapes[name]}")
    if uniform:
        # Uniform mean = the sample-weighted mean with every count set to 1.
        uploads = [Upload(u.client, {}, 1, u.rank, u.layers, u.extra) for u in uploads]
    for name, t in average_extra(uploads).items():
        out[name] = t.detach()
    return out


class FedIT(Strategy):
    """FedAvg of A and of B separately, weighted by sample counts.

    Every client trains both factors of every module at one rank and downloads
    the averaged pair and the averaged head. The averaged product is not
    exact: B̄Ā differs from sum p_k B_k A_k, which is what FedEx-LoRA, FLoRA and
    others correct.
    """

    name = "fedit"

    def __init__(self, seed: int = 0):
        # FedIT uses no randomness; ``seed`` is accepted so that every strategy
        # can be built with the same options.
        self.seed = seed

    def init_state(self, initial: dict[str, Factors], clients: list[ClientInfo]) -> dict:
        """State holding a copy of the initial LoRA."""
        return initial_state(self, initial, clients)

    def download(self, state: dict, client: ClientInfo, round_index: int) -> Download:
        """The global A and B of every module, plus the averaged head."""
        check_client(self, state, client)
        modules = client_modules(state, client)
        return Download(
            A={m: clone(state["A"][m]) for m in modules},
            B={m: clone(state["B"][m]) for m in modules},
            rank=state["rank"], alpha=state["alpha"], trainable=TRAIN_BOTH,
            extra=clone_tree(state["extra"]))

    def aggregate(self, state: dict, uploads: list[Upload], round_index: int) -> RoundResult:
        """A <- sum p_k A_k and B <- sum p_k B_k for every module; the head is averaged too."""
        check_uploads(self, state, uploads, FACTOR_NAMES)
        p = weights(uploads)
        new = clone_tree(state)
        for which in FACTOR_NAMES:
            new[which] = {
                m: weighted_mean([getattr(u.factors[m], which) for u in uploads], p, ref)
                for m, ref in state[which].items()}
        new["extra"] = merge_extra(self, state, uploads)
        return RoundResult(state=new)
