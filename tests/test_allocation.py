"""Layer allocation every round (server/allocation.py with the coordinator):
what each client is told to train, what it uploads, what the server-side
adapter trains, what memory that saves, and how Fed-piLot and Fisher values
move the allocation. Real tiny clients against an in-process server."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import VOCAB, random_batch, threaded_server
from edge.client import ClientConfig, SplitClient
from edge.allocation import block_costs, planned_budget
from edge.federated import FederatedClient, FederatedOptions
from round_helpers import CLIENT_MODULE, LAYOUT, FakeServer
from server.allocation import Allocator, Resources
from server.rounds import Coordinator, FederationConfig, FederationError
from server.strategies.base import ClientInfo, Factors, GlobalModel, StrategyError, Upload
from split.families import block_of
from split.lora import LoraSpec
from split.protocol import MAX_BLOCKS, FederationSettings, Join, ProtocolError, RoundOffer, UploadPayload
from split.wire import Message, decode, encode

LAYERS = 4  # tiny bert: blocks 0..3; cut 2,1 leaves 0, 1 and 3 to the client, 2 to the server


class Recorder(FederatedClient):
    """A federated client that notes what each round offered it and what its steps saved for backward."""

    def __post_init__(self):
        super().__post_init__()
        self.offered: dict[int, frozenset[int] | None] = {}
        self.saved: list[int] = []  # bytes autograd saved for backward in each step (distinct storages)
        train_step = self.client.train_step

        def measured(batch, penalty=None):
            weights = {p.untyped_storage().data_ptr() for p in self.client.model.parameters()}
            held: dict[int, int] = {}

            def pack(t):
                s = t.untyped_storage()
                if s.data_ptr() not in weights:
                    held[s.data_ptr()] = s.nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = train_step(batch, penalty)
            self.saved.append(sum(held.values()))
            return loss

        self.client.train_step = measured

    def _train_round(self, offer):
        self.offered[offer.round] = offer.blocks
        return super()._train_round(offer)


def run_clients(path, endpoint, options: list[FederatedOptions]) -> list[Recorder]:
    """Federated clients in threads, one per ``options``, until the federation is done. Models are
    built in this thread only: accelerate's meta-device context, entered while a model is built,
    would catch another thread's parameters."""
    runners = []
    for index, opts in enumerate(options):
        client = SplitClient(ClientConfig(server=endpoint, model=str(path), num_labels=3, dropout=False,
                                          lora=LoraSpec(4, 8.0), client_id=f"c{index}", lr=5e-3, timeout=60))
        runners.append(Recorder(client, [random_batch(100 * index + i, VOCAB) for i in range(3)], 10 * (index + 1),
                                options=opts))

    def one(runner: Recorder) -> Recorder:
        try:
            runner.run()
        finally:
            runner.client.close()
        return runner

    with ThreadPoolExecutor(len(options)) as pool:
        return list(pool.map(one, runners))


def spy_uploads(coordinator: Coordinator) -> list[dict]:
    """Note, for each upload the coordinator takes, the round's allocation and what was uploaded."""
    seen = []
    take = coordinator.upload

    def upload(client, payload):
        take(client, payload)
        server_session = coordinator.server.by_client[client]
        seen.append({"round": payload.round, "client": client, "blocks": coordinator.allocation.blocks_for(client),
                     "client_side": set(payload.A), "whole": set(coordinator.uploads[client].factors),
                     "server_trainable": len(server_session.params), "fisher": payload.fisher})

    coordinator.upload = upload
    return seen


def in_blocks(modules, blocks) -> set[str]:
    return {m for m in modules if block_of(m) in blocks}


def test_fedra_clients_train_and_upload_exactly_their_allocation(tiny_models):
    path = tiny_models("bert")
    fed = FederationConfig(strategy="layermean", rounds=3, local_steps=2, min_clients=2, allocation="fedra",
                           cover_all=True, seed=3)
    with threaded_server(path, "2,1", num_labels=3, dropout=False, federation=fed) as (endpoint, server):
        coord = server.coordinator
        seen = spy_uploads(coord)
        runners = run_clients(path, endpoint, [FederatedOptions(capacity=1), FederatedOptions(capacity=3)])
        every_module = set(coord.shapes)
    assert len(seen) == 6 and [h.aggregated for h in coord.history] == [True] * 3
    for entry in seen:
        blocks = entry["blocks"]
        assert len(blocks) == (1 if entry["client"] == "c0" else 3)
        runner = runners[int(entry["client"][1])]
        assert runner.offered[entry["round"]] == blocks  # the download named them
        assert entry["client_side"] == in_blocks(runner.modules, blocks)  # the client uploaded only those
        assert entry["whole"] == in_blocks(every_module, blocks)  # and the server added only its allocated half
        assert entry["server_trainable"] == 2 * len(in_blocks(every_module, blocks & {2}))  # A and B each
    for r in range(3):
        assert set().union(*(e["blocks"] for e in seen if e["round"] == r)) == set(range(LAYERS))  # --cover-all
    allocations = [frozenset(e["blocks"]) for e in seen if e["client"] == "c1"]
    assert len(set(allocations)) > 1  # drawn afresh each round


