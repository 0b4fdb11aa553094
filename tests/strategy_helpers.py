"""Helpers shared by the strategy tests (tests/test_strategy_*.py).

A plain module, not a test file: the tests import it as ``strategy_helpers``
(pytest puts tests/ on sys.path, as it does for ``conftest``).

Two setups:

- equal ranks (the strategies without ``heterogeneous_ranks`` in
  test_strategy_contract.py; FedIT, FFA-LoRA, RoLoRA, FedSA-LoRA, LayerMean
  in their own files): four clients c0..c3 at rank ``R`` with sample counts
  ``COUNTS`` (weights ``P``), factors drawn from an integer seed
  (``make_initial``, ``make_clients``, ``make_uploads``);
- mixed ranks (the strategies with ``heterogeneous_ranks`` in the contract;
  HetLoRA, RBLA, rank clustering in their own files): clients c2, c4, c8 of
  ranks ``RANKS`` up to ``R_MAX``, an initial LoRA with B = 0, factors drawn
  from a ``torch.Generator`` (``gen``, ``initial``, ``clients``,
  ``random_upload``, ``uploads``). Its sizes are the ``MIXED_*`` constants,
  which those tests import under the plain names (``MIXED_D_IN as D_IN``, ...).

And, for both: ``snapshot`` / ``assert_same`` to compare inputs and outputs to
the bit, and ``reloaded`` for a checkpoint round trip.
"""

from __future__ import annotations

import dataclasses
import io

import torch

from server.strategies.base import ClientInfo, Factors, Upload

# ------------------------------------------------------------------ equal ranks

D_IN, D_OUT, R, ALPHA = 12, 10, 4, 8.0
MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj")
COUNTS = (10, 20, 30, 40)  # p = 0.1, 0.2, 0.3, 0.4
P = (0.1, 0.2, 0.3, 0.4)
HEAD = "score.weight"

# ------------------------------------------------------------------ mixed ranks

MIXED_D_IN, MIXED_D_OUT, R_MAX, MIXED_ALPHA = 6, 5, 8, 16.0
MIXED_MODULES = [f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "v_proj")] + ["score.dense"]
RANKS = {"c2": 2, "c4": 4, "c8": 8}
SAMPLES = {"c2": 10, "c4": 30, "c8": 60}


# ------------------------------------------------------------------ random factors

def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rand(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def random_factors(g, rank, modules=MODULES, d_in=D_IN, d_out=D_OUT, alpha=ALPHA):
    """Random float64 factors (A r x d_in, B d_out x r) of each module, drawn in order A, B."""
    return {m: Factors(rand(g, rank, d_in), rand(g, d_out, rank), alpha) for m in modules}


# ------------------------------------------------------------------ equal-rank setup

def make_initial(seed=0, rank=R):
    return random_factors(gen(seed), rank)


def make_clients(ranks=(R,) * len(COUNTS)):
    return [ClientInfo(f"c{k}", r, ALPHA, None, n) for k, (r, n) in enumerate(zip(ranks, COUNTS))]


def make_uploads(seed=1, rank=R):
    g = gen(seed)
    return [Upload(f"c{k}", random_factors(g, rank), n, rank, None, {HEAD: rand(g, 3, D_OUT)})
            for k, n in enumerate(COUNTS)]


# ------------------------------------------------------------------ mixed-rank setup

def initial(g):
    """The initial LoRA at R_MAX: random A, zero B."""
    return {m: Factors(rand(g, R_MAX, MIXED_D_IN), torch.zeros(MIXED_D_OUT, R_MAX, dtype=torch.float64),
                       MIXED_ALPHA) for m in MIXED_MODULES}


def clients():
    return [ClientInfo(c, r, MIXED_ALPHA, num_samples=SAMPLES[c]) for c, r in RANKS.items()]


def random_upload(g, client, rank, samples, modules=MIXED_MODULES, head=None):
    return Upload(client, random_factors(g, rank, modules, MIXED_D_IN, MIXED_D_OUT, MIXED_ALPHA), samples, rank,
                  head=head or {})


def uploads(g, head=None):
    """One random upload per client of RANKS; ``head(client)``, if given, is
    each upload's head (drawn before that upload's factors)."""
    return [random_upload(g, c, r, SAMPLES[c], head=head(c) if head else None) for c, r in RANKS.items()]


# ------------------------------------------------------------------ snapshots and checkpoints

def snapshot(x):
    """A plain nested copy of an input or an output (tensors cloned, dataclasses
    such as ``Upload``, ``ClientInfo`` or ``Download`` as dicts of their fields)
    to compare against later."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {"<type>": type(x).__name__, **{f.name: snapshot(getattr(x, f.name)) for f in dataclasses.fields(x)}}
    if isinstance(x, dict):
        return {k: snapshot(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [snapshot(v) for v in x]
    return x  # immutable: str, numbers, None, frozenset


def assert_same(a, b):
    """Equal to the bit: same containers, keys, lengths, tensor dtypes and values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, type(a)) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def reloaded(state):
    """``state`` after a torch.save / torch.load(weights_only=True) round trip."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)
