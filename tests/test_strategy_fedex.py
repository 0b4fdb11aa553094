"""FedEx-LoRA: FedAvg of A and B plus the residual M − s B̄Ā folded into the
base, so that W0' + s B̄Ā = W0 + Σ p_k s B_k A_k exactly (docs/algorithms.md#fedex),
checked on random tensors and on real PEFT-wrapped GPT-2 Conv1D and nn.Linear
layers. The contract every strategy keeps is in test_strategy_contract.py."""

from __future__ import annotations

import pytest
import torch

from server.strategies import get_strategy
from server.strategies.base import ClientInfo, Factors, StrategyError, Upload
from server.strategies.fedex import FedExLoRA
from split.lora import fold_into, lora_layers, native_delta

D_OUT, D_IN, RANK, ALPHA = 10, 6, 3, 12.0
MODULES = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.value"]
F64 = torch.float64


def rand_factors(g, rank=RANK, d_out=D_OUT, d_in=D_IN, alpha=ALPHA, dtype=F64):
    return Factors(torch.randn(rank, d_in, generator=g, dtype=dtype),
                   torch.randn(d_out, rank, generator=g, dtype=dtype), alpha)


def make_round(g, samples, modules=MODULES):
    return [Upload(f"c{k}", {m: rand_factors(g) for m in modules}, n, RANK) for k, n in enumerate(samples)]


def clients(n=3, rank=RANK):
    return [ClientInfo(f"c{k}", rank, ALPHA) for k in range(n)]


# ---------------------------------------------------------------- fold helpers

def test_native_delta_and_fold_into():
    delta = torch.arange(6.0).reshape(2, 3)  # d_out = 2, d_in = 3
    assert torch.equal(native_delta(delta, False), delta)
    assert torch.equal(native_delta(delta, True), delta.T)
    linear = torch.ones(2, 3, dtype=torch.float16)  # nn.Linear: out x in
    conv1d = torch.ones(3, 2)  # Conv1D: in x out
    kept = delta.clone()
    assert fold_into(linear, delta, False) is linear
    fold_into(conv1d, delta, True)
    assert torch.equal(linear, (1 + delta).half()) and torch.equal(conv1d, 1 + delta.T)
    assert torch.equal(delta, kept)
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        fold_into(torch.ones(2, 3), delta, True)


# ---------------------------------------------------------------- exactness on tensors

def test_residual_makes_the_aggregate_exact_weighted():
    g = torch.Generator().manual_seed(0)
    s = FedExLoRA()
    init = {m: rand_factors(g) for m in MODULES}
    ups = make_round(g, [5, 20, 75])
    result = s.aggregate(s.init_state(init, clients()), ups, 0)
    scale = ALPHA / RANK
    p = [0.05, 0.2, 0.75]
    for m in MODULES:
        W0 = torch.randn(D_OUT, D_IN, generator=g, dtype=F64)
        A_bar = sum(pk * u.factors[m].A for pk, u in zip(p, ups))
        B_bar = sum(pk * u.factors[m].B for pk, u in zip(p, ups))
        assert torch.allclose(result.state["A"][m], A_bar, atol=1e-12)
        assert torch.allclose(result.state["B"][m], B_bar, atol=1e-12)
        ideal = W0 + scale * sum(pk * u.factors[m].B @ u.factors[m].A for pk, u in zip(p, ups))
        served = W0 + result.base_deltas[m] + scale * result.state["B"][m] @ result.state["A"][m]
        assert result.base_deltas[m].shape == (D_OUT, D_IN)
        assert torch.allclose(served, ideal, atol=1e-12)
        # without the residual the FedIT product is off: the residual is not trivially zero
        assert (W0 + scale * B_bar @ A_bar - ideal).abs().max() > 1e-3


def test_hand_computed_scalar_residual():
    # 1x1 factors, equal weights: M = (2*1 + 4*3) / 2 = 7, B̄Ā = 3 * 2 = 6, R = s (7 - 6) = s = 2
    ups = [Upload("a", {"m": Factors(torch.tensor([[1.0]]), torch.tensor([[2.0]]), 2.0)}, 1, 1),
           Upload("b", {"m": Factors(torch.tensor([[3.0]]), torch.tensor([[4.0]]), 2.0)}, 1, 1)]
    s = FedExLoRA()
    state = s.init_state({"m": Factors(torch.zeros(1, 1), torch.zeros(1, 1), 2.0)},
                         [ClientInfo("a", 1, 2.0), ClientInfo("b", 1, 2.0)])
    result = s.aggregate(state, ups, 0)
    assert torch.allclose(result.base_deltas["m"], torch.tensor([[2.0]]))
    assert torch.allclose(result.state["A"]["m"], torch.tensor([[2.0]]))
    assert torch.allclose(result.state["B"]["m"], torch.tensor([[3.0]]))


