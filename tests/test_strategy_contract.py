"""The contract every registered aggregation strategy keeps (server/strategies/base.py),
as one suite parametrized over ``strategy_names()``, in the spirit of peft's
tests/testing_common.py: a new strategy is covered by registering it.

Strategies without ``heterogeneous_ranks`` run on the equal-rank setup of
strategy_helpers.py, the others on its mixed-rank setup (whose initial LoRA has
B = 0, as FLoRA needs). Each method's own rule is tested in
tests/test_strategy_<name>.py; what follows holds for all of them:

- registry: ``get_strategy(name)`` builds ``REGISTRY[name]``, options reach the
  instance, and the capabilities agree with the summary in docs/algorithms.md;
- capabilities: mixed ranks and block subsets are refused (naming the methods
  that take them) or accepted, as the class attributes say;
- the state is checkpointable and a run resumed from a checkpoint goes on
  exactly as the one in memory;
- nothing mutates or aliases its inputs, and editing an output in place (a
  download, an export, a new state) reaches nothing else;
- the refusals every method shares (bad initial LoRA, bad uploads);
- ``export``: one rank and alpha, factor shapes, and the LoRA a client holding
  every block at the run's largest rank would use;
- determinism for a seed, and a seed that matters exactly for the methods
  that draw (flexlora, flora, fedinc).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import safetensors.torch
import torch

from server.checkpoint import flatten, unflatten
from server.strategies import REGISTRY, StrategyError, get_strategy, methods_with, strategy_names
from server.strategies.base import TRAIN_B, ClientInfo, Factors, Strategy, Upload
from server.strategies.common import merge_head
from split.families import block_of

from strategy_helpers import (ALPHA, D_IN, D_OUT, HEAD, MIXED_ALPHA, MIXED_D_IN, MIXED_D_OUT, MIXED_MODULES,
                              MODULES, R, R_MAX, assert_same, clients, gen, initial,
                              make_clients, make_initial, make_uploads, rand, reloaded, snapshot, uploads)

NAMES = strategy_names()
DOCS = Path(__file__).resolve().parents[1] / "docs" / "algorithms.md"
CAPABILITIES = ("heterogeneous_ranks", "block_subsets")
UNKNOWN = "model.layers.9.mlp.up_proj"  # a module no setup has


# ------------------------------------------------------------------ setups

@dataclass
class Setup:
    """One strategy with the setup that fits its capabilities."""

    strategy: Strategy
    initial: dict[str, Factors]
    clients: list[ClientInfo]
    modules: list[str]
    d_in: int
    d_out: int
    alpha: float
    top: int  # the run's largest rank
    make_uploads: Callable[[int], list[Upload]]

    def uploads(self, seed: int = 1) -> list[Upload]:
        """One upload per client, each carrying a head tensor HEAD (3 x d_out)."""
        return self.make_uploads(seed)

    def full_client(self) -> ClientInfo:
        """A client holding every block at the run's largest rank (what ``export`` stands for)."""
        return ClientInfo("full", self.top, self.alpha)

    def subset_client(self) -> ClientInfo:
        return dataclasses.replace(self.clients[0], blocks=frozenset({0}))


def mixed_uploads(seed: int) -> list[Upload]:
    g = gen(seed)
    return uploads(g, lambda c: {HEAD: rand(g, 3, MIXED_D_OUT)})


def setup(name: str, **options) -> Setup:
    s = get_strategy(name, **options)
    if s.heterogeneous_ranks:
        return Setup(s, initial(gen(0)), clients(), list(MIXED_MODULES), MIXED_D_IN, MIXED_D_OUT, MIXED_ALPHA,
                     R_MAX, mixed_uploads)
    return Setup(s, make_initial(), make_clients(), list(MODULES), D_IN, D_OUT, ALPHA, R, make_uploads)


def in_blocks(module: str, blocks) -> bool:
    return block_of(module) is None or block_of(module) in blocks


def restricted(upload: Upload, blocks: frozenset) -> Upload:
    """The upload of a client that trained only ``blocks``."""
    return dataclasses.replace(upload, factors={m: f for m, f in upload.factors.items() if in_blocks(m, blocks)},
                               blocks=blocks)