def test_a_client_training_fewer_higher_blocks_saves_less_for_backward(tiny_models):
    # Lower blocks cost more (backward must reach them through every block above); block 2 is the server's.
    path = tiny_models("bert")
    costs = {0: 400_000, 1: 300_000, 2: 10_000, 3: 100_000}
    fed = FederationConfig(strategy="layermean", rounds=2, local_steps=2, min_clients=2, allocation="fedpilot")
    with threaded_server(path, "2,1", num_labels=3, dropout=False, federation=fed) as (endpoint, server):
        seen = spy_uploads(server.coordinator)
        # The small client's plan (--profile) named block 3: the server allocates instead, within its budget.
        small, large = run_clients(path, endpoint, [FederatedOptions(train_memory=150_000, block_costs=costs,
                                                                     blocks=[3], blocks_planned=True),
                                                    FederatedOptions(train_memory=1_000_000, block_costs=costs)])
    # The knapsack fits {2, 3} (110 kB) in the small budget and every block in the large one.
    assert small.offered[0] == {2, 3} and large.offered[0] == {0, 1, 2, 3}
    for entry in seen:
        assert sum(costs[b] for b in entry["blocks"]) <= (150_000 if entry["client"] == "c0" else 1_000_000)
    # Measured with autograd's saved-tensor hooks in each client's steps (a tiny model's RSS is all noise).
    assert len(small.saved) == len(large.saved) == 4
    assert max(small.saved) < 0.75 * min(large.saved)


def test_fisher_scores_come_from_both_sides_and_drive_the_next_round(tiny_models):
    path = tiny_models("bert")
    fed = FederationConfig(strategy="layermean", rounds=2, local_steps=2, min_clients=2, allocation="fisher")
    with threaded_server(path, "2,1", num_labels=3, dropout=False, federation=fed) as (endpoint, server):
        coord = server.coordinator
        seen = spy_uploads(coord)
        plans = []
        plan = coord.allocation.plan

        def noted(round_index, clients):
            known = {c: dict(coord.allocation.fisher.get(c, {})) for c in clients}
            plans.append((round_index, known, {c: coord.allocation.values(c) for c in clients}))
            return plan(round_index, clients)

        coord.allocation.plan = noted
        run_clients(path, endpoint, [FederatedOptions(capacity=2), FederatedOptions(capacity=3)])
    (_, _, _), (_, scores, values) = plans
    for entry in (e for e in seen if e["round"] == 0):
        blocks, mine = entry["blocks"], scores[entry["client"]]
        assert set(entry["fisher"]) == blocks - {2}  # the client scores its own blocks
        assert set(mine) == blocks  # the server adds block 2's when it was allocated
        assert all(v > 0 for v in mine.values())
        # Round 1 valued the blocks by round 0's scores; unmeasured ones above every measured one.
        top = max(mine.values())
        for b in range(LAYERS):
            assert values[entry["client"]][b] == pytest.approx(mine[b] / top if b in mine else 2.0)


# ---------------------------------------------------------------- what the client says it affords


def test_block_costs_come_from_the_cost_model(tiny_models):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_models("bert"), num_labels=3)
    costs = block_costs(config, 2, 1, rank=4, batch=8, seq_len=16, num_labels=3)
    assert sorted(costs) == list(range(LAYERS)) and costs[2] == 0  # block 2 is the server's: free here
    assert costs[0] >= costs[1] > 0 and costs[3] > 0
    wider = block_costs(config, 2, 1, rank=4, batch=16, seq_len=16, num_labels=3)
    assert all(wider[b] > costs[b] for b in (0, 1, 3))  # activations grow with the batch


