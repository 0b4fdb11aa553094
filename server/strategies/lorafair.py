"""LoRA-FAIR: FedAvg of A and B plus a server-side correction of B
(docs/algorithms.md#lorafair). Per module and round, with one rank:

    Ā = Σ p_k A_k,   B̄ = Σ p_k B_k,   ΔW = Σ p_k B_k A_k   (the ideal update)
    ΔB* = argmin_ΔB  1 − cos(vec ΔW, vec((B̄ + ΔB) Ā)) + λ ||ΔB||_F
    clients download Ā and B̄' = B̄ + ΔB*  (W0 unchanged; communication as FedIT)

The problem is solved with a few deterministic Adam steps from ΔB = 0. The
cosine needs only d_out x r quantities: with C = ΔW Āᵀ and G = Ā Āᵀ,
<ΔW, B'Ā> = <C, B'> and ||B'Ā||² = <B'G, B'>, so a step never forms a
d_out x d_in product.

The penalty λ||ΔB||_F is not differentiable at ΔB = 0, and Adam's normalised
steps never let a subgradient settle there: ΔB would keep oscillating at the
size of the learning rate however large λ is. It is therefore applied as its
proximal step (group soft-thresholding of ΔB) after each Adam step, in Adam's
scale (the step lr divided by the root mean of Adam's second moment). With
that, λ at or above the cosine's gradient norm gives ΔB = 0 exactly (FedIT),
and λ = 0 is plain Adam on the cosine.

State layout: FedIT's (A holds Ā, B holds B̄') plus the cosine reached:
     "cosine": {module: float}      # cos(ΔW, B̄'Ā) of the last round
"""

from __future__ import annotations

import math

import torch

from .base import ClientInfo, Factors, RoundResult, StrategyError, Upload
from .common import FACTOR_NAMES, check_uploads, clone_tree, initial_state, merge_head, weighted_mean, weights
from .fedit import FedIT
from .products import factor_sum, matmul