def one_round(su: Setup):
    """init_state, then round 0 on ``su.uploads(1)``: (state0, result)."""
    s = su.strategy
    state0 = s.init_state(su.initial, su.clients)
    return state0, s.aggregate(state0, su.uploads(1), 0)


def states(su: Setup) -> list[tuple[int, dict]]:
    """(the round it starts, state) for the state before round 0 and the one after it."""
    state0, result = one_round(su)
    return [(0, state0), (1, result.state)]


def bump(tree) -> int:
    """Add 1 in place to every floating tensor in ``tree``; returns how many were changed."""
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point():
            tree.add_(1.0)
            return 1
        return 0
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return sum(bump(getattr(tree, f.name)) for f in dataclasses.fields(tree))
    if isinstance(tree, dict):
        return sum(bump(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(bump(v) for v in tree)
    return 0


def names_every(message: str, methods: list[str]) -> None:
    assert methods, "no registered method has the capability: the refusal could name none"
    for method in methods:
        assert re.search(rf"\b{method}\b", message), f"{method!r} not named in: {message}"


def delta(A: torch.Tensor, B: torch.Tensor, alpha: float) -> torch.Tensor:
    return Factors(A, B, alpha).delta()


# ------------------------------------------------------------------ registry

@pytest.mark.parametrize("name", NAMES)
def test_registry_builds_the_class_and_passes_options(name):
    cls = REGISTRY[name]
    s = get_strategy(name)
    assert type(s) is cls and s.name == name
    assert type(get_strategy(name.upper())) is cls  # the CLI's spelling need not match
    assert s.seed == 0 and get_strategy(name, seed=7).seed == 7
    # An option the method lacks is refused, pointing at the method's documentation.
    with pytest.raises(StrategyError, match=re.escape("no option no_such_option; its options: ")) as err:
        get_strategy(name, no_such_option=1)
    assert f"docs/algorithms.md#{name}" in str(err.value)
    assert f'<a id="{name}"></a>' in DOCS.read_text()  # ... which exists


def test_registry_refuses_unknown_names_listing_the_known():
    with pytest.raises(StrategyError, match="unknown strategy 'fedavgx'") as err:
        get_strategy("fedavgx")
    names_every(str(err.value), NAMES)


def summary_row(name: str) -> list[str]:
    """The cells of ``name``'s row in the method summary table of docs/algorithms.md."""
    for line in DOCS.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == f"`{name}`":
            return cells
    raise AssertionError(f"{name} has no row in the method summary of {DOCS}")


@pytest.mark.parametrize("name", NAMES)
def test_capabilities_come_from_the_class_and_match_the_docs(name):
    cls = REGISTRY[name]
    row = summary_row(name)  # | name | method | mixed ranks | block subsets | changes frozen weights |
    for capability, cell in zip(CAPABILITIES, row[2:4]):
        assert cell in ("yes", "no")
        assert getattr(cls, capability) == (cell == "yes"), (capability, cell)
        assert (name in methods_with(capability)) == getattr(cls, capability)


# ------------------------------------------------------------------ capabilities

@pytest.mark.parametrize("name", NAMES)
def test_mixed_ranks_refused_or_accepted_as_the_class_says(name):
    su = setup(name)
    s = su.strategy
    if not s.heterogeneous_ranks:
        mixed = make_clients(ranks=(R, R, 2, R))
        with pytest.raises(StrategyError, match=re.escape(f"got ranks [2, {R}]")) as err:
            s.init_state(su.initial, mixed)
        names_every(str(err.value), methods_with("heterogeneous_ranks"))
        for round_index, state in states(su):
            with pytest.raises(StrategyError, match=f"client 'x' trains rank 3 but this run's LoRA has rank {R}"):
                s.download(state, ClientInfo("x", 3, ALPHA), round_index)
        return
    # The mixed-rank setup itself: init and aggregate take it, each client downloads at its own rank.
    ranks = {c.rank for c in su.clients}
    assert len(ranks) > 1 and {u.rank for u in su.uploads(1)} == ranks
    for round_index, state in states(su):
        for c in su.clients:
            d = s.download(state, c, round_index)
            assert d.rank == c.rank
            assert all(a.shape == (c.rank, su.d_in) for a in d.A.values()) and d.A


@pytest.mark.parametrize("name", NAMES)
def test_upload_rank_must_fit(name):
    su = setup(name)
    s = su.strategy
    state = s.init_state(su.initial, su.clients)
    ups = su.uploads()
    if s.heterogeneous_ranks:
        # factors of rank r declared as rank r + 1
        up = next(u for u in ups if u.rank < su.top)
        r = up.rank
        up.rank = r + 1
        message = rf"client '{up.client}': .* has rank {r} but the upload says rank {r + 1}"
    else:
        ups[1].rank = 3
        message = rf"client 'c1' has rank 3 but this run's LoRA has rank {R}"
    with pytest.raises(StrategyError, match=message):
        s.aggregate(state, ups, 0)


@pytest.mark.parametrize("name", NAMES)
def test_block_subsets_refused_or_accepted_as_the_class_says(name):
    su = setup(name)
    s = su.strategy
    blocks = frozenset({0})
    sub = su.subset_client()
    with_sub = [sub] + su.clients[1:]
    ups = su.uploads()
    ups[0] = restricted(ups[0], blocks)
    assert set(ups[0].factors) != set(su.modules)  # a real subset
    if not s.block_subsets:
        with pytest.raises(StrategyError, match="every client must train every block") as err:
            s.init_state(su.initial, with_sub)
        names_every(str(err.value), methods_with("block_subsets"))
        state = s.init_state(su.initial, su.clients)
        with pytest.raises(StrategyError, match="every client must train every block") as err:
            s.download(state, sub, 0)
        names_every(str(err.value), methods_with("block_subsets"))
        with pytest.raises(StrategyError, match=rf"client '{sub.client}' trained only blocks \[0\]") as err:
            s.aggregate(state, ups, 0)
        names_every(str(err.value), methods_with("block_subsets"))
        return
    state = s.init_state(su.initial, with_sub)
    want = {m for m in su.modules if in_blocks(m, blocks)}
    for st in (state, s.aggregate(state, ups, 0).state):
        d = s.download(st, sub, 1)
        for factor in (d.A, d.B):  # a factor the client keeps may be left out entirely
            assert set(factor) in (want, set())
        assert d.A or d.B
    # A module outside the upload's own blocks is refused.
    outside = sorted(m for m in su.modules if not in_blocks(m, blocks))[0]
    ups[0].factors[outside] = su.uploads()[0].factors[outside]
    with pytest.raises(StrategyError, match=re.escape(f"contains module(s) ['{outside}'] outside its blocks [0]")):
        s.aggregate(state, ups, 0)


# ------------------------------------------------------------------ checkpoints

def assert_plain(value) -> None:
    """Only tensors, string-keyed dicts, lists and JSON-plain scalars: what
    torch.load(weights_only=True) and the coordinator's JSON checkpoint take."""
    if isinstance(value, torch.Tensor):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, str), f"non-string key {k!r}"
            assert_plain(v)
        return
    if isinstance(value, list):
        for v in value:
            assert_plain(v)
        return
    assert isinstance(value, (str, int, float, bool, type(None))), f"{type(value).__name__} in a state"
    json.dumps(value)


def coordinator_round_trip(state: dict) -> dict:
    """``state`` through the format of the coordinator's round checkpoints
    (server/checkpoint.py): JSON with tensor references, and safetensors."""
    tree, tensors = flatten(state)
    return unflatten(json.loads(json.dumps(tree)), safetensors.torch.load(safetensors.torch.save(tensors)))


@pytest.mark.parametrize("name", NAMES)
def test_state_is_checkpointable_and_resumes_identically(name):
    su = setup(name)
    s = su.strategy
    for round_index, state in states(su):
        assert isinstance(state, dict)
        assert_plain(state)
        resumed = reloaded(state)
        assert_same(snapshot(resumed), snapshot(state))
        assert_same(snapshot(coordinator_round_trip(state)), snapshot(state))
        ups = su.uploads(2 + round_index)
        # The next round from the checkpoint is the next round from memory, to the bit.
        assert_same(snapshot(s.aggregate(resumed, ups, round_index)), snapshot(s.aggregate(state, ups, round_index)))
        for c in su.clients + [su.full_client()]:
            assert_same(snapshot(s.download(resumed, c, round_index)), snapshot(s.download(state, c, round_index)))
        assert_same(snapshot(s.export(resumed)), snapshot(s.export(state)))


# ------------------------------------------------------------------ mutation and aliasing

@pytest.mark.parametrize("name", NAMES)
def test_no_mutation_and_no_aliasing(name):
    su = setup(name)
    s = su.strategy
    init, cl, ups = su.initial, su.clients, su.uploads()
    before = snapshot((init, cl, ups))
    state = s.init_state(init, cl)
    state_before = snapshot(state)
    # A round of one upload too: a mean over one tensor must still be a copy of it, and so
    # must a module nobody trained (where the method takes block subsets).
    lone = restricted(ups[0], frozenset({0})) if s.block_subsets else ups[0]
    results = [s.aggregate(state, ups, 0), s.aggregate(state, [lone], 0)]
    receivers = su.clients + [su.full_client()] + ([su.subset_client()] if s.block_subsets else [])
    states = [state] + [r.state for r in results]
    outputs = [s.download(st, c, 1) for st in states for c in receivers] + [s.export(st) for st in states]
    # Nothing read its inputs destructively.
    assert_same(snapshot((init, cl, ups)), before)
    assert_same(snapshot(state), state_before)
    # Editing a download or an export in place reaches no state ...
    results_before = snapshot(results)
    assert bump(outputs) > 0
    assert_same(snapshot(state), state_before)
    assert_same(snapshot(results), results_before)
    # ... and editing a new state or the base deltas reaches neither the old state nor the uploads ...
    assert bump(results) > 0
    assert_same(snapshot(state), state_before)
    assert_same(snapshot((init, cl, ups)), before)
    # ... and editing the initial state does not reach the initial LoRA (FLoRA's holds no tensor).
    bump(state)
    assert_same(snapshot((init, cl, ups)), before)


# ------------------------------------------------------------------ refusals

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", ["no modules", "mixed alphas", "ranks of A and B differ"])
def test_init_refuses_an_initial_lora_that_does_not_fit(name, case):
    su = setup(name)
    init = dict(su.initial)
    m0, m1 = su.modules[:2]
    if case == "no modules":
        init, message = {}, "the initial LoRA has no modules"
    elif case == "mixed alphas":
        init[m1] = Factors(init[m1].A, init[m1].B, 2 * su.alpha)
        message = re.escape(f"the initial LoRA mixes alphas {[su.alpha, 2 * su.alpha]}")
    else:
        f = init[m0]
        init[m0] = Factors(f.A, f.B[:, :-1], su.alpha)
        message = re.escape(f"initial factors of {m0} have shapes A {tuple(f.A.shape)}, B {tuple(f.B[:, :-1].shape)}")
    with pytest.raises(StrategyError, match=message):
        su.strategy.init_state(init, su.clients)


def widen(f: Factors, which: str) -> Factors:
    """``f`` with one more input column in A, or one more output row in B."""
    if which == "A":
        return Factors(torch.zeros(f.A.shape[0], f.A.shape[1] + 1, dtype=f.A.dtype), f.B, f.alpha)
    return Factors(f.A, torch.zeros(f.B.shape[0] + 1, f.B.shape[1], dtype=f.B.dtype), f.alpha)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", ["no uploads", "duplicate client", "unknown module", "negative samples"])
def test_aggregate_refuses_bad_uploads(name, case):
    su = setup(name)
    s = su.strategy
    state = s.init_state(su.initial, su.clients)
    ups = su.uploads()
    first = ups[0].client
    if case == "no uploads":
        ups, message = [], "no uploads to aggregate"
    elif case == "duplicate client":
        ups.append(ups[0])
        message = re.escape(f"more than one upload from client(s) {[first]}")
    elif case == "unknown module":
        ups[0].factors[UNKNOWN] = next(iter(ups[0].factors.values()))
        message = re.escape(f"upload from client '{first}' names unknown module(s) {[UNKNOWN]}")
    else:
        ups[1].num_samples = -1
        message = re.escape(f"upload from client '{ups[1].client}' has a negative sample count -1")
    with pytest.raises(StrategyError, match=message):
        s.aggregate(state, ups, 0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("round_index", [0, 1])  # RoLoRA trains B, then A
def test_aggregate_refuses_a_wrongly_shaped_trained_factor(name, round_index):
    su = setup(name)
    s = su.strategy
    state = s.init_state(su.initial, su.clients)
    # The factor the clients train this round is the one the strategy must read.
    which = "B" if s.download(state, su.clients[0], round_index).trainable == TRAIN_B else "A"
    ups = su.uploads()
    up = ups[1]
    module = next(iter(up.factors))
    up.factors[module] = bad = widen(up.factors[module], which)
    bad_shape = tuple(getattr(bad, which).shape)
    message = rf"client '{up.client}'.*{re.escape(module)}.*{re.escape(str(bad_shape))}"
    with pytest.raises(StrategyError, match=message):
        s.aggregate(state, ups, round_index)


@pytest.mark.parametrize("name", NAMES)
def test_aggregate_refuses_a_wrongly_shaped_head_where_the_state_keeps_one(name):
    su = setup(name)
    s = su.strategy
    state0, result = one_round(su)
    keeps_head = bool(s.export(result.state).head)
    ups = su.uploads()
    ups[1].head[HEAD] = torch.zeros(1, 2, dtype=torch.float64)
    if not keeps_head:
        # A method whose clients keep their heads (FedSA-LoRA) ignores what they send.
        assert s.export(s.aggregate(state0, ups, 0).state).head == {}
        return
    assert set(s.export(result.state).head) == {HEAD}
    message = re.escape(f"upload from client '{ups[1].client}' has head tensor {HEAD!r} of shape (1, 2), "
                        f"expected {(3, su.d_out)}")
    with pytest.raises(StrategyError, match=message):  # against the other uploads of the round
        s.aggregate(state0, ups, 0)
    lone = [ups[1]]
    with pytest.raises(StrategyError, match=message):  # against the head the state already holds
        s.aggregate(result.state, lone, 1)


# ------------------------------------------------------------------ export

@pytest.mark.parametrize("name", NAMES)
def test_export_is_one_lora_at_one_rank(name):
    su = setup(name)
    s = su.strategy
    for round_index, state in states(su):
        e = s.export(state)
        assert isinstance(e.rank, int) and e.rank >= 1
        assert isinstance(e.alpha, float) and e.alpha == su.alpha
        for factor in (e.A, e.B):  # a factor kept on the clients is absent for every module
            assert set(factor) in (set(su.modules), set())
        assert e.A or e.B
        for m, a in e.A.items():
            assert a.shape == (e.rank, su.d_in)
        for m, b in e.B.items():
            assert b.shape == (su.d_out, e.rank)
        assert set(e.head) <= {HEAD} and all(t.shape == (3, su.d_out) for t in e.head.values())
        # Deterministic: again, and from another instance with the same options.
        assert_same(snapshot(s.export(state)), snapshot(e))
        assert_same(snapshot(get_strategy(name).export(state)), snapshot(e))
        # The LoRA a client holding every block at the run's largest rank would use.
        d = s.download(state, su.full_client(), round_index)
        assert set(e.A) == set(d.A) and set(e.B) == set(d.B)
        for m in e.A:
            if m in e.B:
                torch.testing.assert_close(delta(e.A[m], e.B[m], e.alpha), delta(d.A[m], d.B[m], d.alpha))
            else:
                assert torch.equal(e.A[m], d.A[m])
        assert_same(snapshot(e.head), snapshot(d.head))


# ------------------------------------------------------------------ determinism

def run(name: str, seed: int, torch_seed: int):
    """A whole round of ``name`` with ``seed`` as plain values; the global torch
    RNG is set to ``torch_seed`` first, so a method that drew from it would show."""
    torch.manual_seed(torch_seed)
    su = setup(name, seed=seed)
    s = su.strategy
    state0, result = one_round(su)
    receivers = su.clients + [su.full_client()]
    return snapshot({"state0": state0, "result": result,
                     "downloads0": [s.download(state0, c, 0) for c in receivers],
                     "downloads1": [s.download(result.state, c, 1) for c in receivers],
                     "export": s.export(result.state)})


def flora_fresh_a(a: Setup, b: Setup) -> None:
    """FLoRA's fresh A (Kaiming-uniform) is drawn from the seed; B stays 0."""
    c = a.clients[0]
    da = a.strategy.download(a.strategy.init_state(a.initial, a.clients), c, 0)
    db = b.strategy.download(b.strategy.init_state(b.initial, b.clients), c, 0)
    for m in a.modules:
        assert not torch.equal(da.A[m], db.A[m])
        assert torch.count_nonzero(da.B[m]) == 0 and torch.count_nonzero(db.B[m]) == 0


def flexlora_completion_rows(a: Setup, b: Setup) -> None:
    """FlexLoRA's completion rows for a rank above the stored SVD come from the
    seed; they carry zero singular values, so the update does not depend on it."""
    big = ClientInfo("big", R_MAX, MIXED_ALPHA)
    sa, sb = one_round(a)[1].state, one_round(b)[1].state
    da, db = a.strategy.download(sa, big, 1), b.strategy.download(sb, big, 1)
    for m in a.modules:
        have = sa["global"][m]["Vh"].shape[0]
        assert have < R_MAX  # d_in = 6 < 8: the download must complete the SVD
        assert not torch.equal(da.A[m][have:], db.A[m][have:])
        torch.testing.assert_close(delta(da.A[m], da.B[m], da.alpha), delta(db.A[m], db.B[m], db.alpha))


def fedinc_kmeans_seeding(a: Setup, b: Setup) -> None:
    """k-means++ seeding from the seed: 14 components into 8 clusters."""
    assert sum(u.rank for u in a.uploads(1)) > R_MAX
    sa, sb = one_round(a)[1].state, one_round(b)[1].state
    assert any(not torch.equal(sa["B"][m], sb["B"][m]) for m in a.modules)


DRAWS = {"flora": flora_fresh_a, "flexlora": flexlora_completion_rows, "fedinc": fedinc_kmeans_seeding}


def test_draws_name_registered_methods():
    assert set(DRAWS) <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_gives_the_same_round(name):
    assert_same(run(name, 3, torch_seed=1), run(name, 3, torch_seed=2))


@pytest.mark.parametrize("name", NAMES)
def test_seed_matters_exactly_where_the_method_draws(name):
    if name in DRAWS:
        DRAWS[name](setup(name, seed=0), setup(name, seed=1))
    else:
        # The seed is kept for a uniform constructor only: the method draws nothing.
        assert_same(run(name, 0, torch_seed=0), run(name, 1, torch_seed=0))


# ------------------------------------------------------------------ the head

@pytest.mark.parametrize("name", NAMES)
def test_head_is_averaged_downloaded_and_kept(name):
    su = setup(name)
    s = su.strategy
    state = s.init_state(su.initial, su.clients)
    ups = su.uploads()
    for u in ups:
        u.num_samples = 10  # equal counts: sample and uniform weighting agree on the plain mean
    new = s.aggregate(state, ups, 0).state
    if not s.export(new).head:
        # A method whose clients keep their heads (FedSA-LoRA) sends none.
        assert all(s.download(new, c, 1).head == {} for c in su.clients)
        return
    expected = sum(u.head[HEAD] for u in ups) / len(ups)
    torch.testing.assert_close(s.export(new).head[HEAD], expected)
    for c in su.clients:
        torch.testing.assert_close(s.download(new, c, 1).head[HEAD], expected)
    # A round in which nobody sends a head keeps the last one.
    headless = [dataclasses.replace(u, head={}) for u in su.uploads(2)]
    torch.testing.assert_close(s.export(s.aggregate(new, headless, 1).state).head[HEAD], expected)


def test_merge_head_weights_by_samples_or_uniformly_over_the_uploads_that_carry_each_tensor():
    s = get_strategy("fedit")
    ups = [Upload("a", {}, 1, R, head={"w": torch.tensor([4.0]), "b": torch.tensor([1.0])}),
           Upload("b", {}, 3, R, head={"w": torch.tensor([8.0])})]
    merged = merge_head(s, {"head": {"old": torch.tensor([5.0])}}, ups)
    assert merged == {"old": torch.tensor([5.0]), "w": torch.tensor([7.0]), "b": torch.tensor([1.0])}  # 1/4*4 + 3/4*8
    assert merge_head(s, {"head": {}}, ups, uniform=True)["w"] == torch.tensor([6.0])