def test_a_plan_gives_capacity_and_budget_unless_the_command_line_says_otherwise():
    from argparse import Namespace

    from profiles.planner import ClientPlan

    plan = ClientPlan("pi5", 1, 1, 8, [4, 5], 8, 64, 1 << 30, 1 << 32, 1, 1, 0.1, 3 << 20, 2)
    args = Namespace(capacity=None, train_memory_mb=None)
    planned_budget(args, plan)
    assert (args.capacity, args.train_memory_mb) == (2, 3.0)
    planned_budget(Namespace(capacity=2, train_memory_mb=3.0), plan)  # saying the same is fine
    with pytest.raises(ValueError, match="--capacity 4 conflicts with the server's plan for 'pi5', which gives "
                                         "--capacity 2"):
        planned_budget(Namespace(capacity=4, train_memory_mb=None), plan)


def test_a_client_with_a_profile_gets_its_blocks_allocated_within_its_plan(tmp_path, capsys):
    import json

    from conftest import save_tiny_with_tokenizer
    from profiles.plan_command import _model
    from profiles.planfile import PlanFile
    from profiles.planner import ClientPlan
    from profiles.schema import builtin_profiles
    from split.cli import main

    bert = save_tiny_with_tokenizer("bert", tmp_path / "bert")
    path, config, model = _model(str(bert), 3)
    # A plan entry as the planner writes one (its predictions play no part here): blocks 2 and 3 train,
    # and their memory is the budget for whatever the server allocates.
    budget = sum(block_costs(config, 1, 1, rank=4, batch=4, seq_len=16, num_labels=3)[b] for b in (2, 3))
    plan = ClientPlan(builtin_profiles()["pi4"].name, 1, 1, 4, [2, 3], 4, 16, 1 << 28, 1 << 32, 1, 1, 0.05,
                      budget, 2)
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(PlanFile(model, 16, (1, 1), {plan.device: plan}).to_json())
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"{w} is here today", "label": "abc"[i % 3]}) + "\n"
                            for i, w in enumerate(["red", "blue", "green", "apple", "pear", "plum"] * 4)))
    fed = FederationConfig(strategy="layermean", rounds=2, min_clients=1, local_steps=2, allocation="fedpilot")
    with threaded_server(bert, "1,1", dropout=False, federation=fed, plan=str(plan_path)) as (endpoint, server):
        coord = server.coordinator
        seen = spy_uploads(coord)
        assert main(["client", "--server", endpoint, "--model", str(bert), "--data", str(data), "--no-progress",
                     "--no-dropout", "--profile", "pi4", "--id", "board"]) == 0
        capsys.readouterr()
    resources = coord.allocation.resources["board"]
    assert coord.members["board"].info.blocks is None  # the plan's blocks were not sent: the server allocates
    assert (resources.capacity, resources.train_memory) == (plan.capacity, plan.train_memory)
    assert sorted(resources.block_costs) == list(range(LAYERS))  # from the client's cost model
    assert [e["round"] for e in seen] == [0, 1]
    for entry in seen:
        blocks = entry["blocks"]
        assert len(blocks) <= plan.capacity
        assert sum(resources.block_costs[b] for b in blocks) <= plan.train_memory


# ---------------------------------------------------------------- the wire


def wire(msg: Message) -> Message:
    return decode(encode(msg))


def test_allocation_fields_round_trip():
    join = Join(4, 8.0, 30, {"m": (4, 4)}, capacity=2, train_memory=1 << 30, block_costs={0: 5, 11: 7})
    assert Join.from_message(wire(join.to_message())) == join
    settings = FederationSettings("layermean", 3, 2, allocation="fedpilot")
    assert FederationSettings.from_meta(settings.to_meta(), "join reply") == settings
    offer = RoundOffer("train", 1, rank=4, blocks=frozenset({0, 3}), fisher=True)
    back = RoundOffer.from_message(wire(offer.to_message("c")))
    assert (back.blocks, back.fisher) == ({0, 3}, True)
    assert RoundOffer.from_message(wire(RoundOffer("train", 1, rank=4).to_message("c"))).blocks is None
    upload = UploadPayload(1, 3, 4, fisher={0: 0.5, 3: 2.0})
    assert UploadPayload.from_message(wire(upload.to_message())).fisher == {0: 0.5, 3: 2.0}
    assert UploadPayload.from_message(wire(UploadPayload(1, 3, 4).to_message())).fisher is None


JOIN = Join(4, 8.0, 30, {"m": (4, 4)})


