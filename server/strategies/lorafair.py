"""LoRA-FAIR: FedAvg of A and B plus a server-side correction of B.

Per module and round (fedlora-algorithms.md, section 10), with one rank:

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

State layout: the FedIT layout (``fedit.py``) plus the cosine reached:
    {"rank", "alpha", "A": {module: Ā}, "B": {module: B̄'}, "extra": {...},
     "cosine": {module: float}}      # cos(ΔW, B̄'Ā) of the last round
"""

from __future__ import annotations

import math

import torch

from .base import TRAIN_BOTH, ClientInfo, Download, Factors, RoundResult, Strategy, StrategyError, Upload, weights
from .fedit import (FACTOR_NAMES, check_client, check_uploads, client_modules, clone, clone_tree,
                    initial_state, merge_extra, weighted_mean)


def cosine(delta_w: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> float:
    """cos(vec ΔW, vec(B A)), 0 when either is zero (computed densely; for reporting)."""
    dtype = torch.promote_types(B.dtype, torch.float32)
    X, Y = delta_w.to(dtype).flatten(), (B.to(dtype) @ A.to(dtype)).flatten()
    den = X.norm() * Y.norm()
    return float((X @ Y) / den) if den > 0 else 0.0


def fair_correction(delta_w: torch.Tensor, A_bar: torch.Tensor, B_bar: torch.Tensor, lam: float = 0.01,
                    steps: int = 100, lr: float = 1e-4) -> torch.Tensor:
    """ΔB* ≈ argmin 1 − cos(ΔW, (B̄ + ΔB) Ā) + lam ||ΔB||_F by ``steps`` Adam
    steps from ΔB = 0, the penalty as a proximal step (module docstring).
    Returns a new d_out x r tensor (in at least float32); inputs are untouched."""
    if lam < 0 or steps < 0 or lr <= 0:
        raise StrategyError(f"lorafair: needs lam >= 0, steps >= 0 and lr > 0 (got {lam}, {steps}, {lr})")
    dtype = torch.promote_types(B_bar.dtype, torch.float32)
    W, A, B = (t.detach().to(dtype) for t in (delta_w, A_bar, B_bar))
    dB = torch.zeros_like(B)
    norm_w = W.norm()
    if steps == 0 or norm_w == 0 or not bool(torch.any(A != 0)):
        return dB  # nothing to align with (no update, or Ā = 0)
    C = W @ A.T  # d_out x r
    G = A @ A.T  # r x r
    tiny = torch.finfo(dtype).tiny

    def loss_of(Bp: torch.Tensor) -> torch.Tensor:
        sq = ((Bp @ G) * Bp).sum().clamp_min(tiny)
        return 1 - (C * Bp).sum() / (norm_w * sq.sqrt())

    dB.requires_grad_(True)
    opt = torch.optim.Adam([dB], lr=lr)
    beta2 = opt.param_groups[0]["betas"][1]
    eps = opt.param_groups[0]["eps"]
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss_of(B + dB).backward()
            opt.step()
            if lam > 0:
                with torch.no_grad():
                    st = opt.state[dB]
                    v_hat = st["exp_avg_sq"] / (1 - beta2 ** float(st["step"]))
                    # Threshold lr * lam / d, d = Adam's scalar scale; lam = inf shrinks to 0.
                    d = float(v_hat.mean().sqrt()) + eps
                    n = float(dB.norm())
                    keep = 0.0 if n == 0 or math.isinf(lam) else max(0.0, 1.0 - lr * lam / (d * n))
                    dB.mul_(keep)
    return dB.detach()


class LoRAFAIR(Strategy):
    """LoRA-FAIR (Bian et al., ICCV 2025): FedIT plus a correction ΔB that turns
    B̄Ā towards the ideal Σ p_k B_k A_k in direction, at the cost of a few
    server-side optimiser steps. One rank for every client.

    Options: ``lam`` (λ, default 0.01), ``steps`` and ``lr`` of the Adam solve
    (``lr`` is Adam's absolute step: each ΔB entry moves by about ``lr`` per
    step), ``seed`` (accepted for a uniform constructor; the solve is
    deterministic and draws nothing).
    """

    name = "lorafair"

    def __init__(self, lam: float = 0.01, steps: int = 100, lr: float = 1e-4, seed: int = 0):
        if lam < 0 or steps < 0 or lr <= 0:
            raise StrategyError(f"{self.name}: needs lam >= 0, steps >= 0 and lr > 0 (got {lam}, {steps}, {lr})")
        self.lam, self.steps, self.lr, self.seed = float(lam), int(steps), float(lr), seed

    def init_state(self, initial: dict[str, Factors], clients: list[ClientInfo]) -> dict:
        """State holding a copy of the initial LoRA at the one rank."""
        state = initial_state(self, initial, clients)
        state["cosine"] = {}
        return state

    def download(self, state: dict, client: ClientInfo, round_index: int) -> Download:
        """Ā and the corrected B̄' of every module the client holds."""
        check_client(self, state, client)
        modules = client_modules(state, client)
        return Download(A={m: clone(state["A"][m]) for m in modules},
                        B={m: clone(state["B"][m]) for m in modules},
                        rank=state["rank"], alpha=state["alpha"], trainable=TRAIN_BOTH,
                        extra=clone_tree(state["extra"]))

    def aggregate(self, state: dict, uploads: list[Upload], round_index: int) -> RoundResult:
        """Ā, B̄ per module, then B̄' = B̄ + ΔB* from the cosine solve."""
        check_uploads(self, state, uploads, FACTOR_NAMES)
        p = weights(uploads)
        new = clone_tree(state)
        new["cosine"] = {}
        for m in state["A"]:
            factors = [u.factors[m] for u in uploads]
            dtype = torch.promote_types(state["B"][m].dtype, torch.float32)
            A_bar = weighted_mean([f.A for f in factors], p, state["A"][m].to(dtype))
            B_bar = weighted_mean([f.B for f in factors], p, state["B"][m].to(dtype))
            # ΔW = Σ p_k B_k A_k as one stacked product (every client has the same scale).
            L = torch.cat([f.B.detach().to(dtype) * w for w, f in zip(p, factors)], dim=1)
            R = torch.cat([f.A.detach().to(dtype) for f in factors], dim=0)
            delta_w = L @ R
            B_new = B_bar + fair_correction(delta_w, A_bar, B_bar, self.lam, self.steps, self.lr)
            new["A"][m] = A_bar.to(state["A"][m].dtype)
            new["B"][m] = B_new.to(state["B"][m].dtype)
            new["cosine"][m] = cosine(delta_w, new["B"][m], new["A"][m])
        new["extra"] = merge_extra(self, state, uploads)
        return RoundResult(state=new)
