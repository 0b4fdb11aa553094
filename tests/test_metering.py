"""Metering: per-step time split and bytes, the server's reported compute
time, round records from the client's upload to the server's run folder (and
bad ones refused), the client's one line per round, and ``fedsplit report``."""

from __future__ import annotations

import json
import logging
import math
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import split.transport as transport
from conftest import VOCAB, random_batch, save_tiny_with_tokenizer, threaded_server
from edge.client import BackboneLink, ClientConfig, SplitClient
from edge.metering import RoundMeter, StepMeter
from edge.report import PLOTS, ReportError, load_rows
from edge.train import TrainOptions, run_client
from round_helpers import coordinator, payload, upload
from server.rounds import FederationConfig, FederationError
from split.cli import main
from split.launch import child_env, fedsplit_command
from split.lora import LoraSpec
from split.records import MAX_BYTES, RECORD_FIELDS, RecordError, check_record
from split.runfolder import CLIENTS, ROUNDS, STEPS, RunFolder
from split.transport import ServerError
from split.wire import Message

WORDS = ["red", "blue", "green", "apple", "pear", "plum", "teal", "fig"]
ROUNDS_RUN, LOCAL_STEPS = 2, 2


# ---------------------------------------------------------------- one step


class FrameSpy:
    """Counts the bytes of every frame the transport encodes and decodes."""

    def __init__(self, monkeypatch):
        self.sent = self.received = 0
        encode, decode = transport.encode, transport.decode

        def counted_encode(msg):
            frames = encode(msg)
            self.sent += sum(memoryview(getattr(f, "buffer", f)).nbytes for f in frames)
            return frames

        def counted_decode(frames, *args):
            self.received += sum(memoryview(getattr(f, "buffer", f)).nbytes for f in frames)
            return decode(frames, *args)

        monkeypatch.setattr(transport, "encode", counted_encode)
        monkeypatch.setattr(transport, "decode", counted_decode)


def test_a_step_record_counts_the_frames_and_splits_its_time(tiny_models, monkeypatch):
    model = tiny_models("bert")
    with threaded_server(model, "1,1", dropout=False) as (endpoint, _):
        client = SplitClient(ClientConfig(server=endpoint, model=str(model), num_labels=3, dropout=False,
                                          lora=LoraSpec(4, 8.0), client_id="metered"))
        try:
            meter = StepMeter(client)
            meter.measure(lambda: client.train_step(random_batch(0, VOCAB)))  # warm-up
            spy = FrameSpy(monkeypatch)
            batch = random_batch(1, VOCAB, batch=4, max_len=12)
            loss, record = meter.measure(lambda: client.train_step(batch))
            crossed = (spy.sent, spy.received)
        finally:
            client.close()
    # A forward and a backward: what the meter counted is what crossed the socket, headers included.
    assert (record.bytes_up, record.bytes_down) == crossed
    hidden = 4 * 12 * 32 * 4  # batch x tokens x width, float32
    assert 2 * hidden < record.bytes_up < 2 * hidden + 4096  # the hidden state, the gradient, two headers
    assert record.loss == loss and record.step == client.steps
    # The server's compute time came back in the replies: present, > 0, within the client's step.
    assert 0 < record.server_s < record.seconds
    assert record.compute_s > 0 and record.network_s >= 0
    assert math.isclose(record.compute_s + record.network_s + record.server_s, record.seconds, rel_tol=1e-6)


class StubConnection:
    def __init__(self, meta):
        self.meta = meta

    def request(self, msg, **_):
        return Message("ok", msg.client, msg.step, meta=self.meta, tensors={"grad": torch.ones(2, 5, 8)})


@pytest.mark.parametrize("meta, shown", [({}, "None"), ({"server_s": float("nan")}, "nan"),
                                         ({"server_s": -0.5}, "-0.5"), ({"server_s": "0.1"}, "'0.1'"),
                                         ({"server_s": True}, "True"), ({"server_s": [1.0]}, r"\[1.0\]"),
                                         ({"server_s": float("inf")}, "inf")])
def test_a_bad_server_time_in_a_reply_is_a_server_error(meta, shown):
    link = BackboneLink(StubConnection(meta), rotary=False)
    with pytest.raises(ServerError, match=rf"'server_s' as a finite number of seconds >= 0, got {shown}"):
        link.remote_backward(0, torch.ones(2, 5, 8), (2, 5, 8))
    assert link.served == 0.0


