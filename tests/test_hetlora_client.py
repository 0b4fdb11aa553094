"""HetLoRA's client half (edge/hetlora.py, docs/algorithms.md#hetlora): the
rank regulariser ||B[:, t:r]||_F * ||A[t:r, :]||_F with t = floor(gamma r),
self-pruning that only ever lowers a rank, and the options the server sends."""

from __future__ import annotations

import math

import pytest
import torch

from edge.hetlora import HetLoRAOptions, RankRegulariser, pruned_rank, rank_penalty, tail_start
from server.strategies.base import ClientInfo
from server.strategies.hetlora import HetLoRA
from split.lora import lora_layers

from strategy_helpers import MIXED_D_IN as D_IN, MIXED_D_OUT as D_OUT, clients, gen, initial

RANK = 8


# ------------------------------------------------------------------ pruning arithmetic

def test_pruned_rank_only_decreases():
    for gamma in (0.5, 0.9, 0.99):
        for r in range(1, 65):
            assert pruned_rank(r, gamma, 1.0, 2.0) == r  # tail grew: keep
            assert pruned_rank(r, gamma, 1.0, 1.0) == r  # no shrink: keep
            p = pruned_rank(r, gamma, 2.0, 1.0)
            assert p >= 1 and p <= r and (p < r or r == 1)
            assert p == max(1, math.floor(gamma * r + 1e-9))
    r, seq = 64, []
    for _ in range(200):
        r = pruned_rank(r, 0.9, 1.0, 0.5)
        seq.append(r)
    assert all(b <= a for a, b in zip(seq, seq[1:])) and seq[-1] == 1


def test_tail_start_floors_exact_products_and_keeps_one_slot():
    assert tail_start(100, 0.29) == 29  # not 28 from 0.29 * 100 = 28.999...
    assert tail_start(8, 0.5) == 4 and tail_start(8, 0.99) == 7
    assert tail_start(1, 0.99) == 0  # a rank-1 tail is its only slot
    with pytest.raises(ValueError, match="gamma"):
        tail_start(8, 1.0)
    with pytest.raises(ValueError, match="rank must be at least 1"):
        tail_start(0, 0.5)


# ------------------------------------------------------------------ penalty

