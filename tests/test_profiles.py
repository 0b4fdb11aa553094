"""Device profiles: the schema and its errors, the built-in devices, the
measured profile (`fedsplit profile`), and the probe op it times links with."""

from __future__ import annotations

import math
import shutil
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import threaded_server
from profiles import measure
from profiles.link import next_size, rate_mbps
from profiles.measure import matmul_gflops
from profiles.schema import (FIGURES, DeviceProfile, ProfileError, builtin_profiles, load_profile, parse_profile,
                             profile_to_toml, resolve_profile)
from split.cli import main
from split.keys import create_keys
from split.launch import free_port
from split.probe import MAX_PROBE_BYTES, PAYLOAD, ProbeReply, ProbeRequest
from split.transport import Connection, ServerError
from split.wire import Limits, Message

BUILTIN = {"jetson-nano", "orin-nano", "agx-orin", "pi4", "pi5", "laptop", "workstation"}

GOOD = """\
name = "Test board"
memory_gb = 3.5
gflops_fp32 = 16.0
gflops_fp16 = 32.0
accelerator = "unified"
uplink_mbps = 20.0
downlink_mbps = 40.0
rtt_ms = 12.5
bitsandbytes = false

[sources]
memory_gb = "datasheet"
gflops_fp32 = "datasheet"
gflops_fp16 = "assumed: twice fp32"
accelerator = "datasheet"
uplink_mbps = "assumed"
downlink_mbps = "assumed"
rtt_ms = "assumed"
bitsandbytes = "tried"
"""


def _with(line: str, new: str | None) -> str:
    """GOOD with the line starting ``line`` replaced by ``new`` (None: removed)."""
    out = []
    for text in GOOD.splitlines():
        if text.startswith(line):
            if new is not None:
                out.append(new)
        else:
            out.append(text)
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- the schema


def test_every_builtin_profile_loads_with_a_source_for_every_figure():
    profiles = builtin_profiles()
    assert set(profiles) == BUILTIN
    for stem, profile in profiles.items():
        assert resolve_profile(stem) == profile
        given = {k for k in FIGURES if getattr(profile, k) is not None}
        assert set(profile.sources) == given, stem
        assert profile.memory_bytes == int(profile.memory_gb * 2 ** 30)
    # The figures the reference notes give, where they are quoted as they are.
    assert profiles["agx-orin"].gflops_fp32 == 5300.0
    assert profiles["pi4"].gflops_fp32 == 2 * 8.0  # fp64 HPL x 2 NEON lanes
    assert profiles["jetson-nano"].accelerator == "cpu"  # JetPack 4 stops at PyTorch 1.13
    assert not profiles["orin-nano"].bitsandbytes and not profiles["agx-orin"].bitsandbytes
    assert all(p.memory_gb < total for p, total in
               [(profiles["jetson-nano"], 4), (profiles["orin-nano"], 8), (profiles["agx-orin"], 64),
                (profiles["pi4"], 4), (profiles["pi5"], 8), (profiles["laptop"], 16), (profiles["workstation"], 24)])


def test_a_profile_round_trips_through_toml():
    for profile in builtin_profiles().values():
        assert parse_profile(profile_to_toml(profile), "again") == profile
    parsed = parse_profile(GOOD, "good.toml")
    assert parse_profile(profile_to_toml(parsed), "again") == parsed
    assert (parsed.gflops("float32"), parsed.gflops("float16"), parsed.gflops(torch.bfloat16)) == (16.0, 32.0, 32.0)
    whole = parse_profile(_with("memory_gb = 3.5", "memory_gb = 4"), "x")
    assert isinstance(whole.memory_gb, float) and whole.memory_bytes == 4 * 2 ** 30
    without_half = parse_profile(_with("gflops_fp16", None), "x")
    assert without_half.gflops_fp16 is None and without_half.gflops("float16") == 16.0
    with pytest.raises(ProfileError, match="float64"):
        parsed.gflops("float64")


