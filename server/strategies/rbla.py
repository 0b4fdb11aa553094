"""RBLA: rank-based LoRA aggregation, each rank slot averaged over its owners
only (docs/algorithms.md#rbla). Every client's A_k (r_k x d_in) and B_k
(d_out x r_k) is padded to r_max, and each slot i is averaged only over the
clients that own it (r_k > i), with the sample weights renormalised per slot:

    A_g[i, :] = sum_{k: r_k > i} p_k A_k[i, :] / sum_{k: r_k > i} p_k
    B_g[:, i] = sum_{k: r_k > i} p_k B_k[:, i] / sum_{k: r_k > i} p_k

and client k downloads A_g[:r_k], B_g[:, :r_k]. With equal ranks this is
FedIT (sum p_k A_k, sum p_k B_k); unlike zero-padding, the high-rank slots are
not diluted by the clients that lack them.

Choices the paper leaves open: a slot that no upload owns keeps its previous
value (its average is 0/0), and each module is averaged over the uploads that
contain it, so clients may hold block subsets. Factors are averaged as they
are, without the alpha/r scale; every client trains with the state's alpha.

State: the slot layout (common.py) at r_max.
"""

from __future__ import annotations

import torch

from .base import ClientInfo, Download, Factors, GlobalModel, RoundResult, Strategy, Upload
from .common import (acc_dtype, check_hetero_client, check_hetero_uploads, clone_tree, download_slots,
                     export_slots, hetero_initial_state, merge_head, slot_shapes, uploads_by_module, weights)


class RBLA(Strategy):
    """Rank-slot-wise weighted mean over the clients that own each slot."""

    name = "rbla"
    heterogeneous_ranks = True
    block_subsets = True

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
        check_hetero_uploads(self, slot_shapes(state), uploads, r_max=state["rank"], alpha=state["alpha"])
        new = clone_tree(state)
        r_max = state["rank"]
        for m, have in uploads_by_module(state["A"], uploads):  # a module nobody trained keeps its value
            A_old, B_old = state["A"][m], state["B"][m]
            dtype, dev = acc_dtype(A_old.dtype), A_old.device
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
        new["head"] = merge_head(self, state, uploads)
        return RoundResult(state=new)

    def export(self, state: dict) -> GlobalModel:
        """A_g and B_g at r_max, and the head."""
        return export_slots(state)