def test_a_round_record_leaves_out_a_diverged_loss_and_refuses_unregistered_keys():
    conn, link = SimpleNamespace(bytes_sent=0, bytes_received=0), SimpleNamespace(waited=0.0, served=0.0)
    client = SimpleNamespace(conn=conn, link=link, steps=0, device=torch.device("cpu"))
    meter = RoundMeter(client, budget_bytes=2 ** 30)
    meter.start(0)

    def step():  # a step that sent 100 bytes, waited 10 ms of which the server computed 4, and diverged
        client.steps += 1
        conn.bytes_sent += 100
        link.waited += 0.010
        link.served += 0.004
        return float("nan")

    meter.step(step)
    record = meter.finish(accuracy=0.5, upload=10)
    assert "loss" not in record
    assert (record["steps"], record["bytes_up"], record["upload_bytes"]) == (1, 100, 10)
    assert (record["accuracy"], record["budget_bytes"]) == (0.5, 2 ** 30)
    assert math.isclose(record["network_s"], 0.006) and math.isclose(record["server_s"], 0.004)
    with pytest.raises(RecordError, match="unknown key 'flops'"):
        meter.finish(extra={"flops": 1.0})


# ---------------------------------------------------------------- the record schema


def honest_record() -> dict:
    return {"steps": 3, "loss": 1.25, "accuracy": 0.5, "seconds": 2.0, "compute_s": 1.0, "network_s": 0.5,
            "server_s": 0.4, "bytes_up": 10_000, "bytes_down": 9_000, "upload_bytes": 500, "peak_rss": 2 ** 28,
            "peak_uss": 2 ** 27, "budget_bytes": 2 ** 32}


BAD_RECORDS = [
    ({"loss": float("nan")}, "'loss' must be finite, got nan"),
    ({"compute_s": float("inf")}, "'compute_s' must be finite"),
    ({"bytes_up": -1}, r"'bytes_up' must be in \[0, "),
    ({"peak_rss": MAX_BYTES + 1}, "'peak_rss' must be in"),
    ({"seconds": 1e12}, "'seconds' must be in"),
    ({"accuracy": 1.5}, r"'accuracy' must be in \[0, 1\]"),
    ({"budget_bytes": 0}, "'budget_bytes' must be in"),
    ({"flops": 1.0}, "unknown key 'flops'"),
    ({"steps": 2.5}, "'steps' must be an integer, got float"),
    ({"steps": True}, "'steps' must be an integer, got bool"),
    ({"loss": "low"}, "'loss' must be a number, got str"),
    ({"loss": None}, "'loss' must be a number, got NoneType"),
    ({"bytes_down": [1]}, "'bytes_down' must be an integer, got list"),
]


@pytest.mark.parametrize("change, match", BAD_RECORDS)
def test_check_record_refuses_bad_values_naming_the_key(change, match):
    assert check_record(honest_record()) == honest_record()
    with pytest.raises(RecordError, match=match):
        check_record({**honest_record(), **change})


def test_check_record_refuses_a_non_map_and_too_many_keys():
    with pytest.raises(RecordError, match="must be a map of numbers, got list"):
        check_record([1, 2])
    with pytest.raises(RecordError, match=f"has {len(RECORD_FIELDS) + 1} keys"):
        check_record({f"k{i}": 1 for i in range(len(RECORD_FIELDS) + 1)})


VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                  max_size=3), max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(record=st.dictionaries(st.sampled_from(sorted(RECORD_FIELDS)) | st.text(max_size=6), VALUES, max_size=6)
       | VALUES)
def test_any_record_is_taken_or_refused_by_name(record):
    try:
        checked = check_record(record)
    except RecordError:
        return  # refused, saying why; any other exception fails the test
    assert set(checked) <= set(RECORD_FIELDS) and all(math.isfinite(v) for v in checked.values())


@pytest.mark.parametrize("record, match", [({**honest_record(), "loss": float("nan")}, "'loss' must be finite"),
                                           ({**honest_record(), "bytes_up": -5}, "'bytes_up' must be in"),
                                           ({"x" * 10_000: 1}, "unknown key 'xxxx"),
                                           ({"steps": "3"}, "must be an integer, got str"),
                                           ("many", "must be a map")])