def test_identical_clients_leave_no_residual():
    g = torch.Generator().manual_seed(1)
    f = {m: rand_factors(g) for m in MODULES}
    ups = [Upload(f"c{k}", dict(f), n, RANK) for k, n in enumerate([1, 2, 3])]
    s = FedExLoRA()
    result = s.aggregate(s.init_state(f, clients()), ups, 0)
    for m in MODULES:
        assert result.base_deltas[m].abs().max() < 1e-12


def test_download_continues_from_the_averages():
    g = torch.Generator().manual_seed(2)
    s = get_strategy("fedex")
    ups = make_round(g, [1, 1, 2])
    ups[0].head["classifier.weight"] = torch.zeros(2, 2)
    ups[2].head["classifier.weight"] = torch.ones(2, 2)
    state = s.aggregate(s.init_state({m: rand_factors(g) for m in MODULES}, clients()), ups, 0).state
    d = s.download(state, clients()[0], 1)
    assert not d.fresh and d.trainable == "both" and d.rank == RANK and d.alpha == ALPHA
    assert set(d.A) == set(d.B) == set(MODULES)
    for m in MODULES:
        assert torch.equal(d.A[m], state["A"][m]) and torch.equal(d.B[m], state["B"][m])
        assert d.A[m].shape == (RANK, D_IN) and d.B[m].shape == (D_OUT, RANK)
    # head: client 1 carries none, so it is averaged over the two that do (weights 1 and 2)
    assert torch.allclose(d.head["classifier.weight"], torch.full((2, 2), 2 / 3))


def test_aggregate_refuses_an_upload_lacking_a_module():
    g = torch.Generator().manual_seed(3)
    s = FedExLoRA()
    state = s.init_state({m: rand_factors(g) for m in MODULES}, clients())
    with pytest.raises(StrategyError, match=rf"lacks module\(s\) \['{MODULES[1]}'\]; fedex trains every module"):
        s.aggregate(state, [Upload("a", {MODULES[0]: rand_factors(g)}, 1, RANK)], 0)


# ---------------------------------------------------------------- exactness on real layers

def peft_gpt2():
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    config = GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=8, bos_token_id=0, eos_token_id=0)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, fan_in_fan_out=True,
                      target_modules=["c_attn", "attn.c_proj", "mlp.c_proj"])
    return get_peft_model(GPT2Model(config), lora)


def peft_bert():
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                        vocab_size=50, max_position_embeddings=16)
    return get_peft_model(BertModel(config), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                        target_modules=["query", "value", "output.dense"]))


@pytest.mark.parametrize("build, conv1d", [(peft_gpt2, True), (peft_bert, False)])
def test_folded_residual_on_peft_layers_gives_the_mean_of_products(build, conv1d):
    model = build().eval()
    layers = lora_layers(model)
    assert layers and all(layer.fan_in_fan_out == conv1d for layer in layers.values())
    g = torch.Generator().manual_seed(5)
    rank, alpha = 4, 8.0
    scale = alpha / rank
    initial = {m: Factors(layer.lora_A["default"].weight.detach().clone(),
                          layer.lora_B["default"].weight.detach().clone(), alpha)
               for m, layer in layers.items()}
    # three clients that trained away from the shared start, equal sample counts (the mean)
    ups = []
    for k in range(3):
        factors = {}
        for m, f in initial.items():
            factors[m] = Factors(f.A + 0.3 * torch.randn(f.A.shape, generator=g),
                                 f.B + 0.3 * torch.randn(f.B.shape, generator=g), alpha)
        ups.append(Upload(f"c{k}", factors, 7, rank))
    s = FedExLoRA()
    result = s.aggregate(s.init_state(initial, [ClientInfo(f"c{k}", rank, alpha) for k in range(3)]), ups, 0)

    for m, layer in layers.items():
        base = layer.base_layer
        W0 = base.weight.detach().clone()
        W0_std = W0.T if conv1d else W0  # d_out x d_in
        mean_product = sum(u.factors[m].B @ u.factors[m].A for u in ups) / 3
        x = torch.randn(5, W0_std.shape[1], generator=g)
        expected = x @ (W0_std + scale * mean_product).T + base.bias.detach()

        with torch.no_grad():
            fold_into(base.weight, result.base_deltas[m], layer.fan_in_fan_out)
            layer.lora_A["default"].weight.copy_(result.state["A"][m])
            layer.lora_B["default"].weight.copy_(result.state["B"][m])
            got = layer(x)
        assert torch.allclose(got, expected, atol=1e-5), m

        # the fedex-lora bug (the other orientation) is caught wherever it fits the shape
        if W0.shape[0] == W0.shape[1]:
            with torch.no_grad():
                base.weight.copy_(W0)
                fold_into(base.weight, result.base_deltas[m], not layer.fan_in_fan_out)
                wrong = layer(x)
            assert not torch.allclose(wrong, expected, atol=1e-3), m