def test_rank_penalty_value_and_gradient_reach_the_tail_only():
    g = gen(11)
    A = torch.randn(RANK, D_IN, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(D_OUT, RANK, generator=g, dtype=torch.float64, requires_grad=True)
    pen = rank_penalty(A, B, RANK, 0.5)  # tail = slots 4..7
    expected = torch.linalg.matrix_norm(B.detach()[:, 4:]) * torch.linalg.matrix_norm(A.detach()[4:])
    torch.testing.assert_close(pen.detach(), expected)
    pen.backward()
    assert torch.count_nonzero(A.grad[:4]) == 0 and torch.count_nonzero(B.grad[:, :4]) == 0
    assert torch.all(A.grad[4:].abs().sum(dim=1) > 0) and torch.all(B.grad[:, 4:].abs().sum(dim=0) > 0)
    # Default gamma 0.99 at rank 8: tail is the last slot only.
    A.grad = B.grad = None
    rank_penalty(A, B, RANK, 0.99).backward()
    assert torch.count_nonzero(A.grad[:7]) == 0 and torch.count_nonzero(A.grad[7]) > 0
    # At B = 0 (round start) the gradient is finite, not NaN.
    A0 = A.detach().clone().requires_grad_(True)
    B0 = torch.zeros(D_OUT, RANK, dtype=torch.float64, requires_grad=True)
    rank_penalty(A0, B0, RANK, 0.5).backward()
    assert torch.isfinite(A0.grad).all() and torch.isfinite(B0.grad).all()


def test_rank_penalty_refuses_a_rank_above_the_factors():
    A, B = torch.zeros(4, D_IN), torch.zeros(D_OUT, 4)
    with pytest.raises(ValueError, match="rank 5 exceeds"):
        rank_penalty(A, B, 5, 0.5)


# ------------------------------------------------------------------ options

def test_options_absent_when_the_method_is_not_hetlora():
    assert HetLoRAOptions.from_options({}) is None
    assert HetLoRAOptions.from_options({"something_else": 1.0}) is None


def test_options_round_trip_from_a_server_download():
    # The server's half writes the options; the client's half must read them back unchanged.
    s = HetLoRA(lam=0.05, gamma=0.75)
    state = s.init_state(initial(gen(0)), clients())
    d = s.download(state, ClientInfo("c8", 8, state["alpha"]), 0)
    assert HetLoRAOptions.from_options(d.options) == HetLoRAOptions(0.05, 0.75)
    assert HetLoRAOptions.from_options({"hetlora_lambda": "0.5", "hetlora_gamma": 0.5}) == HetLoRAOptions(0.5, 0.5)


@pytest.mark.parametrize("options, message", [
    ({"hetlora_lambda": 0.1}, "hetlora_gamma"),  # half the pair: the missing key is named
    ({"hetlora_gamma": 0.5}, "hetlora_lambda"),
    ({"hetlora_lambda": -0.1, "hetlora_gamma": 0.5}, "lambda must be non-negative"),
    ({"hetlora_lambda": 0.1, "hetlora_gamma": 1.0}, r"gamma must lie in \(0, 1\)"),
    ({"hetlora_lambda": 0.1, "hetlora_gamma": 0.0}, r"gamma must lie in \(0, 1\)"),
    ({"hetlora_lambda": float("nan"), "hetlora_gamma": 0.5}, "lambda must be non-negative"),
    ({"hetlora_lambda": "much", "hetlora_gamma": 0.5}, "could not convert string to float"),
    ({"hetlora_lambda": None, "hetlora_gamma": 0.5}, "NoneType"),
])
def test_options_refuse_unusable_values(options, message):
    with pytest.raises(ValueError, match="unusable HetLoRA options") as err:
        HetLoRAOptions.from_options(options)
    assert err.match(message)


# ------------------------------------------------------------------ regulariser on a peft model

def peft_layers(seed=0):
    """A real peft LoRA (r = 8 on one 6 -> 5 Linear) with a nonzero B, and its layers."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(6, 5)), LoraConfig(r=RANK, target_modules=["0"]))
    layers = lora_layers(model)
    assert list(layers) == ["0"]
    with torch.no_grad():  # B = 0 after peft's init would give a zero tail norm to start from
        layers["0"].lora_B["default"].weight.normal_()
    return model, layers


def factors(layer):
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight


def test_regulariser_penalty_is_lambda_times_the_tail_norms():
    _, layers = peft_layers()
    reg = RankRegulariser(layers, HetLoRAOptions(0.25, 0.5), RANK)
    A, B = factors(layers["0"])
    tail = float(torch.linalg.matrix_norm(B[:, 4:].detach()) * torch.linalg.matrix_norm(A[4:].detach()))
    assert reg.before == pytest.approx(tail, rel=1e-6) and tail > 0
    assert float(reg.penalty().detach()) == pytest.approx(0.25 * tail, rel=1e-6)
    reg.penalty().backward()  # the penalty reaches the model's own parameters, tail slots only
    assert torch.count_nonzero(A.grad[:4]) == 0 and torch.count_nonzero(A.grad[4:]) > 0
    assert torch.count_nonzero(B.grad[:, :4]) == 0 and torch.count_nonzero(B.grad[:, 4:]) > 0


def test_prune_after_training_that_shrank_the_tail_zeroes_it_in_both_factors():
    model, layers = peft_layers()
    gamma = 0.5
    reg = RankRegulariser(layers, HetLoRAOptions(1.0, gamma), RANK)
    A, B = factors(layers["0"])
    head_a, head_b = A[:4].detach().clone(), B[:, :4].detach().clone()
    # Local training on the penalty alone shrinks the tail.
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        reg.penalty().backward()
        opt.step()
    assert float(reg.tail_norms().detach()) < reg.before
    rank = reg.prune()
    assert rank == math.floor(gamma * RANK) == 4
    assert torch.count_nonzero(A[rank:]) == 0 and torch.count_nonzero(B[:, rank:]) == 0
    # The head slots had no gradient from the penalty and are left as they were.
    assert torch.equal(A[:rank], head_a) and torch.equal(B[:, :rank], head_b)


def test_prune_keeps_the_rank_when_the_tail_did_not_shrink():
    model, layers = peft_layers(1)
    reg = RankRegulariser(layers, HetLoRAOptions(1.0, 0.5), RANK)
    A, B = factors(layers["0"])
    with torch.no_grad():
        B[:, 4:].mul_(2.0)  # training that grew the tail
    kept = A.detach().clone(), B.detach().clone()
    assert reg.prune() == RANK
    assert torch.equal(A, kept[0]) and torch.equal(B, kept[1])
    # An unchanged tail is not a shrink either.
    again = RankRegulariser(layers, HetLoRAOptions(1.0, 0.5), RANK)
    assert again.prune() == RANK and torch.equal(B, kept[1])