def cosine(delta_w: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> float:
    """cos(vec ΔW, vec(B A)), 0 when either is zero (computed densely; for reporting)."""
    dtype = torch.promote_types(B.dtype, torch.float32)
    X, Y = delta_w.to(dtype).flatten(), (B.to(dtype) @ A.to(dtype)).flatten()
    den = X.norm() * Y.norm()
    return float((X @ Y) / den) if den > 0 else 0.0


def _check_options(lam: float, steps: int, lr: float) -> None:
    if not (lam >= 0 and steps >= 0 and lr > 0):
        raise StrategyError(f"lorafair: needs lam >= 0, steps >= 0 and lr > 0 (got {lam}, {steps}, {lr})")


def solve(C: torch.Tensor, G: torch.Tensor, B: torch.Tensor, norm_w: torch.Tensor, lam: float, steps: int,
          lr: float) -> torch.Tensor:
    """ΔB for a batch of modules of one shape: ``C`` (n x d_out x r) = ΔW Āᵀ,
    ``G`` (n x r x r) = Ā Āᵀ, ``B`` (n x d_out x r) = B̄, ``norm_w`` (n) = ||ΔW||_F,
    all nonzero. Adam acts elementwise, so one solve over the batch gives each
    module exactly the steps it would get alone; the loss is their sum."""
    tiny = torch.finfo(B.dtype).tiny
    dB = torch.zeros_like(B, requires_grad=True)
    opt = torch.optim.Adam([dB], lr=lr)
    beta2, eps = opt.param_groups[0]["betas"][1], opt.param_groups[0]["eps"]
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            Bp = B + dB
            sq = (torch.bmm(Bp, G) * Bp).sum(dim=(1, 2)).clamp_min(tiny)  # ||B'Ā||² per module
            cos = (C * Bp).sum(dim=(1, 2)) / (norm_w * sq.sqrt())
            (1 - cos).sum().backward()
            opt.step()
            if lam > 0:
                with torch.no_grad():
                    st = opt.state[dB]
                    v_hat = st["exp_avg_sq"] / (1 - beta2 ** float(st["step"]))
                    # Group soft-threshold per module at lr * lam / d, d = Adam's
                    # scalar scale (root mean second moment) for that module.
                    d = v_hat.mean(dim=(1, 2)).sqrt() + eps
                    n = dB.norm(dim=(1, 2))
                    if math.isinf(lam):
                        keep = torch.zeros_like(n)
                    else:
                        keep = (1 - lr * lam / (d * n.clamp_min(tiny))).clamp_min(0)
                    dB.mul_(keep[:, None, None])
    return dB.detach()


def fair_correction(delta_w: torch.Tensor, A_bar: torch.Tensor, B_bar: torch.Tensor, lam: float = 0.01,
                    steps: int = 100, lr: float = 1e-4) -> torch.Tensor:
    """ΔB* ≈ argmin 1 − cos(ΔW, (B̄ + ΔB) Ā) + lam ||ΔB||_F for one module, by
    ``steps`` Adam steps from ΔB = 0 with the penalty as a proximal step
    (module docstring). Returns a new d_out x r tensor in at least float32;
    inputs are untouched. ΔB = 0 when ΔW = 0 or Ā = 0 (nothing to align)."""
    _check_options(lam, steps, lr)
    dtype = torch.promote_types(B_bar.dtype, torch.float32)
    W, A, B = (t.detach().to(dtype) for t in (delta_w, A_bar, B_bar))
    norm_w = W.norm()
    if steps == 0 or norm_w == 0 or not bool(torch.any(A != 0)):
        return torch.zeros_like(B)
    return solve((W @ A.T)[None], (A @ A.T)[None], B[None], norm_w[None], lam, steps, lr)[0]


class LoRAFAIR(FedIT):
    """LoRA-FAIR (Bian et al., ICCV 2025): FedIT plus a correction ΔB that turns
    B̄Ā towards the ideal Σ p_k B_k A_k in direction, at the cost of a few
    server-side optimiser steps. One rank for every client.

    Options: ``lam`` (λ, default 0.01), ``steps`` and ``lr`` of the Adam solve
    (``lr`` is Adam's absolute step: each ΔB entry moves by about ``lr`` per
    step). The solve is deterministic and draws nothing.
    """

    name = "lorafair"

    def __init__(self, lam: float = 0.01, steps: int = 100, lr: float = 1e-4, seed: int = 0):
        super().__init__(seed)
        _check_options(lam, steps, lr)
        self.lam, self.steps, self.lr = float(lam), int(steps), float(lr)

    def init_state(self, initial: dict[str, Factors], clients: list[ClientInfo]) -> dict:
        """State holding a copy of the initial LoRA at the one rank."""
        state = initial_state(self, initial, clients)
        state["cosine"] = {}
        return state

    def aggregate(self, state: dict, uploads: list[Upload], round_index: int) -> RoundResult:
        """Ā, B̄ per module, then B̄' = B̄ + ΔB* from the cosine solve (modules of
        one shape solved together; see ``solve``)."""
        check_uploads(self, state, uploads, FACTOR_NAMES)
        p = weights(uploads)
        new = clone_tree(state)
        bars, problems = {}, {}
        for m in state["A"]:
            factors = [u.factors[m] for u in uploads]
            dtype = torch.promote_types(state["B"][m].dtype, torch.float32)
            A_bar = weighted_mean([f.A for f in factors], p, state["A"][m].to(dtype))
            B_bar = weighted_mean([f.B for f in factors], p, state["B"][m].to(dtype))
            # s ΔW as one stacked product; the cosine is blind to the common scale s.
            delta_w = factor_sum([pk * f.scale for pk, f in zip(p, factors)], factors, dtype)
            bars[m] = (A_bar, B_bar)
            # Only d_out x r quantities are needed from here on: C = ΔW Āᵀ, G = ĀĀᵀ, ||ΔW||.
            problems[m] = (matmul(delta_w, A_bar.T), A_bar @ A_bar.T, delta_w.norm())
        corrections = {m: torch.zeros_like(bars[m][1]) for m in bars}
        groups: dict[tuple, list[str]] = {}
        for m, (C, G, norm_w) in problems.items():
            if self.steps and norm_w > 0 and bool(torch.any(G != 0)):
                groups.setdefault((tuple(C.shape), C.dtype, C.device), []).append(m)
        for group in groups.values():
            dB = solve(torch.stack([problems[m][0] for m in group]), torch.stack([problems[m][1] for m in group]),
                       torch.stack([bars[m][1] for m in group]), torch.stack([problems[m][2] for m in group]),
                       self.lam, self.steps, self.lr)
            for m, d in zip(group, dB):
                corrections[m] = d
        new["cosine"] = {}
        for m, (A_bar, B_bar) in bars.items():
            new["A"][m] = A_bar.to(state["A"][m].dtype)
            new["B"][m] = (B_bar + corrections[m]).to(state["B"][m].dtype)
            C, G, norm_w = problems[m]
            Bp = new["B"][m].to(C.dtype)
            den = norm_w * ((Bp @ G) * Bp).sum().clamp_min(0).sqrt()
            new["cosine"][m] = float((C * Bp).sum() / den) if den > 0 else 0.0
        new["head"] = merge_head(self, state, uploads)
        return RoundResult(state=new)
