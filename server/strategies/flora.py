"""FLoRA: stacking aggregation, merged into the frozen weights every round
(docs/algorithms.md#flora). Per module and round:

    A_stack = [p_1 A_1; ...; p_K A_K]              (Σ r_k x d_in)
    B_stack = [s_1 B_1, ..., s_K B_K]              (d_out x Σ r_k, each client's own s_k = alpha_k / r_k)
    B_stack A_stack = Σ p_k s_k B_k A_k            exactly, with no cross terms

The stacked adapter is merged into the base (W <- W + B_stack A_stack, returned
as ``base_deltas``) and every client starts the next round from a fresh LoRA
(A random, B = 0) at its own rank. A faithful FLoRA would send the stacked
factors, Σ r_k (d_in + d_out) floats per module, instead of the merged weight:
the state records that size.

State layout (every value can be checkpointed):
    {"alpha": float, "shapes": {module: [d_out, d_in]},
     "stacked_rank": int,                 # Σ r_k over the last round's uploads
     "stacked_ranks": {module: int},      # per module (uploads that trained it)
     "download_floats": int,              # Σ over modules of stacked rank x (d_in + d_out)
     "head": {name: tensor}}
"""

from __future__ import annotations

import math

import torch

from split.seeds import generator

from .base import (TRAIN_BOTH, ClientInfo, Download, Factors, GlobalModel, RoundResult, Strategy, StrategyError,
                   Upload)
from .common import (acc_dtype, check_hetero_uploads, client_modules, clone_tree, initial_alpha, initial_shapes,
                     merge_head, module_uploads)
from .products import factor_sum


def stack_factors(ws: list[float], factors: list[Factors], dtype: torch.dtype | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """FLoRA's stacked pair ``(A_stack, B_stack)``: ``A_stack = concat_0(w_k A_k)``,
    ``B_stack = concat_1(s_k B_k)``, so ``B_stack @ A_stack = Σ w_k s_k B_k A_k``.
    New tensors (in at least float32 unless ``dtype`` says otherwise)."""
    if not factors:
        raise StrategyError("flora: nothing to stack")
    dtype = dtype or acc_dtype(factors[0].A.dtype)
    A = torch.cat([f.A.detach().to(dtype) * w for w, f in zip(ws, factors)], dim=0)
    B = torch.cat([f.B.detach().to(dtype) * f.scale for f in factors], dim=1)
    return A, B


class FLoRA(Strategy):
    """FLoRA (Wang et al., NeurIPS 2024): clients of any rank train a fresh LoRA
    each round; the server stacks the factors, which sums the products exactly,
    and merges the sum into the frozen weights.

    ``seed`` seeds the fresh A that ``download`` hands out (Kaiming-uniform, as
    PEFT draws it, per round, client and module).
    """

    name = "flora"
    heterogeneous_ranks = True
    frozen_updates = True
    mixed_alphas = True

    def init_state(self, initial: dict[str, Factors], clients: list[ClientInfo]) -> dict:
        """State with the module shapes; the initial LoRA must be zero (B = 0),
        since FLoRA clients always start from a fresh LoRA on the merged base."""
        self.check(clients)
        alpha, shapes = initial_alpha(self, initial), initial_shapes(self, initial)
        nonzero = sorted(m for m, f in initial.items() if bool(torch.any(f.B != 0)))
        if nonzero:
            raise StrategyError(
                f"{self.name}: the initial LoRA of {nonzero[:3]}{'...' if len(nonzero) > 3 else ''} is not "
                "zero, but FLoRA starts every round from a fresh LoRA on the merged base; merge it into the "
                "base first, or use fedit or flexlora to start from it")
        return {"alpha": alpha, "shapes": shapes, "stacked_rank": 0,
                "stacked_ranks": {m: 0 for m in shapes}, "download_floats": 0, "head": {}}

    def download(self, state: dict, client: ClientInfo, round_index: int) -> Download:
        """A fresh LoRA at the client's rank: A Kaiming-uniform from the seed, B = 0."""
        self.check([client])
        r = int(client.rank)
        if r < 1:
            raise StrategyError(f"{self.name}: client {client.client!r} has rank {r}; ranks start at 1")
        A, B = {}, {}
        for module in client_modules(state["shapes"], client):
            d_out, d_in = state["shapes"][module]
            a = torch.empty(r, d_in)
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5),
                                           generator=generator(self.seed, "fresh", round_index, client.client, module))
            A[module] = a
            B[module] = torch.zeros(d_out, r)
        return Download(A=A, B=B, rank=r, alpha=state["alpha"], trainable=TRAIN_BOTH, fresh=True,
                        head=clone_tree(state["head"]))

    def aggregate(self, state: dict, uploads: list[Upload], round_index: int) -> RoundResult:
        """base_deltas[m] = B_stack @ A_stack = Σ p_k s_k B_k A_k (d_out x d_in)."""
        check_hetero_uploads(self, state["shapes"], uploads)
        deltas, ranks = {}, {}
        for module, (d_out, d_in) in state["shapes"].items():
            ws, factors = module_uploads(uploads, module)
            ranks[module] = sum(f.rank for f in factors)
            if factors:
                # Σ p_k s_k B_k A_k, the product of the stacked pair, formed block by block (products.py).
                deltas[module] = factor_sum([w * f.scale for w, f in zip(ws, factors)], factors,
                                            acc_dtype(factors[0].A.dtype))
        new = {**state,
               "stacked_rank": sum(int(u.rank) for u in uploads),
               "stacked_ranks": ranks,
               "download_floats": sum(ranks[m] * (d_out + d_in) for m, (d_out, d_in) in state["shapes"].items()),
               "head": merge_head(self, state, uploads)}
        return RoundResult(state=clone_tree(new), base_deltas=deltas)

    def export(self, state: dict) -> GlobalModel:
        """Zero factors: every round's update is already in the frozen weights
        (the checkpoint's base delta), and the next round starts from a fresh
        LoRA that adds nothing. The head is the averaged one."""
        shapes = state["shapes"]
        return GlobalModel(A={m: torch.zeros(1, d_in) for m, (_, d_in) in shapes.items()},
                           B={m: torch.zeros(d_out, 1) for m, (d_out, _) in shapes.items()},
                           rank=1, alpha=state["alpha"], head=clone_tree(state["head"]))