TEXT = st.text(st.characters(categories=("L", "N", "P", "S"), include_characters=" "), min_size=1, max_size=40)
POSITIVE = st.floats(min_value=1e-6, max_value=1e9, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(name=TEXT, source=TEXT, numbers=st.tuples(POSITIVE, POSITIVE, POSITIVE, POSITIVE, POSITIVE),
       half=st.one_of(st.none(), POSITIVE), rtt=st.floats(min_value=0, max_value=1e4),
       accelerator=st.sampled_from(["cpu", "cuda", "unified"]), bnb=st.booleans())
def test_any_valid_profile_round_trips(name, source, numbers, half, rtt, accelerator, bnb):
    name, source = name.strip() or "x", source.strip() or "x"
    memory, fp32, up, down, _ = numbers
    fields = dict(memory_gb=memory, gflops_fp32=fp32, gflops_fp16=half, uplink_mbps=up, downlink_mbps=down,
                  rtt_ms=rtt, accelerator=accelerator, bitsandbytes=bnb)
    sources = {k: f'{source} "{k}" \\ ' for k in FIGURES if fields[k] is not None}
    profile = DeviceProfile(name=name, sources=sources, **fields)
    assert parse_profile(profile_to_toml(profile), "fuzz.toml") == profile


TOML_VALUES = st.sampled_from(['""', '"cpu"', "0", "-3", "7", "1.5", "-0.0", "nan", "-inf", "true", "false", "[]",
                                "[1, 2]", "{}", '{ a = 1 }', "1979-05-27", '"\\u0000"', "1e400"])


@settings(max_examples=150, deadline=None)
@given(key=st.sampled_from(list(FIGURES) + ["name", "sources", "extra"]), value=TOML_VALUES,
       garbage=st.text(max_size=30))
def test_the_parser_answers_any_text_with_a_profile_or_a_profile_error(key, value, garbage):
    edited = _with(f"{key} =", f"{key} = {value}") if key not in ("sources", "extra") else \
        GOOD.replace("[sources]", f"{key} = {value}\n[sources]")
    for text in (edited, garbage, GOOD[:len(garbage)] + garbage):
        try:
            parse_profile(text, "fuzz.toml")
        except ProfileError as exc:
            assert str(exc).startswith("fuzz.toml: ")


# (what is wrong, the edit to GOOD, the field the error must name, what it must say)
NUMBER = "must be a finite number > 0"
BAD = [
    ("missing field", ("memory_gb = 3.5", None), "memory_gb", "is missing; expected a finite number > 0"),
    ("missing name", ("name = ", None), "name", "is missing; expected a printable string"),
    ("string for a number", ("memory_gb = 3.5", 'memory_gb = "4"'), "memory_gb", NUMBER),
    ("bool for a number", ("gflops_fp32 = 16", "gflops_fp32 = true"), "gflops_fp32", NUMBER),
    ("number for a bool", ("bitsandbytes = false", "bitsandbytes = 1"), "bitsandbytes", "must be true or false"),
    ("number for a string", ('accelerator = "unified"', "accelerator = 3"), "accelerator",
     "must be one of cpu, cuda, unified"),
    ("negative memory", ("memory_gb = 3.5", "memory_gb = -1.0"), "memory_gb", NUMBER),
    ("zero memory", ("memory_gb = 3.5", "memory_gb = 0"), "memory_gb", NUMBER),
    ("zero bandwidth", ("uplink_mbps = 20", "uplink_mbps = 0.0"), "uplink_mbps", NUMBER),
    ("negative bandwidth", ("downlink_mbps = 40", "downlink_mbps = -5"), "downlink_mbps", NUMBER),
    ("zero throughput", ("gflops_fp32 = 16", "gflops_fp32 = 0.0"), "gflops_fp32", NUMBER),
    ("negative rtt", ("rtt_ms = 12", "rtt_ms = -1.0"), "rtt_ms", "must be a finite number >= 0"),
    ("NaN", ("memory_gb = 3.5", "memory_gb = nan"), "memory_gb", NUMBER),
    ("infinity", ("gflops_fp16 = 32", "gflops_fp16 = inf"), "gflops_fp16", NUMBER),
    ("unknown key", ("rtt_ms = 12", "rtt_ms = 1.0\ncores = 4"), "cores", "unknown field"),
    ("unknown accelerator", ('accelerator = "unified"', 'accelerator = "tpu"'), "accelerator",
     "must be one of cpu, cuda"),
    ("empty name", ("name = ", 'name = ""'), "name", "must be a printable string of 1 to"),
    ("figure without source", ('rtt_ms = "assumed"', None), "rtt_ms", "has no source: add rtt_ms ="),
    ("source of an unknown field", ('rtt_ms = "assumed"', 'rtt_ms = "assumed"\ncores = "lscpu"'), "cores",
     "unknown field"),
    ("source of a figure not given", ("gflops_fp16 = 32", None), "gflops_fp16", "give the figure, or remove"),
    ("empty source", ('memory_gb = "datasheet"', 'memory_gb = " "'), "memory_gb", "must be one line of 1 to"),
    ("source not a string", ('memory_gb = "datasheet"', "memory_gb = 4"), "memory_gb", "must be one line of"),
    ("no sources table", ("[sources]", "[elsewhere]"), "elsewhere", "unknown field"),
    ("bad TOML", ("rtt_ms = 12", "rtt_ms = = 3"), "line 8", "not valid TOML"),
]


@pytest.mark.parametrize("why, edit, field, words", BAD, ids=[b[0] for b in BAD])
def test_a_bad_profile_is_an_error_naming_the_file_and_the_field(why, edit, field, words, tmp_path):
    path = tmp_path / "board.toml"
    path.write_text(_with(*edit))
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    text = str(info.value)
    assert text.startswith(f"{path}: ") and field in text and words in text, text


def test_a_sources_table_alone_missing_is_named(tmp_path):
    text = GOOD[:GOOD.index("[sources]")]
    with pytest.raises(ProfileError, match=r"x\.toml: the \[sources\] table is missing"):
        parse_profile(text, "x.toml")


def test_a_profile_built_in_code_is_checked_too():
    good = parse_profile(GOOD, "good.toml")
    fields = {k: getattr(good, k) for k in DeviceProfile.__dataclass_fields__}
    with pytest.raises(ProfileError, match="'uplink_mbps' must be a finite number > 0"):
        DeviceProfile(**{**fields, "uplink_mbps": 0.0})
    with pytest.raises(ProfileError, match="'rtt_ms' has no source"):
        DeviceProfile(**{**fields, "sources": {k: v for k, v in good.sources.items() if k != "rtt_ms"}})


def test_unknown_profiles_and_unreadable_files_are_named(tmp_path):
    with pytest.raises(ProfileError, match="unknown device profile 'pi9'.*pi5"):
        resolve_profile("pi9")
    with pytest.raises(ProfileError, match="missing.toml: cannot read"):
        resolve_profile(str(tmp_path / "missing.toml"))
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe name")
    with pytest.raises(ProfileError, match="binary.toml: not UTF-8"):
        load_profile(binary)
    copy = tmp_path / "mine.toml"
    shutil.copy(resolve_profile.__globals__["DEVICES_DIR"] / "pi4.toml", copy)
    assert resolve_profile(str(copy)) == builtin_profiles()["pi4"]


# ---------------------------------------------------------------- measuring


def test_matmul_gflops_is_positive_finite_and_quick():
    start = time.monotonic()
    gflops = matmul_gflops("cpu", torch.float32, seconds=0.2)
    assert math.isfinite(gflops) and gflops > 0
    assert time.monotonic() - start < 15
    with pytest.raises(ValueError, match="seconds must be"):
        matmul_gflops(seconds=float("nan"))


def test_a_jetson_gpu_is_unified_and_a_discrete_one_cuda(monkeypatch, tmp_path):
    # No GPU here: torch's CUDA queries are stood in for, the decision is the code's own.
    class Props:
        name, is_integrated = "Orin", 0

    monkeypatch.setattr(measure, "resolve_device", lambda name: torch.device("cuda:0"))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
    monkeypatch.setattr(measure, "TEGRA_RELEASE", tmp_path / "nv_tegra_release")
    assert measure.detect_accelerator("cuda").kind == "cuda"
    (tmp_path / "nv_tegra_release").write_text("# R36 (release)")
    found = measure.detect_accelerator("cuda")
    assert (found.kind, found.device) == ("unified", "cuda:0") and "Jetson" in found.found
    (tmp_path / "nv_tegra_release").unlink()
    Props.is_integrated = 1
    assert measure.detect_accelerator("cuda").kind == "unified"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10 * 2 ** 30, 24 * 2 ** 30))
    budget, how = measure.memory_budget(measure.Accelerator("cuda", "cuda:0", "a GPU"))
    assert budget == int(9 * 2 ** 30) and "GPU memory free" in how


