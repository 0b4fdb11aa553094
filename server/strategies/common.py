"""Helpers that several strategies share: weights and means that never touch
their inputs, state construction, validation of initial LoRA, clients and
uploads, and downloads of rank slots.

Two state layouts recur (docs/algorithms.md):

- slot layout (FedIT, FFA-LoRA, RoLoRA, LayerMean, FedEx-LoRA, LoRA-FAIR at one
  rank; HetLoRA, RBLA, rank clustering at r_max)::

      {"rank": int, "alpha": float,
       "A": {module: r x d_in}, "B": {module: d_out x r},
       "head": {name: tensor}}

- shape layout (FlexLoRA, FLoRA): ``{"alpha", "shapes": {module: [d_out, d_in]}, ...}``.

Every value is a tensor, a dict with string keys, or a JSON-plain value, so a
state can be checkpointed as it is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from split.families import block_of

from .base import TRAIN_BOTH, ClientInfo, Download, Factors, GlobalModel, Strategy, StrategyError, Upload

FACTOR_NAMES = ("A", "B")


# ----------------------------------------------------------------- copies and means

def clone(t: torch.Tensor) -> torch.Tensor:
    """A detached copy, so that state never aliases a caller's tensor."""
    return t.detach().clone()


def clone_tree(value):
    """Copy a state value: tensors are cloned, dicts and lists are copied
    recursively, and anything else (JSON-plain values) is returned as it is."""
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


def weights(uploads: list[Upload]) -> list[float]:
    """Sample-count weights p_k = n_k / sum n_j."""
    total = sum(u.num_samples for u in uploads)
    if total <= 0:
        raise StrategyError("uploads carry no samples: every num_samples is 0")
    return [u.num_samples / total for u in uploads]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32, so that half-precision uploads keep their precision in sums."""
    return torch.promote_types(dtype, torch.float32)


def weighted_mean(tensors: Sequence[torch.Tensor], ws: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """sum_k w_k t_k as a new tensor with ``like``'s dtype and device,
    accumulated in at least float32."""
    dtype = acc_dtype(like.dtype)
    out = torch.zeros(like.shape, dtype=dtype, device=like.device)
    for w, t in zip(ws, tensors, strict=True):
        out.add_(t.detach().to(device=like.device, dtype=dtype), alpha=float(w))
    return out.to(like.dtype)


def mean_factor(state: dict, uploads: list[Upload], which: str, ws: Sequence[float]) -> dict[str, torch.Tensor]:
    """{module: sum_k w_k <which>_k} for every module of the state's factor ``which`` ("A" or "B")."""
    return {m: weighted_mean([getattr(u.factors[m], which) for u in uploads], ws, ref)
            for m, ref in state[which].items()}


def uploads_by_module(modules: Iterable[str], uploads: list[Upload]):
    """(module, the uploads that contain it) for each of ``modules`` that some
    upload trained, in order; a module nobody trained is left out (it keeps
    its value)."""
    for m in modules:
        have = [u for u in uploads if m in u.factors]
        if have:
            yield m, have


def module_uploads(uploads: list[Upload], module: str) -> tuple[list[float], list[Factors]]:
    """The uploads that trained ``module``, with sample weights renormalised over them."""
    have = [u for u in uploads if module in u.factors]
    if not have:
        return [], []
    return weights(have), [u.factors[module] for u in have]


