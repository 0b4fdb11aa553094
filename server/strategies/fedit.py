"""FedIT: plain FedAvg of the LoRA factors, A and B averaged separately.

    A <- sum_k p_k A_k,   B <- sum_k p_k B_k,   p_k = n_k / sum_j n_j

(fedlora-algorithms.md, "Common notation"). Every client trains every LoRA
module at one shared rank.

This module also holds the helpers that the other strategies share (the
homogeneous-rank ones, FFA-LoRA, RoLoRA, FedSA-LoRA and LayerMean, use most of
them; HetLoRA, RBLA and rank clustering some). They build and check the state,
check uploads, build downloads, and compute weighted means without touching
their inputs.

State layout (every value can be checkpointed):
    {"rank": int, "alpha": float,
     "A": {module: r x d_in}, "B": {module: d_out x r},
     "extra": {name: tensor}}        # averaged non-LoRA trainables (a head)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from split.families import block_of

from .base import (TRAIN_BOTH, ClientInfo, Download, Factors, RoundResult, Strategy, StrategyError,
                   Upload, average_extra, weights)

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


def repeated(names: Sequence[str]) -> list[str]:
    """The names that occur more than once, sorted."""
    return sorted({n for n in names if names.count(n) > 1})


def initial_rank_alpha(strategy: Strategy, initial: dict[str, Factors]) -> tuple[int, float]:
    """The one rank and the one alpha of the initial LoRA; refuses an initial
    LoRA with no modules, or one that mixes ranks or alphas across modules."""
    if not initial:
        raise StrategyError(f"{strategy.name}: the initial LoRA has no modules")
    ranks = sorted({f.rank for f in initial.values()})
    if len(ranks) > 1:
        raise StrategyError(f"{strategy.name}: the initial LoRA mixes ranks {ranks} across modules")
    alphas = sorted({float(f.alpha) for f in initial.values()})
    if len(alphas) > 1:
        raise StrategyError(f"{strategy.name}: the initial LoRA mixes alphas {alphas} across modules")
    return ranks[0], alphas[0]


def check_initial_shapes(strategy: Strategy, initial: dict[str, Factors]) -> None:
    """Refuse initial factors that are not a pair A (r x d_in), B (d_out x r)."""
    for module, f in initial.items():
        if f.A.dim() != 2 or f.B.dim() != 2 or f.B.shape[1] != f.A.shape[0]:
            raise StrategyError(
                f"{strategy.name}: initial factors of {module} have shapes A {tuple(f.A.shape)}, "
                f"B {tuple(f.B.shape)}; expected A r x d_in and B d_out x r")


def lora_state(initial: dict[str, Factors], rank: int, alpha: float) -> dict:
    """A state holding a copy of the initial LoRA at ``rank``, with no head yet."""
    return {
        "rank": rank,
        "alpha": alpha,
        "A": {m: clone(f.A) for m, f in initial.items()},
        "B": {m: clone(f.B) for m, f in initial.items()},
        "extra": {},
    }


def initial_state(strategy: Strategy, initial: dict[str, Factors], clients: list[ClientInfo]) -> dict:
    """The shared state before round 0: the initial global LoRA at the one rank
    that every client trains. Refuses client sets that ``strategy`` does not
    define, as well as an initial LoRA that is inconsistent."""
    strategy.check(clients)
    rank, alpha = initial_rank_alpha(strategy, initial)
    check_initial_shapes(strategy, initial)
    client_ranks = sorted({c.rank for c in clients})
    if client_ranks and client_ranks != [rank]:
        raise StrategyError(
            f"{strategy.name}: the initial LoRA has rank {rank} but the clients train rank "
            f"{client_ranks[0]}")
    return lora_state(initial, rank, alpha)


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


def download_slots(state: dict, client: ClientInfo, rank: int, **fields) -> Download:
    """What a client that trains both factors downloads: copies of the first
    ``rank`` slots of the global A and B of its modules (``client_modules``),
    and the head. ``fields`` are further ``Download`` fields (``options``)."""
    modules = client_modules(state, client)
    return Download(
        A={m: clone(state["A"][m][:rank]) for m in modules},
        B={m: clone(state["B"][m][:, :rank]) for m in modules},
        rank=rank, alpha=state["alpha"], trainable=TRAIN_BOTH,
        extra=clone_tree(state["extra"]), **fields)


def outside_blocks(upload: Upload) -> list[str]:
    """The modules of an upload that lie outside its blocks, sorted (none when
    the upload names no blocks; modules outside every block are never outside)."""
    if upload.layers is None:
        return []
    return sorted(m for m in upload.factors if block_of(m) is not None and block_of(m) not in upload.layers)


def check_upload_clients(strategy: Strategy, uploads: list[Upload]) -> None:
    """Refuse an empty round and more than one upload from a client."""
    if not uploads:
        raise StrategyError(f"{strategy.name}: no uploads to aggregate")
    dupes = repeated([u.client for u in uploads])
    if dupes:
        raise StrategyError(f"{strategy.name}: more than one upload from client(s) {dupes}")


def check_uploads(strategy: Strategy, state: dict, uploads: list[Upload], factors: Iterable[str],
                  every_module: bool = True) -> None:
    """Refuse uploads that do not fit the state.

    ``factors`` are the factors that this round aggregates (only their shapes
    are checked, since a client may send a frozen or a local factor in any
    form). With ``every_module`` each upload must cover every module."""
    check_upload_clients(strategy, uploads)
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


def acc_dtype(like: torch.Tensor) -> torch.dtype:
    """Accumulate in at least float32 so half-precision uploads keep their precision."""
    return torch.promote_types(like.dtype, torch.float32)


def weighted_mean(tensors: Sequence[torch.Tensor], ws: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """sum_k w_k t_k as a new tensor with ``like``'s dtype and device.

    Accumulates in at least float32 so that half-precision uploads do not lose
    precision in the sum."""
    dtype = acc_dtype(like)
    out = torch.zeros(like.shape, dtype=dtype, device=like.device)
    for w, t in zip(ws, tensors, strict=True):
        out.add_(t.detach().to(device=like.device, dtype=dtype), alpha=float(w))
    return out.to(like.dtype)


def mean_factor(state: dict, uploads: list[Upload], which: str, ws: Sequence[float]) -> dict[str, torch.Tensor]:
    """{module: sum_k w_k <which>_k} for every module of the state's factor ``which`` ("A" or "B")."""
    return {m: weighted_mean([getattr(u.factors[m], which) for u in uploads], ws, ref)
            for m, ref in state[which].items()}


def uploads_by_module(state: dict, uploads: list[Upload]):
    """(module, the uploads that contain it) for each module of the state that
    some upload trained, in the state's order; a module nobody trained is
    left out (it keeps its value)."""
    for m in state["A"]:
        have = [u for u in uploads if m in u.factors]
        if have:
            yield m, have


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
        return download_slots(state, client, state["rank"])

    def aggregate(self, state: dict, uploads: list[Upload], round_index: int) -> RoundResult:
        """A <- sum p_k A_k and B <- sum p_k B_k for every module; the head is averaged too."""
        check_uploads(self, state, uploads, FACTOR_NAMES)
        p = weights(uploads)
        new = clone_tree(state)
        for which in FACTOR_NAMES:
            new[which] = mean_factor(state, uploads, which, p)
        new["extra"] = merge_extra(self, state, uploads)
        return RoundResult(state=new)
