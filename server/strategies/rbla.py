"""RBLA: rank-based LoRA aggregation, each rank slot averaged over its owners only.

(fedlora-algorithms.md, section 11.) Every client's A_k (r_k x d_in) and B_k
(d_out x r_k) is padded to r_max, and each slot i is averaged only over the
clients that own it (r_k > i), with the sample weights renormalised per slot:

    A_g[i, :] = sum_{k: r_k > i} p_k A_k[i, :] / sum_{k: r_k > i} p_k
    B_g[:, i] = sum_{k: r_k > i} p_k B_k[:, i] / sum_{k: r_k > i} p_k

and client k downloads A_g[:r_k], B_g[:, :r_k]. With equal ranks this is
FedIT (sum p_k A_k, sum p_k B_k); unlike zero-padding, the high-rank slots are
not diluted by the clients that lack them.

Choices the notes leave open: a slot that no upload owns keeps its previous
value (its average is 0/0), and each module is averaged over the uploads that
contain it, so clients may hold block subsets. Factors are averaged as they
are, without the alpha/r scale; every client trains with the state's alpha.

State layout: as HetLoRA's without "ranks" (hetlora.py):
    {"rank": r_max, "alpha": float, "A": {module: r_max x d_in},
     "B": {module: d_out x r_max}, "extra": {name: tensor}}
"""

from __future__ import annotations

import torch

from .base import ClientInfo, Download, Factors, RoundResult, Strategy, Upload, weights
from .fedit import acc_dtype, clone_tree, download_slots, merge_extra, uploads_by_module
from .hetlora import check_hetero_client, check_hetero_uploads, hetero_initial_state


class RBLA(Strategy):
    """Rank-slot-wise weighted mean over the clients that own each slot.

    Options: ``seed`` is unused, since the method is deterministic.
    """

    name = "rbla"
    heterogeneous_ranks = True
    layer_subsets = True

    def __init__(self, seed: int = 0):
        self.seed = seed

    def init_state(self, initial: dict[str, Factors], clients: list[ClientInfo]) -> dict:
        """The initial LoRA at r_max (the largest rank of the run)."""
        return hetero_initial_state(self, initial, clients)

    def download(self, state: dict, client: ClientInfo, round_index: int) -> Download:
        """A_g[:r_k] and B_g[:, :r_k] of the client's modules, and the head."""
        check_hetero_client(self, state, client)
        return download_slots(state, client, client.rank)

    def aggregate(self, state: dict, uploads: list[Upload], round_index: int) -> RoundResult:
        """Per module and rank slot, the sample-weighted mean over the uploads
        that own the slot; unowned slots and untrained modules keep their value."""
        check_hetero_uploads(self, state, uploads, same_alpha=True)
        new = clone_tree(state)
        r_max = state["rank"]
        for m, have in uploads_by_module(state, uploads):  # a module nobody trained keeps its value
            A_old, B_old = state["A"][m], state["B"][m]
            dtype, dev = acc_dtype(A_old), A_old.device
            p = weights(have)
            A_sum = torch.zeros((r_max, A_old.shape[1]), dtype=dtype, device=dev)
            B_sum = torch.zeros((B_old.shape[0], r_max), dtype=dtype, device=dev)
            # Per-slot total weight of the owners, in float64 so that equal ranks give FedIT's
            # weights back to rounding.
            owners = torch.zeros(r_max, dtype=torch.float64)
            for pk, u in zip(p, have):
                f = u.factors[m]
                r = f.A.shape[0]
                A_sum[:r].add_(f.A.detach().to(device=dev, dtype=dtype), alpha=pk)
                B_sum[:, :r].add_(f.B.detach().to(device=dev, dtype=dtype), alpha=pk)
                owners[:r] += pk
            owned = owners > 0
            denom = torch.where(owned, owners, torch.ones_like(owners)).to(device=dev, dtype=dtype)
            owned = owned.to(dev)
            A_new = torch.where(owned[:, None], A_sum / denom[:, None], A_old.to(dtype))
            B_new = torch.where(owned[None, :], B_sum / denom[None, :], B_old.to(dtype))
            new["A"][m] = A_new.to(A_old.dtype)
            new["B"][m] = B_new.to(B_old.dtype)
        new["extra"] = merge_extra(self, state, uploads)
        return RoundResult(state=new)