@pytest.mark.parametrize("half, kept", [(300.0, 300.0), (105.0, None)])
def test_a_gpus_fp16_figure_is_kept_where_it_differs(monkeypatch, half, kept):
    monkeypatch.setattr(measure, "detect_accelerator", lambda device: measure.Accelerator("cuda", "cuda", "a GPU"))
    monkeypatch.setattr(measure, "memory_budget", lambda accel: (2 ** 30, "all of it"))
    monkeypatch.setattr(measure, "matmul_gflops", lambda device, dtype, seconds: 100.0 if dtype == torch.float32
                        else half)
    monkeypatch.setattr(measure, "bitsandbytes_usable", lambda device: (True, "it quantized"))
    profile = measure.measure_profile(uplink_mbps=1.0, downlink_mbps=2.0, rtt_ms=3.0)
    assert (profile.accelerator, profile.gflops_fp32, profile.gflops_fp16) == ("cuda", 100.0, kept)
    assert ("gflops_fp16" in profile.sources) == (kept is not None)


def test_link_arithmetic():
    assert rate_mbps(1_000_000, 1.01, 0.01) == pytest.approx(8.0)
    with pytest.raises(ValueError, match="too fast to time"):
        rate_mbps(1000, 0.001, 0.002)
    assert next_size(1000, 0.001, 0.25, 10 ** 9) == 16_000  # grows at most 16x
    assert next_size(1000, 0.1, 0.25, 10 ** 9) == 2500  # to the size expected to last the target
    assert next_size(1000, 0.2, 0.25, 10 ** 9) == 2000  # at least doubles
    assert next_size(1000, 0.001, 0.25, 4000) == 4000  # never past the server's limit