@pytest.mark.parametrize("payload, fix, message", [
    (JOIN, lambda m: m.meta.update(capacity=0), "'capacity' must be an integer >= 1"),
    (JOIN, lambda m: m.meta.update(train_memory=1.5), "'train_memory' must be an integer >= 1"),
    (JOIN, lambda m: m.meta.update(train_memory=1 << 51), "'train_memory' must be at most"),
    (JOIN, lambda m: m.meta.update(block_costs={"x": 1}), "keyed by block indices"),
    (JOIN, lambda m: m.meta.update(block_costs={"01": 1}), "keyed by block indices"),
    (JOIN, lambda m: m.meta.update(block_costs={"0": -1}), "memory cost of block 0 must be an integer"),
    (JOIN, lambda m: m.meta.update(block_costs={"0": True}), "memory cost of block 0 must be an integer"),
    (JOIN, lambda m: m.meta.update(block_costs={str(b): 1 for b in range(MAX_BLOCKS + 1)}),
     f"names {MAX_BLOCKS + 1} blocks, at most {MAX_BLOCKS}"),
    (RoundOffer("train", 0, rank=4), lambda m: m.meta.update(blocks=[1, 1]), "distinct block indices"),
    (RoundOffer("train", 0, rank=4), lambda m: m.meta.update(blocks=["1"]), "distinct block indices"),
    (RoundOffer("train", 0, rank=4), lambda m: m.meta.update(fisher=1), "'fisher' must be true or false"),
    (UploadPayload(0, 1, 4), lambda m: m.meta.update(fisher={"0": float("nan")}), "gradient score of block 0"),
    (UploadPayload(0, 1, 4), lambda m: m.meta.update(fisher={"0": -1.0}), "gradient score of block 0"),
    (UploadPayload(0, 1, 4), lambda m: m.meta.update(fisher=[1.0]), "'fisher' must be a map"),
])
def test_bad_allocation_fields_are_refused_by_name(payload, fix, message):
    msg = payload.to_message() if not isinstance(payload, RoundOffer) else payload.to_message("c")
    fix(msg)
    with pytest.raises(ProtocolError, match=message):
        type(payload).from_message(wire(msg))


plain = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=3), max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(fields=st.dictionaries(st.sampled_from(["capacity", "train_memory", "block_costs", "blocks", "fisher"]),
                              plain, max_size=4), parser=st.sampled_from([Join, RoundOffer, UploadPayload]))
def test_hostile_allocation_fields_raise_only_protocol_errors(fields, parser):
    base = {Join: JOIN.to_message(), RoundOffer: RoundOffer("train", 0, rank=4).to_message("c"),
            UploadPayload: UploadPayload(0, 1, 4).to_message()}[parser]
    base.meta.update(fields)
    try:
        parser.from_message(base)
    except ProtocolError:
        pass  # refused by name; any other exception fails the test


# ---------------------------------------------------------------- the coordinator's refusals


def coordinator(**kw) -> Coordinator:
    return Coordinator(FederationConfig(**{"min_clients": 1, "strategy": "layermean", **kw}), FakeServer(), LAYOUT)


def join(coord, client="c0", blocks=None, **resources):
    return coord.join(client, ClientInfo(client, 4, 8.0, blocks, 10), {CLIENT_MODULE: (6, 5)},
                      resources=Resources(**resources))


@pytest.mark.parametrize("argv, message", [
    (["--allocation", "fedra"], "--allocation and --cover-all set which blocks each round trains; this server runs "
                                "no federation: add --strategy layermean"),
    (["--strategy", "layermean", "--allocation", "fedpilot", "--cover-all"],
     "--cover-all applies to --allocation fedra, not fedpilot"),
])
def test_the_server_command_refuses_allocation_options_that_cannot_apply(argv, message, capsys):
    from split.cli import main

    assert main(["server", *argv]) == 2
    assert message in capsys.readouterr().err


def test_allocation_needs_a_block_subset_strategy():
    with pytest.raises(StrategyError, match="fedit: --allocation fedra gives clients block subsets; use"):
        coordinator(strategy="fedit", allocation="fedra")
    with pytest.raises(ValueError, match="--cover-all applies to --allocation fedra, not fedpilot"):
        FederationConfig(allocation="fedpilot", cover_all=True)


@pytest.mark.parametrize("blocks, resources, match", [
    (frozenset({0}), {}, "this server allocates the blocks every round"),
    (None, {"capacity": 3}, r"capacity 3 is outside 1..2"),
    (None, {"train_memory": 100}, "needs both train_memory and block_costs"),
    (None, {"train_memory": 100, "block_costs": {0: 10}}, r"must name every block 0..1 of the model"),
    (None, {"train_memory": 5, "block_costs": {0: 10, 1: 20}}, "holds no block"),
])
def test_joins_the_allocation_cannot_plan_for_are_refused(blocks, resources, match):
    coord = coordinator(allocation="fedpilot")
    with pytest.raises(FederationError, match=match):
        join(coord, blocks=blocks, **resources)
    assert not coord.members


