"""The planner's codec choice: the most precise allowed codec within 10% of
the fastest step, up first; plans, plan files and `fedsplit plan` carry it."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random

import pytest
import torch

from conftest import minilm_path
from profiles.codec_choice import SLACK, choose_codecs, parse_codec_list, precision
from profiles.cost import ModelShape, Plan, predict_step_time, step_bytes
from profiles.planfile import PlanFile, PlanFileError, PlanModel, parse_plan
from profiles.planner import PlanningError, plan_clients
from profiles.schema import builtin_profiles
from split.cli import main
from split.codecs import encoded_nbytes, parse_codec
from split.partition import load_config

BUILTIN = builtin_profiles()
ALL = parse_codec_list("topk:density=0.1,nf4,int8,int8:outliers=4,bf16,fp16,fp32,topk:density=0.5,nf4:block=32")


@pytest.fixture(scope="module")
def minilm():
    return ModelShape.from_config(load_config(minilm_path(), "classification", 2, True), num_labels=2)


def link_time(compute: float, up_mbps: float, down_mbps: float, numel: int = 16 * 64 * 384):
    """A step time like the cost model's: compute plus each direction's bytes over its link."""
    def time(up, down) -> float:
        up_bytes = 2 * encoded_nbytes((numel,), torch.float32, up)  # the forward's hidden state and the gradient
        down_bytes = 2 * encoded_nbytes((numel,), torch.float32, down)
        return compute + up_bytes * 8 / (up_mbps * 1e6) + down_bytes * 8 / (down_mbps * 1e6)
    return time


def test_precision_orders_lossless_first_and_finer_parameters_before_coarser():
    texts = [s.text for s in sorted(ALL, key=precision, reverse=True)]
    assert texts == [parse_codec(t).text for t in ("fp32", "fp16", "bf16", "int8:outliers=4", "int8",
                                                   "nf4:block=32", "nf4", "topk:density=0.5",
                                                   "topk:density=0.1")]


def test_a_fast_link_keeps_fp32_and_a_slow_one_compresses():
    # A gigabit link: fp32's bytes cost well under 10% of the step.
    up, down = choose_codecs(link_time(0.5, 1000, 1000), ALL)
    assert (up.text, down.text) == ("fp32", "fp32")
    # 20 Mbit/s up, 50 down, 0.5 s of compute: fp32 takes 1.8 s on the wire.
    up, down = choose_codecs(link_time(0.5, 20, 50), ALL)
    time = link_time(0.5, 20, 50)
    fastest = min(time(u, d) for u in ALL for d in ALL)
    assert time(up, down) <= fastest * (1 + SLACK)
    assert precision(up) < precision(parse_codec("fp16"))  # fp16 is too slow there
    # Only what the user allows is chosen.
    allowed = parse_codec_list("fp32,fp16")
    assert choose_codecs(time, allowed) == (parse_codec("fp16"), parse_codec("fp16"))
    assert choose_codecs(time, parse_codec_list("fp32")) == (parse_codec("fp32"), parse_codec("fp32"))


def test_a_precise_codec_within_the_slack_beats_a_faster_one():
    fp32, fp16, int8 = parse_codec_list("fp32,fp16,int8")
    seconds = {fp32: 1.0, fp16: 0.53, int8: 0.50}  # fp16 is 6% slower than int8: within 10%
    assert choose_codecs(lambda u, d: seconds[u] + seconds[d] / 10, [fp32, fp16, int8]) == (fp16, fp16)
    seconds[fp16] = 0.6  # now 20% slower up: int8 up; down it costs 1% of the step, so fp32 there
    assert choose_codecs(lambda u, d: seconds[u] + seconds[d] / 10, [fp32, fp16, int8]) == (int8, fp32)


def test_the_rule_holds_on_random_step_times():
    """Brute force over random additive step times: the pair is within the
    slack of the fastest, no more precise uplink codec could be, and given the
    uplink no more precise downlink codec could be."""
    rng = random.Random(0)
    specs = list(ALL)
    for _ in range(200):
        allowed = rng.sample(specs, rng.randint(1, len(specs)))
        cost_up = {s: rng.uniform(0, 2) for s in allowed}
        cost_down = {s: rng.uniform(0, 2) for s in allowed}
        compute = rng.uniform(0, 3)

        def time(u, d):
            return compute + cost_up[u] + cost_down[d]

        up, down = choose_codecs(time, allowed)
        limit = min(time(u, d) for u, d in itertools.product(allowed, allowed)) * (1 + SLACK)
        assert time(up, down) <= limit
        assert not any(precision(u) > precision(up) and min(time(u, d) for d in allowed) <= limit for u in allowed)
        assert not any(precision(d) > precision(down) and time(up, d) <= limit for d in allowed)


def test_codec_lists_are_checked():
    assert [s.text for s in parse_codec_list(" fp32, int8 ")] == ["fp32", "int8"]
    for text, message in (("", "separated by commas"), ("fp32,,int8", "separated by commas"),
                          ("fp32,fp32", "listed twice"), ("fp32,zip", "zip")):
        with pytest.raises(ValueError, match=message):
            parse_codec_list(text)
    with pytest.raises(ValueError, match="no codecs"):
        choose_codecs(lambda u, d: 1.0, [])


def test_the_planner_gives_slow_links_a_codec_and_fast_ones_fp32(minilm):
    # The same board on its 20 Mbit/s Wi-Fi and on a 10 Gbit/s wire, where its compute is the step.
    wired = dataclasses.replace(BUILTIN["pi5"], name="Pi 5 on a wire", uplink_mbps=1e4, downlink_mbps=1e4, rtt_ms=0.1)
    profiles = [BUILTIN["pi5"], wired]
    default = plan_clients(minilm, profiles, seq_len=64)
    assert all((p.codec_up, p.codec_down) == ("fp32", "fp32") for p in default)  # unchanged unless asked
    plans = plan_clients(minilm, profiles, seq_len=64, codecs=("fp32", "fp16", "int8"))
    pi5, on_a_wire = plans
    assert (on_a_wire.codec_up, on_a_wire.codec_down) == ("fp32", "fp32")
    assert pi5.codec_up == "int8" and pi5.codec_down in ("int8", "fp16")
    for profile, p in zip(profiles, plans):
        plan = p.plan()
        assert (plan.codec_up, plan.codec_down) == (p.codec_up, p.codec_down)
        assert p.predicted_step_s == pytest.approx(predict_step_time(minilm, plan, profile).total)
    # On the device's reference plan the choice is within 10% of the fastest pair.
    reference = Plan(1, 1, 4, 16, 64, frozenset({5}))
    times = {(u, d): predict_step_time(minilm, dataclasses.replace(reference, codec_up=u, codec_down=d),
                                       profiles[0]).total for u in ("fp32", "fp16", "int8") for d in
             ("fp32", "fp16", "int8")}
    assert times[pi5.codec_up, pi5.codec_down] <= min(times.values()) * (1 + SLACK)
    # The time the codec gives back is capacity: the Pi's step is faster than with fp32.
    assert pi5.predicted_step_s < default[0].predicted_step_s
    with pytest.raises(PlanningError, match="listed twice"):
        plan_clients(minilm, profiles, seq_len=64, codecs=("int8", "int8"))


def test_plan_files_carry_the_codecs_and_refuse_bad_ones(minilm):
    plans = plan_clients(minilm, [BUILTIN["pi5"]], seq_len=64, codecs=("fp32", "int8:outliers=4"))
    plan = PlanFile(PlanModel("bert", 6, 384), 64, (1, 1), {p.device: p for p in plans})
    data = json.loads(plan.to_json())
    entry = data["clients"][BUILTIN["pi5"].name]
    assert entry["codec_up"] == parse_codec("int8:outliers=4").text
    assert parse_plan(plan.to_json(), "plan.json") == plan
    for value, message in (("zip", "field 'codec_up'"), (8, "field 'codec_up' must be a codec"),
                           ("x" * 500, "must be a codec")):
        entry["codec_up"] = value
        with pytest.raises(PlanFileError, match=message):
            parse_plan(json.dumps(data), "plan.json")
    del entry["codec_up"]
    with pytest.raises(PlanFileError, match="field 'codec_up' is missing"):
        parse_plan(json.dumps(data), "plan.json")
    with pytest.raises(ValueError, match="codec_down"):
        Plan(1, 1, 4, 16, 64, codec_down="zip")


def test_fedsplit_plan_takes_codecs(tmp_path, capsys):
    out_file = tmp_path / "plan.json"
    assert main(["plan", "--profiles", "pi5", "--codecs", "fp32,int8", "--json", str(out_file)]) == 0
    out = capsys.readouterr().out
    plan = parse_plan(out_file.read_text(), "plan.json")
    assert plan.clients[BUILTIN["pi5"].name].codec_up == "int8"
    assert "codec up / down" in out and "int8 / int8" in out
    assert main(["plan", "--profiles", "pi5", "--json", str(out_file)]) == 0  # the default: lossless
    assert parse_plan(out_file.read_text(), "plan.json").clients[BUILTIN["pi5"].name].codec_up == "fp32"
    with pytest.raises(SystemExit) as info:
        main(["plan", "--profiles", "pi5", "--codecs", "fp32,zip"])
    assert info.value.code == 2 and "--codecs: unknown codec 'zip'; known: fp32" in capsys.readouterr().err


@pytest.mark.parametrize("family,cut,up,down", [("bert", "1,1", "int8", "topk:density=0.1"),
                                                ("llama", "2,1", "topk:density=0.25", "int8:outliers=4"),
                                                ("bert", "1,1", "nf4:block=32", "fp16"),
                                                ("gpt2", "1,0", "int8", "int8")])
def test_step_bytes_equal_what_a_client_counts_in_its_codecs(tiny_models, family, cut, up, down):
    """The cost model's bytes of a step in the plan's codecs are the bytes the
    client's connection counts, headers (with the codecs' params) included."""
    from conftest import VOCAB, random_batch, threaded_server
    from edge.client import ClientConfig, SplitClient
    from split.lora import LoraSpec
    from split.partition import Cut

    folder = tiny_models(family)
    c = Cut.parse(cut)
    plan = Plan(c.front, c.back, rank=4, batch=6, seq_len=12, codec_up=up, codec_down=down)
    shape = ModelShape.from_config(load_config(folder, "classification", 3, True), num_labels=3)
    with threaded_server(folder, cut, num_labels=3) as (endpoint, _):
        client = SplitClient(ClientConfig(server=endpoint, model=str(folder), num_labels=3, lora=LoraSpec(4, 8.0),
                                          cut=c, timeout=60, codec_up=up, codec_down=down))
        try:
            client.train_step(random_batch(0, VOCAB, batch=6, max_len=12))
            counted = []
            for seed in (1, 2):
                sent, received = client.conn.bytes_sent, client.conn.bytes_received
                client.train_step(random_batch(seed, VOCAB, batch=6, max_len=12))
                counted.append((client.conn.bytes_sent - sent, client.conn.bytes_received - received))
        finally:
            client.close()
    predicted = step_bytes(shape, plan)
    lossless = step_bytes(shape, Plan(c.front, c.back, rank=4, batch=6, seq_len=12))
    for up_bytes, down_bytes in counted:
        # Headers differ by a few bytes with the request ids and tokens' msgpack widths.
        assert abs(predicted[0] - up_bytes) <= 16 and abs(predicted[1] - down_bytes) <= 16, (predicted, counted)
    assert predicted[0] < lossless[0] and (predicted[1] < lossless[1] or c.two_part)


def test_a_client_with_a_profile_takes_the_plans_codecs(minilm, monkeypatch):
    """``fedsplit client --profile`` sets --codec-up/--codec-down from the
    plan; the same codec given (in any spelling) is fine, another an error
    naming both."""
    import edge.planned as planned
    from split.cli import build_parser

    entry, = plan_clients(minilm, [BUILTIN["pi5"]], seq_len=64, codecs=("fp32", "int8:outliers=4"))
    assert entry.codec_up == "int8:outliers=4"
    monkeypatch.setattr(planned, "fetch_plan", lambda *args: entry)
    base = ["client", "--server", "tcp://127.0.0.1:9", "--profile", "pi5", "--data", "builtin"]
    for extra in ([], ["--codec-up", "int8:outliers=4"], ["--codec-down", f"{entry.codec_down} "]):
        args = build_parser().parse_args(base + extra)
        planned.apply_profile(args, base[1:] + extra)
        assert (args.codec_up, args.codec_down) == (entry.codec_up, entry.codec_down)
    args = build_parser().parse_args(base + ["--codec-up", "int8"])
    with pytest.raises(ValueError, match=r"--codec-up int8 conflicts with the server's plan for 'Raspberry Pi 5 "
                                         r"\(8 GB\)', which gives --codec-up int8:outliers=4"):
        planned.apply_profile(args, base[1:] + ["--codec-up", "int8"])


def test_a_codec_list_keeps_a_codecs_later_parameters_with_it():
    assert [s.text for s in parse_codec_list("fp32, topk:density=0.1,ef=1,int8:outliers=2")] == [
        "fp32", "topk:density=0.1,ef=1", "int8:outliers=2"]
    for bad, error in [("ef=1,fp32", "no codec before it"), ("fp32,,int8", "an empty item"),
                       ("fp16,ef=1", "no codec before it")]:
        with pytest.raises(ValueError, match=error):
            parse_codec_list(bad)