def stacked(ws: Sequence[float], factors: list[Factors], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``L = [w_1 s_1 B_1, ..., w_K s_K B_K]`` (d_out x sum r) and ``R = [A_1; ...; A_K]``
    (sum r x d_in), so that ``L @ R = sum_k w_k s_k B_k A_k``: the mean of the
    clients' updates as one product. New tensors; inputs untouched."""
    # One cat and one column scaling rather than K small products: with many
    # clients the per-op overhead otherwise rivals the matmul that follows.
    col = torch.tensor([w * f.scale for w, f in zip(ws, factors)], dtype=dtype)
    col = col.repeat_interleave(torch.tensor([f.rank for f in factors]))
    L = torch.cat([f.B.detach() for f in factors], dim=1).to(dtype) * col.to(factors[0].B.device)
    R = torch.cat([f.A.detach() for f in factors], dim=0).to(dtype)
    return L, R


def merge_head(strategy: Strategy, state: dict, uploads: list[Upload], uniform: bool = False) -> dict:
    """The state's head after this round: per name, the mean over the uploads
    that carry it (sample-weighted, or uniform); names nobody uploaded keep
    their previous value."""
    out = {k: clone(v) for k, v in state.get("head", {}).items()}
    shapes: dict[str, tuple] = {k: tuple(v.shape) for k, v in out.items()}
    for u in uploads:
        for name, t in u.head.items():
            # Caught here: the weighted sum would otherwise broadcast silently.
            if shapes.setdefault(name, tuple(t.shape)) != tuple(t.shape):
                raise StrategyError(
                    f"{strategy.name}: upload from client {u.client!r} has head tensor {name!r} of shape "
                    f"{tuple(t.shape)}, expected {shapes[name]}")
    for name in sorted(shapes):
        have = [u for u in uploads if name in u.head]
        if not have:
            continue
        ws = [1.0 / len(have)] * len(have) if uniform else weights(have)
        out[name] = weighted_mean([u.head[name] for u in have], ws, have[0].head[name])
    return out


# ----------------------------------------------------------------- state

def initial_alpha(strategy: Strategy, initial: dict[str, Factors]) -> float:
    """The one alpha of the initial LoRA; refuses an initial LoRA with no
    modules, or one that mixes alphas across modules."""
    if not initial:
        raise StrategyError(f"{strategy.name}: the initial LoRA has no modules")
    alphas = sorted({float(f.alpha) for f in initial.values()})
    if len(alphas) > 1:
        raise StrategyError(f"{strategy.name}: the initial LoRA mixes alphas {alphas} across modules")
    return alphas[0]


def initial_rank_alpha(strategy: Strategy, initial: dict[str, Factors]) -> tuple[int, float]:
    """The one rank and the one alpha of the initial LoRA (``initial_alpha``),
    refusing one that mixes ranks across modules."""
    alpha = initial_alpha(strategy, initial)
    ranks = sorted({f.rank for f in initial.values()})
    if len(ranks) > 1:
        raise StrategyError(f"{strategy.name}: the initial LoRA mixes ranks {ranks} across modules")
    return ranks[0], alpha


def initial_shapes(strategy: Strategy, initial: dict[str, Factors]) -> dict[str, list[int]]:
    """``{module: [d_out, d_in]}`` of an initial LoRA whose every pair is
    A (r x d_in), B (d_out x r); refuses anything else."""
    shapes = {}
    for module, f in initial.items():
        if f.A.dim() != 2 or f.B.dim() != 2 or f.B.shape[1] != f.A.shape[0]:
            raise StrategyError(
                f"{strategy.name}: initial factors of {module} have shapes A {tuple(f.A.shape)}, "
                f"B {tuple(f.B.shape)}; expected A r x d_in and B d_out x r")
        shapes[module] = [int(f.B.shape[0]), int(f.A.shape[1])]
    return shapes


def slot_state(strategy: Strategy, initial: dict[str, Factors]) -> dict:
    """A slot-layout state holding a copy of the initial LoRA, with no head yet."""
    initial_shapes(strategy, initial)
    rank, alpha = initial_rank_alpha(strategy, initial)
    return {
        "rank": rank,
        "alpha": alpha,
        "A": {m: clone(f.A) for m, f in initial.items()},
        "B": {m: clone(f.B) for m, f in initial.items()},
        "head": {},
    }


def initial_state(strategy: Strategy, initial: dict[str, Factors], clients: list[ClientInfo]) -> dict:
    """The state before round 0 of a one-rank method: the initial global LoRA
    at the rank every client trains."""
    strategy.check(clients)
    state = slot_state(strategy, initial)
    client_ranks = sorted({c.rank for c in clients})
    if client_ranks and client_ranks != [state["rank"]]:
        raise StrategyError(
            f"{strategy.name}: the initial LoRA has rank {state['rank']} but the clients train rank "
            f"{client_ranks[0]}")
    return state


def hetero_initial_state(strategy: Strategy, initial: dict[str, Factors], clients: list[ClientInfo]) -> dict:
    """The state before round 0 of a mixed-rank slot method: the initial global
    LoRA at r_max (its rank), which no client's rank may exceed."""
    strategy.check(clients)
    state = slot_state(strategy, initial)
    r_max = state["rank"]
    dupes = repeated([c.client for c in clients])
    if dupes:
        raise StrategyError(f"{strategy.name}: client(s) {dupes} listed more than once")
    for c in clients:
        if not 1 <= c.rank <= r_max:
            raise StrategyError(
                f"{strategy.name}: client {c.client!r} trains rank {c.rank}, outside 1..{r_max} (the initial "
                f"LoRA's rank, which is the largest rank of the run)")
    return state


def slot_shapes(state: dict) -> dict[str, list[int]]:
    """``{module: [d_out, d_in]}`` of a slot-layout state."""
    return {m: [int(state["B"][m].shape[0]), int(a.shape[1])] for m, a in state["A"].items()}


def export_slots(state: dict) -> GlobalModel:
    """The global model of a slot-layout state: copies of its A and B (none
    where the state keeps no global B) at the state's rank, and its head."""
    return GlobalModel(A=clone_tree(state["A"]), B=clone_tree(state.get("B", {})), rank=state["rank"],
                       alpha=state["alpha"], head=clone_tree(state["head"]))


# ----------------------------------------------------------------- clients and downloads

def check_client(strategy: Strategy, state: dict, client: ClientInfo) -> None:
    """Refuse a download for a client the one-rank state does not fit."""
    strategy.check([client])
    if client.rank != state["rank"]:
        raise StrategyError(
            f"{strategy.name}: client {client.client!r} trains rank {client.rank} but this run's "
            f"LoRA has rank {state['rank']}")


def check_hetero_client(strategy: Strategy, state: dict, client: ClientInfo) -> None:
    """Refuse a download for a client whose rank does not fit a mixed-rank slot state."""
    strategy.check([client])
    if not 1 <= client.rank <= state["rank"]:
        raise StrategyError(
            f"{strategy.name}: client {client.client!r} trains rank {client.rank}, outside "
            f"1..{state['rank']} (this run's largest rank)")


def client_modules(modules: Iterable[str], client: ClientInfo) -> list[str]:
    """The modules a client holds: all of them when ``client.blocks`` is None,
    otherwise those in its blocks (modules outside every block go to every
    client)."""
    if client.blocks is None:
        return list(modules)
    return [m for m in modules if block_of(m) is None or block_of(m) in client.blocks]


def download_slots(state: dict, client: ClientInfo, rank: int, **fields) -> Download:
    """What a client that trains both factors downloads: copies of the first
    ``rank`` slots of the global A and B of its modules, and the head.
    ``fields`` are further ``Download`` fields (``options``)."""
    modules = client_modules(state["A"], client)
    return Download(
        A={m: clone(state["A"][m][:rank]) for m in modules},
        B={m: clone(state["B"][m][:, :rank]) for m in modules},
        rank=rank, alpha=state["alpha"], trainable=TRAIN_BOTH,
        head=clone_tree(state["head"]), **fields)


# ----------------------------------------------------------------- uploads

def outside_blocks(upload: Upload) -> list[str]:
    """The modules of an upload that lie outside its blocks, sorted (none when
    the upload names no blocks; modules outside every block are never outside)."""
    if upload.blocks is None:
        return []
    return sorted(m for m in upload.factors if block_of(m) is not None and block_of(m) not in upload.blocks)


def check_upload_basics(strategy: Strategy, known: Iterable[str], uploads: list[Upload]) -> None:
    """What every strategy refuses: an empty round, more than one upload from
    a client, a negative sample count, modules the state does not know, block
    subsets the method does not take, and modules outside an upload's blocks."""
    if not uploads:
        raise StrategyError(f"{strategy.name}: no uploads to aggregate")
    dupes = repeated([u.client for u in uploads])
    if dupes:
        raise StrategyError(f"{strategy.name}: more than one upload from client(s) {dupes}")
    known = set(known)
    for u in uploads:
        who = f"{strategy.name}: upload from client {u.client!r}"
        if u.num_samples < 0:
            raise StrategyError(f"{who} has a negative sample count {u.num_samples}")
        unknown = sorted(set(u.factors) - known)
        if unknown:
            raise StrategyError(f"{who} names unknown module(s) {unknown}")
        if u.blocks is not None and not strategy.block_subsets:
            strategy.refuse_block_subsets(f"{who} trained only blocks {sorted(u.blocks)}")
        outside = outside_blocks(u)
        if outside:
            raise StrategyError(f"{who} contains module(s) {outside} outside its blocks {sorted(u.blocks)}")


def check_alpha(strategy: Strategy, upload: Upload, module: str, f: Factors, alpha: float) -> None:
    """Refuse a factor pair trained with another alpha than the run's."""
    if not math.isclose(float(f.alpha), alpha):
        raise StrategyError(
            f"{strategy.name}: upload from client {upload.client!r}: {module} was trained with alpha "
            f"{f.alpha} but this run uses alpha {alpha}")


def check_uploads(strategy: Strategy, state: dict, uploads: list[Upload], factors: Iterable[str],
                  every_module: bool = True) -> None:
    """Refuse uploads that do not fit a one-rank slot state.

    ``factors`` are the factors that this round aggregates (only their shapes
    are checked, since a client may send a frozen or a local factor in any
    form). With ``every_module`` each upload must cover every module."""
    check_upload_basics(strategy, state["A"], uploads)
    known = set(state["A"])
    rank = state["rank"]
    for u in uploads:
        who = f"{strategy.name}: upload from client {u.client!r}"
        if u.rank != rank:
            raise StrategyError(f"{who} has rank {u.rank} but this run's LoRA has rank {rank}")
        if every_module:
            missing = sorted(known - set(u.factors))
            if missing:
                raise StrategyError(f"{who} lacks module(s) {missing}; {strategy.name} trains every module")
        for module, f in u.factors.items():
            check_alpha(strategy, u, module, f, state["alpha"])
            for which in factors:
                got = tuple(getattr(f, which).shape)
                want = tuple(state[which][module].shape)
                if got != want:
                    raise StrategyError(
                        f"{who}: {which} of {module} has shape {got}, expected {want} (rank {rank})")


def check_hetero_uploads(strategy: Strategy, shapes: dict[str, list[int]], uploads: list[Upload], *,
                         r_max: int | None = None, alpha: float | None = None, truncated: bool = False) -> None:
    """Refuse uploads a mixed-rank method cannot combine.

    Each pair must be A (r x d_in), B (d_out x r) with the module's widths and
    r equal to the upload's rank (with ``truncated``, at least that rank: the
    tail beyond it has been pruned). With ``r_max`` the rank must lie in
    1..r_max; with ``alpha`` every pair must carry that alpha (methods that
    average raw factors)."""
    check_upload_basics(strategy, shapes, uploads)
    for u in uploads:
        who = f"{strategy.name}: upload from client {u.client!r}"
        if u.rank < 1:
            raise StrategyError(f"{who} has rank {u.rank}; ranks start at 1")
        if r_max is not None and u.rank > r_max:
            raise StrategyError(f"{who} has rank {u.rank}, outside 1..{r_max} (this run's largest rank)")
        for module, f in u.factors.items():
            d_out, d_in = shapes[module]
            r = f.A.shape[0] if f.A.dim() == 2 else -1
            if f.A.dim() != 2 or f.B.dim() != 2 or f.A.shape[1] != d_in or tuple(f.B.shape) != (d_out, r):
                raise StrategyError(
                    f"{who}: {module} has A {tuple(f.A.shape)}, B {tuple(f.B.shape)}; expected "
                    f"A r x {d_in} and B {d_out} x r for its rank {u.rank}")
            if (r < u.rank) if truncated else (r != u.rank):
                raise StrategyError(f"{who}: {module} has rank {r} but the upload says rank {u.rank}")
            if alpha is not None:
                check_alpha(strategy, u, module, f, alpha)