def test_an_upload_outside_the_allocation_is_refused():
    from round_helpers import payload

    coord = coordinator(allocation="fedra")
    join(coord, capacity=1)
    coord.tick(0.0)
    offer = coord.poll("c0")
    assert len(offer.blocks) == 1
    if 0 in offer.blocks:  # the client-side module is allocated: the upload may carry it, with no gradient scores
        with pytest.raises(FederationError, match="gradient scores this server did not ask for"):
            coord.upload("c0", payload(coord, "c0", fisher={0: 1.0}))
    else:
        with pytest.raises(FederationError, match="not among the client-side modules declared at join within "
                                                  r"blocks \[1\]"):
            coord.upload("c0", payload(coord, "c0"))


# ---------------------------------------------------------------- values move the allocation


def _glob(values: dict[str, float]) -> GlobalModel:
    return GlobalModel({m: torch.full((2, 3), v) for m, v in values.items()},
                       {m: torch.full((3, 2), v) for m, v in values.items()}, 2, 4.0)


MODS = {b: f"model.layers.{b}.self_attn.q_proj" for b in range(3)}


def _round(allocator: Allocator, moves: dict[int, float]) -> None:
    """One aggregated round in which client c0 moved each block of ``moves`` by that much."""
    before = _glob({m: 0.0 for m in MODS.values()})
    after = _glob({MODS[b]: 0.0 for b in MODS} | {MODS[b]: v for b, v in moves.items()})
    factors = {MODS[b]: Factors(torch.full((2, 3), v), torch.full((3, 2), v), 4.0) for b, v in moves.items()}
    allocator.observe_round(before, after, [Upload("c0", factors, 10, 2, frozenset(moves))])


def test_fedpilot_explores_unseen_blocks_then_follows_the_largest_updates():
    allocator = Allocator("fedpilot", 3)
    allocator.register("c0", Resources(capacity=1))
    assert allocator.plan(0, ["c0"]) == {"c0": {0}}  # nothing known: every value 1, ties to the lowest block
    _round(allocator, {0: 0.1})
    assert allocator.plan(1, ["c0"]) == {"c0": {1}}  # block 0 is known and small; 1 has the optimistic value
    _round(allocator, {1: 0.05})
    assert allocator.plan(2, ["c0"]) == {"c0": {2}}
    _round(allocator, {2: 1.0})
    assert allocator.plan(3, ["c0"]) == {"c0": {2}}  # all seen: the block that moves most
    _round(allocator, {2: 0.01})
    assert allocator.plan(4, ["c0"]) == {"c0": {0}}  # block 2 has calmed down: block 0 is now the largest


def test_fisher_allocation_follows_the_scores_within_the_memory_budget():
    allocator = Allocator("fisher", 3)
    allocator.register("c0", Resources(train_memory=300, block_costs={0: 250, 1: 100, 2: 100}))
    assert allocator.plan(0, ["c0"]) == {"c0": {1, 2}}  # nothing measured: two cheap blocks beat one dear one
    allocator.observe_gradients("c0", {1: 1.0, 2: 0.5})
    assert allocator.plan(1, ["c0"]) == {"c0": {0}}  # block 0, never measured, is tried next
    allocator.observe_gradients("c0", {0: 0.2})
    assert allocator.plan(2, ["c0"]) == {"c0": {1, 2}}  # 1 + 0.5 beats 0.2
    allocator.observe_gradients("c0", {0: 4.0})
    assert allocator.plan(3, ["c0"]) == {"c0": {0}}  # relative to the largest: 1 beats 0.25 + 0.125


def test_allocation_state_survives_a_snapshot():
    allocator = Allocator("fedpilot", 3)
    _round(allocator, {0: 0.2, 2: 0.4})
    copy = Allocator("fedpilot", 3)
    copy.restore(json.loads(json.dumps(allocator.snapshot())))  # as a checkpoint's coordinator.json holds it
    assert copy.local == allocator.local and copy.global_norms == allocator.global_norms
    fisher = Allocator("fisher", 3)
    fisher.observe_gradients("c0", {1: 0.5})
    again = Allocator("fisher", 3)
    again.restore(json.loads(json.dumps(fisher.snapshot())))
    assert again.fisher == {"c0": {1: 0.5}}
    coord = coordinator(allocation="fisher")
    coord.allocation.observe_gradients("c0", {1: 0.5})
    snap = json.loads(json.dumps(coord.snapshot()["allocation"]))
    resumed = coordinator(allocation="fisher")
    resumed.restore({**coord.snapshot(), "allocation": snap})
    assert resumed.allocation.fisher == {"c0": {1: 0.5}}