@pytest.fixture(scope="module")
def server(tiny_models):
    with threaded_server(tiny_models("bert"), "1,1", num_labels=3) as (endpoint, srv):
        yield endpoint, srv


def test_fedsplit_profile_measures_a_link_and_writes_a_profile_that_loads(server, tmp_path, capsys):
    endpoint, _ = server
    out = tmp_path / "me.toml"
    assert main(["profile", "--server", endpoint, "--out", str(out), "--name", "this box", "--seconds", "0.1"]) == 0
    printed = capsys.readouterr().out
    profile = load_profile(out)
    assert parse_profile(printed.split("# written to")[0], "stdout") == profile
    assert profile.name == "this box" and profile.accelerator == "cpu"
    for key in ("rtt_ms", "uplink_mbps", "downlink_mbps", "gflops_fp32", "memory_gb"):
        value = getattr(profile, key)
        assert math.isfinite(value) and value > 0, key
        assert profile.sources[key].startswith("measured by fedsplit profile on "), key
        assert "UTC" in profile.sources[key]
    assert endpoint in profile.sources["uplink_mbps"]
    # Loopback moves megabytes in milliseconds: anything below 100 Mbit/s would be a broken measurement.
    assert profile.uplink_mbps > 100 and profile.downlink_mbps > 100 and profile.rtt_ms < 100

    # An existing file is kept unless --force; a figure given wins over the measured one.
    assert main(["profile", "--server", endpoint, "--out", str(out)]) == 2
    assert "exists: give --force" in capsys.readouterr().err
    assert main(["profile", "--server", endpoint, "--out", str(out), "--force", "--rtt-ms", "42",
                 "--seconds", "0.1"]) == 0
    again = load_profile(out)
    assert again.rtt_ms == 42.0 and again.sources["rtt_ms"].startswith("given on the command line (--rtt-ms)")
    assert again.sources["uplink_mbps"].startswith("measured")