def test_a_bad_record_refuses_the_upload_and_the_round_completes_without_it(record, match):
    coord, _ = coordinator(3)
    coord.tick(0.0)
    for c in coord.selected:
        coord.poll(c)
    with pytest.raises(FederationError, match=f"upload refused: bad round record: .*{match}"):
        coord.upload("c2", payload(coord, "c2", record=record))
    good = payload(coord, "c0", record=honest_record())
    coord.upload("c0", good)
    assert good.record == honest_record()  # checked and kept for the run folder
    upload(coord, "c1")
    closed = coord.tick(1.0)  # long before the deadline: the refused client is not waited for
    assert closed is not None and closed.aggregated and closed.uploaded == ["c0", "c1"]
    assert "c2 refused" in closed.note


def test_a_run_folder_refuses_to_mix_two_runs(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.append(CLIENTS, {"client": "a", "round": 0})
    folder.close()
    with pytest.raises(ValueError, match="already holds clients.jsonl of another run"):
        RunFolder(tmp_path / "run")
    RunFolder(tmp_path / "run", resume=True).append(CLIENTS, {"client": "a", "round": 1})
    assert len((tmp_path / "run" / CLIENTS).read_text().splitlines()) == 2
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file; give a folder"):
        RunFolder(tmp_path / "file")


# ---------------------------------------------------------------- a real federation


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """Two clients through a server in this process, every run folder
    written: c0 in this process (evaluating every round), c1 a `fedsplit
    client` process whose stdout is a pipe. Returns the folder and c1's stdout."""
    tmp = tmp_path_factory.mktemp("metered-federation")
    model = save_tiny_with_tokenizer("bert", tmp / "bert")
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"{w} is a {'fruit' if i % 2 else 'colour'}", "label": "abc"[i % 3]})
                            + "\n" for i, w in enumerate(WORDS * 4)))
    config = FederationConfig(rounds=ROUNDS_RUN, min_clients=2, local_steps=LOCAL_STEPS)
    server_log = logging.getLogger("server")
    lines = ServerLines()
    server_log.addHandler(lines)
    level = server_log.level
    server_log.setLevel(logging.INFO)  # setLevel, not .level: it clears the children's cached levels
    with threaded_server(model, "1,1", dropout=False, federation=config, run_dir=str(tmp / "server"),
                         checkpoint_dir=str(tmp / "ckpt")) as (endpoint, _):
        args = ["client", "--server", endpoint, "--model", str(model), "--no-dropout", "--rank", "4", "--alpha", "8",
                "--id", "c1", "--data", str(data), "--num-clients", "2", "--client-index", "1", "--batch-size", "4",
                "--max-length", "16", "--connect-timeout", "120", "--run-dir", str(tmp / "client1")]
        # No --no-progress: its stdout and stderr are pipes, not a terminal, so it prints one line per round.
        proc = subprocess.Popen(fedsplit_command(*args), env=child_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            run_client(ClientConfig(server=endpoint, model=str(model), dropout=False, lora=LoraSpec(4, 8.0),
                                    client_id="c0", connect_timeout=120),
                       TrainOptions(data=str(data), batch_size=4, max_length=16, num_clients=2, client_index=0,
                                    eval_rounds=True, progress=False, run_dir=str(tmp / "client0")))
        finally:
            out, err = proc.communicate(timeout=300)
            server_log.removeHandler(lines)
            server_log.setLevel(level)
    assert proc.returncode == 0, err[-3000:]
    return tmp, out, lines.lines


class ServerLines(logging.Handler):
    """Keeps the server's log lines (its console) as level and text."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[tuple[str, str]] = []

    def emit(self, record):
        self.lines.append((record.levelname, record.getMessage()))


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_round_records_reach_the_servers_run_folder_with_the_upload(federation):
    tmp, _, _ = federation
    server_rows = _jsonl(tmp / "server" / CLIENTS)
    assert sorted((r["client"], r["round"]) for r in server_rows) == [
        (f"c{k}", t) for k in range(2) for t in range(ROUNDS_RUN)]
    for k in range(2):
        own = _jsonl(tmp / f"client{k}" / CLIENTS)
        # What the client wrote is what the server received, to the byte count.
        assert own == [r for r in server_rows if r["client"] == f"c{k}"]
        for row in own:
            assert row["steps"] == LOCAL_STEPS and row["bytes_up"] > 0 and row["upload_bytes"] > 0
            assert row["peak_rss"] > 0 and row["peak_uss"] > 0 and row["server_s"] > 0
            assert ("accuracy" in row) == ("eval_bytes" in row) == ("eval_s" in row) == (k == 0)
        steps = _jsonl(tmp / f"client{k}" / STEPS)
        assert [s["round"] for s in steps] == [t for t in range(ROUNDS_RUN) for _ in range(LOCAL_STEPS)]
        for t, row in enumerate(own):
            mine = [s for s in steps if s["round"] == t]
            assert math.isclose(sum(s["server_s"] for s in mine), row["server_s"], rel_tol=1e-9)
            # The round adds its polls and its download; an evaluation is counted apart.
            assert sum(s["bytes_up"] for s in mine) < row["bytes_up"]
            assert sum(s["bytes_down"] for s in mine) < row["bytes_down"]
            if k == 0:
                assert row["eval_bytes"] > 0 and row["eval_s"] > 0  # the test set went through the server
    rounds = _jsonl(tmp / "server" / ROUNDS)
    assert [(r["round"], r["aggregated"], r["uploaded"]) for r in rounds] == [
        (t, True, ["c0", "c1"]) for t in range(ROUNDS_RUN)]


def test_a_client_not_on_a_terminal_prints_one_line_per_round(federation):
    _, out, _ = federation
    lines = [line for line in out.splitlines() if line.startswith("round ")]
    assert [line.split(":")[0] for line in lines] == [f"round {t + 1}/{ROUNDS_RUN}" for t in range(ROUNDS_RUN)]
    assert all(f"{LOCAL_STEPS} steps, loss " in line and "MB up" in line for line in lines)
    assert "per round" in out  # the closing table


def test_the_servers_console_tells_the_federation_as_it_happens(federation):
    _, _, lines = federation
    said = [text for level, text in lines if level == "INFO"]

    def first(fragment: str) -> int:
        return next(i for i, text in enumerate(said) if fragment in text)

    joins = [first(f"client c{k} joined the federation") for k in range(2)]
    for t in range(ROUNDS_RUN):
        selected = first(f"round {t}: 2 of 2 clients selected: c0, c1")
        uploads = [first(f"round {t}: upload from c{k} (") for k in range(2)]
        closed = first(f"round {t} closed: 2 of 2 uploads aggregated")
        checkpoint = next(i for i, text in enumerate(said) if re.fullmatch(rf"checkpoint .*round_{t}", text))
        assert max(joins) < selected < min(uploads) <= max(uploads) < closed < checkpoint
    assert any(f"{LOCAL_STEPS} steps, loss" in text and "MB up" in text for text in said if "upload from" in text)
    # Nothing went wrong, so nothing but the loopback notice is a warning.
    assert [text for level, text in lines if level != "INFO" and "plain mode" not in text] == []


def test_console_logging_shows_fedsplit_at_info_and_libraries_warnings_only():
    code = ("import logging; from split.console import setup_logging; setup_logging(); "
            "logging.getLogger('server.rounds').info('round 0 closed'); logging.getLogger('server').debug('hidden'); "
            "logging.getLogger('somelib').info('library chatter'); logging.getLogger('somelib').warning('library said')")
    run = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=60)
    lines = run.stderr.splitlines()
    assert len(lines) == 2, run.stderr
    assert re.fullmatch(r"\d\d:\d\d:\d\d round 0 closed", lines[0])
    assert re.fullmatch(r"\d\d:\d\d:\d\d WARNING library said", lines[1])


def test_report_writes_the_four_plots(federation, tmp_path, capsys):
    tmp, _, _ = federation
    assert main(["report", str(tmp / "server"), "--out", str(tmp_path / "plots")]) == 0
    for name in PLOTS:
        png = (tmp_path / "plots" / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert f"{2 * ROUNDS_RUN} round records of 2 clients" in capsys.readouterr().out
    # A client's own folder is reported on as well.
    assert main(["report", str(tmp / "client0")]) == 0
    assert all((tmp / "client0" / name).exists() for name in PLOTS)


def test_report_refuses_a_folder_without_records(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "holds no round records: expected clients.jsonl" in capsys.readouterr().err
    (tmp_path / CLIENTS).write_text("")
    with pytest.raises(ReportError, match="is empty: no round of this run finished"):
        load_rows(tmp_path)
    (tmp_path / CLIENTS).write_text('{"client": "a", "round": 0, "steps": 1}\n{"client": "a", "round": 1, "loss": -1}\n')
    with pytest.raises(ReportError, match=r"clients.jsonl:2: round record key 'loss' must be in"):
        load_rows(tmp_path)
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err