def test_without_a_server_the_link_figures_are_required(tmp_path, capsys):
    assert main(["profile", "--uplink-mbps", "20"]) == 2
    err = capsys.readouterr().err
    assert "give --server ADDR" in err and "--downlink-mbps, --rtt-ms" in err
    out = tmp_path / "given.toml"
    assert main(["profile", "--uplink-mbps", "20", "--downlink-mbps", "50", "--rtt-ms", "0", "--out", str(out),
                 "--seconds", "0.1"]) == 0
    profile = load_profile(out)
    assert (profile.uplink_mbps, profile.downlink_mbps, profile.rtt_ms) == (20.0, 50.0, 0.0)
    with pytest.raises(SystemExit) as info:
        main(["profile", "--uplink-mbps", "0"])
    assert info.value.code == 2 and "argument --uplink-mbps: must be > 0" in capsys.readouterr().err
    assert main(["profile", "--out", str(tmp_path / "no" / "such" / "dir.toml"), "--rtt-ms", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["profile", "--server", f"tcp://127.0.0.1:{free_port()}", "--timeout", "1"]) == 2
    assert "no answer from the server at tcp://127.0.0.1:" in capsys.readouterr().err


def test_fedsplit_profile_measures_an_encrypted_link_with_the_clients_keys(tiny_models, tmp_path, capsys):
    keys = tmp_path / "keys"
    for name in ("server", "device"):
        create_keys(keys, name)
    (keys / "allow").mkdir()
    shutil.copy(keys / "device.key", keys / "allow")
    with threaded_server(tiny_models("bert"), "1,1", num_labels=3, secret_key=str(keys / "server.key_secret"),
                         allow=str(keys / "allow")) as (endpoint, _):
        out = tmp_path / "curve.toml"
        assert main(["profile", "--server", endpoint, "--key", str(keys / "device.key_secret"), "--server-key",
                     str(keys / "server.key"), "--out", str(out), "--seconds", "0.1"]) == 0
        assert load_profile(out).uplink_mbps > 0
        # Without keys the encrypted server is out of reach, and the error says so.
        assert main(["profile", "--server", endpoint, "--timeout", "5", "--seconds", "0.1"]) == 2
        assert "fedsplit profile: error:" in capsys.readouterr().err


# ---------------------------------------------------------------- the probe op


def _request(conn: Connection, msg: Message) -> Message:
    return conn.request(msg, retry=False)


def test_a_probe_carries_bytes_both_ways_without_a_session(server):
    endpoint, _ = server
    conn = Connection(endpoint, "unregistered", timeout=10)
    try:
        for request in (ProbeRequest(), ProbeRequest(payload=1000), ProbeRequest(reply_bytes=MAX_PROBE_BYTES)):
            reply = ProbeReply.from_message(_request(conn, request.to_message()), request)
            assert (reply.received, reply.payload, reply.max_bytes) == \
                (request.payload, request.reply_bytes, MAX_PROBE_BYTES)
    finally:
        conn.close()


def _probe(payload=None, **meta) -> Message:
    return Message("probe", meta=meta, tensors={} if payload is None else payload)


# (what is wrong, the request, the error code, words of the error)
BAD_PROBES = [
    ("reply too large", _probe(reply_bytes=MAX_PROBE_BYTES + 1), "refused", "at most"),
    ("payload too large", _probe({PAYLOAD: torch.zeros(MAX_PROBE_BYTES + 1, dtype=torch.uint8)}, reply_bytes=0),
     "refused", "at most"),
    ("negative reply", _probe(reply_bytes=-1), "malformed", "reply_bytes"),
    ("reply as text", _probe(reply_bytes="8"), "malformed", "reply_bytes"),
    ("reply as float", _probe(reply_bytes=8.0), "malformed", "reply_bytes"),
    ("reply as bool", _probe(reply_bytes=True), "malformed", "reply_bytes"),
    ("reply missing", _probe(), "malformed", "reply_bytes"),
    ("payload of floats", _probe({PAYLOAD: torch.zeros(4)}, reply_bytes=0), "malformed", "uint8"),
    ("payload 2-D", _probe({PAYLOAD: torch.zeros(2, 2, dtype=torch.uint8)}, reply_bytes=0), "malformed", "1-D"),
    ("another tensor", _probe({"other": torch.zeros(2, dtype=torch.uint8)}, reply_bytes=0), "malformed", "other"),
]


@pytest.mark.parametrize("why, msg, code, words", BAD_PROBES, ids=[b[0] for b in BAD_PROBES])
def test_a_bad_probe_is_refused_and_the_server_keeps_serving(server, why, msg, code, words):
    endpoint, _ = server
    conn = Connection(endpoint, "prober", timeout=10)
    try:
        with pytest.raises(ServerError) as info:
            _request(conn, msg)
        assert info.value.code == code and words in str(info.value)
        assert _request(conn, Message("status")).op == "ok"
        good = ProbeRequest(payload=10, reply_bytes=10)
        assert ProbeReply.from_message(_request(conn, good.to_message()), good).payload == 10
    finally:
        conn.close()


def test_the_probe_limit_follows_the_servers_message_limits(tiny_models):
    small = Limits(max_tensor_bytes=1 << 20, max_message_bytes=1 << 20)
    with threaded_server(tiny_models("bert"), "1,1", num_labels=3, limits=small) as (endpoint, _):
        conn = Connection(endpoint, "prober", timeout=10)
        try:
            assert ProbeReply.from_message(_request(conn, ProbeRequest().to_message()), ProbeRequest()).max_bytes \
                == 1 << 20
            with pytest.raises(ServerError, match="at most 1048576 bytes"):
                _request(conn, ProbeRequest(reply_bytes=(1 << 20) + 1).to_message())
        finally:
            conn.close()
