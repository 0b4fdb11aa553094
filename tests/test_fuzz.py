"""Nothing a peer sends ends either process: hostile messages against a live
server while a real client trains on it, and hostile replies to a client.

The fuzz test sends Hypothesis-generated messages (any msgpack value in every
header field, mostly-valid headers broken in one field, wrong frames, raw
bytes) from a bare DEALER socket. Every one must get an answer, and the client
training beside them must see exactly the losses of a run with no fuzzing."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections import Counter

import msgpack
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import VOCAB, dealer, random_batch, status, threaded_server
from edge.client import ClientConfig, SplitClient
from split.codecs import DTYPES
from split.transport import Connection, ServerError, ServerUnavailable
from split.wire import OPS, Message, decode, encode

FUZZ_MESSAGES = 10_000
PAUSE = 0.1  # seconds the client waits between steps
TRAINER = "trainer"  # the training client's id: the fuzzer uses it too, without its token


def _exchange(sock: zmq.Socket, frames: list) -> Message:
    """Send raw frames; the server's reply, which must come."""
    sock.send_multipart(frames)
    assert sock.poll(10_000), f"the server did not answer {frames[0][:60]!r}"
    return decode(sock.recv_multipart())


def _trainer(endpoint, path) -> SplitClient:
    return SplitClient(ClientConfig(server=endpoint, model=str(path), num_labels=3, seed=3, client_id=TRAINER,
                                    timeout=30))


def _header(**fields) -> bytes:
    base = {"v": 1, "op": "forward", "client": "intruder", "step": 0, "meta": {}, "tensors": []}
    base.update(fields)
    return msgpack.packb(base, use_bin_type=True)


# ------------------------------------------------------------ the finding, live


@pytest.mark.parametrize("field, value", [("dtype", ["float32"]), ("dtype", {"float32": 1}),
                                          ("codec", ["raw"]), ("codec", {"raw": 1})])
def test_a_list_or_map_dtype_or_codec_gets_an_error_and_the_server_keeps_answering(tiny_models, field, value):
    entry = {"name": "hidden", "dtype": "float32", "shape": [2], "codec": "raw", "nbytes": 8, field: value}
    with threaded_server(tiny_models("bert"), "1,1", num_labels=3) as (endpoint, _):
        sock = dealer(endpoint)
        try:
            reply = _exchange(sock, [_header(tensors=[entry]), bytes(8)])
            assert reply.op == "error" and field in reply.meta["error"], reply.meta
            # The serving thread survived: it still answers.
            assert _exchange(sock, [_header(op="status")]).op == "ok"
        finally:
            sock.close()
        assert status(endpoint)["sessions"] == 0


def test_a_token_with_non_ascii_characters_is_refused_by_name(tiny_models, caplog):
    # Found by the fuzz test below: hmac.compare_digest raised TypeError on it.
    path = tiny_models("bert")
    with threaded_server(path, "1,1", num_labels=3) as (endpoint, _):
        client = _trainer(endpoint, path)
        sock = dealer(endpoint)
        try:
            for op in ("adapter", "bye"):
                reply = _exchange(sock, [_header(op=op, client=TRAINER, meta={"token": "é" * 32})])
                assert reply.op == "error" and "TypeError" not in reply.meta["error"], reply.meta
            client.train_step(random_batch(0, VOCAB))  # the session is untouched
        finally:
            sock.close()
            client.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# ------------------------------------------------------------ strategies

INTS = st.integers(-(2**63), 2**64 - 1) | st.sampled_from([0, 1, -1, 2**31, 2**63 - 1, -(2**63), 2**64 - 1])
WORDS = st.sampled_from(list(OPS) + sorted(DTYPES) + ["raw", "hidden", "grad", TRAINER, ""])
PLAIN = st.none() | st.booleans() | INTS | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8)
SCALARS = PLAIN | st.binary(max_size=8) | WORDS
EXTS = (st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8))
        | st.builds(msgpack.Timestamp, st.integers(0, 2**32 - 1)))
KEYS = st.text(max_size=4) | st.binary(max_size=4) | st.integers(-2, 2)  # msgpack keys need not be strings


def _nest(depth: int):
    """A value ``depth`` lists and maps deep."""
    value = None
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


# Two levels of nesting, spelled out: st.recursive is slower to draw from, and
# the test draws 10,000 messages. Deeper nesting is the unit tests' job.
LEAF = SCALARS | EXTS
NESTED = st.lists(LEAF, max_size=3) | st.dictionaries(KEYS, LEAF, max_size=3)
DEEP = st.integers(3, 300).map(_nest)  # one draw for any depth (msgpack packs up to 511)
ANY = st.one_of(LEAF, NESTED, st.lists(NESTED, max_size=2), st.dictionaries(KEYS, NESTED, max_size=2), DEEP)
META_VALUES = ANY | st.text(max_size=40)  # a token is a string: any string, not only a hex one
TOP_FIELDS = ("v", "op", "client", "step", "meta", "tensors")
ENTRY_FIELDS = ("name", "dtype", "shape", "codec", "nbytes")
META_KEYS = ("rid", "token", "train")  # the meta fields the server reads before any payload
BROKEN = TOP_FIELDS + ENTRY_FIELDS + META_KEYS + ("shape dims", "frames")
# Built once: Hypothesis validates each new strategy object, which costs more
# than drawing from it.
DTYPE_NAMES = st.sampled_from(sorted(DTYPES))
SMALL_SHAPES = st.sampled_from([[], [0], [3], [2, 0], [2, 3], [1, 2, 4]])
HUGE_DIMS = st.lists(INTS, max_size=9)
FRAMES = st.lists(st.binary(max_size=64), max_size=3)
VALID_TOP = st.fixed_dictionaries({
    "v": st.just(1), "op": st.sampled_from(OPS), "client": st.sampled_from(["", "fuzzer", TRAINER]),
    "step": st.integers(0, 2**63 - 1),
    # Few metas here (any meta comes in broken_in_one_field): each value drawn costs time.
    "meta": st.sampled_from([{}, {"rid": 7}, {"train": True, "rid": None}, {"token": "0" * 32}])})
TENSOR_COUNTS = [st.integers(0, 2), st.integers(1, 2)]
WILD_HEADERS = st.dictionaries(st.sampled_from(TOP_FIELDS) | KEYS, ANY, max_size=4) | ANY


@st.composite
def valid_messages(draw, min_tensors: int = 0):
    """A header that passes the wire's checks, and its tensor frames (the
    bytes do not matter: the fuzzer holds no session, so no tensor is used)."""
    entries, frames = [], []
    for i in range(draw(TENSOR_COUNTS[min_tensors])):
        dtype, shape = draw(DTYPE_NAMES), draw(SMALL_SHAPES)
        nbytes = torch.empty(shape, dtype=DTYPES[dtype]).nbytes
        entries.append({"name": f"t{i}", "dtype": dtype, "shape": shape, "codec": "raw", "nbytes": nbytes})
        frames.append(bytes(nbytes))
    return {**draw(VALID_TOP), "tensors": entries}, frames


@st.composite
def broken_in_one_field(draw):
    """A valid message with one field replaced by any value, or removed: the
    checks after the broken one are reached, and the broken one is tested."""
    field = draw(st.sampled_from(BROKEN))
    header, frames = draw(valid_messages(min_tensors=int(field in ENTRY_FIELDS + ("shape dims",))))
    if field == "frames":  # the frames do not match the entries
        frames = draw(FRAMES)
    elif field in META_KEYS:
        header["meta"] = {**header["meta"], field: draw(META_VALUES)}
    elif field == "shape dims":  # an empty tensor with dims of any size: nothing to check them against
        header["tensors"][0].update(shape=[0] + draw(HUGE_DIMS), nbytes=0)
        frames[0] = b""
    else:
        target = header["tensors"][-1] if field in ENTRY_FIELDS else header
        if draw(st.integers(0, 7)):
            target[field] = draw(ANY)
        else:
            del target[field]
    return [msgpack.packb(header, use_bin_type=True)] + frames


@st.composite
def wild_messages(draw):
    """Any value as the header (a map of the header's fields or anything at
    all), with any frames."""
    return [msgpack.packb(draw(WILD_HEADERS), use_bin_type=True)] + draw(FRAMES)


@st.composite
def raw_messages(draw):
    """Bytes that are not a msgpack header, a valid header cut short, or
    arrays nested deeper than msgpack's unpacker allows."""
    kind = draw(st.integers(0, 2))
    if kind == 0:
        header, frames = draw(valid_messages())
        packed = msgpack.packb(header, use_bin_type=True)
        return [packed[:draw(st.integers(0, len(packed) - 1))]] + frames
    if kind == 1:
        return [b"\x91" * draw(st.integers(500, 5000)) + b"\xc0"]
    return draw(st.lists(st.binary(max_size=64), min_size=1, max_size=3))


# Mostly broken-in-one-field, so most messages get past the first checks.
MESSAGES = st.one_of(broken_in_one_field(), broken_in_one_field(), broken_in_one_field(), wild_messages(),
                     raw_messages(), valid_messages().map(lambda m: [msgpack.packb(m[0], use_bin_type=True)] + m[1]))


# ------------------------------------------------------------ fuzzing a live server


class Training:
    """A client training in a thread of its own, step after step, until
    ``finish``; ``in_step`` is set while a step is under way."""

    def __init__(self, client: SplitClient):
        self.client = client
        self.losses: list[float] = []
        self.error: BaseException | None = None
        self.in_step, self.first_step, self.stop = threading.Event(), threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                self.in_step.set()
                self.losses.append(self.client.train_step(random_batch(len(self.losses), VOCAB)))
                self.in_step.clear()
                self.first_step.set()
                # A pause between steps leaves the fuzzer some CPU on two cores, and
                # keeps the reference run (as many steps, unfuzzed) short.
                time.sleep(PAUSE)
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc
        finally:
            self.in_step.clear()
            self.first_step.set()

    def start(self) -> None:
        """Start, and return once the first step is done: all fuzzing overlaps training."""
        self.thread.start()
        assert self.first_step.wait(60), "the client's first step did not finish"

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(120)


@contextlib.contextmanager
def short_gil_slices():
    """Three threads share the GIL here (fuzzer, server, client): a shorter
    switch interval keeps each fuzz round trip from waiting out 5 ms slices."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def _kind(reply: Message) -> str:
    """What stopped a fuzz message: a wire check (header or tensor entry), a
    handler, or nothing (served)."""
    text = str(reply.meta.get("error", ""))
    if reply.op == "ok":
        return "served"
    if not text.startswith("malformed message"):
        return "reached a handler"
    return "tensor entry" if "tensor " in text else "header"


def _fuzz(sock: zmq.Socket, in_step: threading.Event) -> Counter:
    """Send ``FUZZ_MESSAGES`` Hypothesis messages, each answered before the next;
    counts how far each got, how many went out in all and how many mid-step."""
    counts = Counter()

    @settings(max_examples=FUZZ_MESSAGES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(MESSAGES)
    def fuzz(frames):
        mid_step = in_step.is_set()
        reply = _exchange(sock, frames)
        assert reply.op in ("ok", "error"), reply.op
        counts.update({"sent": 1, "sent mid-step": mid_step, _kind(reply): 1})

    fuzz()
    return counts


def test_fuzzed_messages_all_get_answers_while_a_client_trains_exactly(tiny_models, caplog):
    path = tiny_models("bert")
    caplog.set_level(logging.ERROR)  # the server's 10,000 warnings stay out of the report
    with threaded_server(path, "1,1", num_labels=3) as (endpoint, _), short_gil_slices():
        training = Training(_trainer(endpoint, path))
        sock = dealer(endpoint)
        start = time.monotonic()
        try:
            training.start()
            steps_before = len(training.losses)
            counts = _fuzz(sock, training.in_step)
            steps_during = len(training.losses) - steps_before
        finally:
            training.finish()
            seconds = time.monotonic() - start
            sock.close()
            training.client.close()
        assert training.error is None, f"the client failed while fuzzed: {training.error!r}"
        assert status(endpoint)["sessions"] == 0  # the server is alive, and the client's bye was served
        reference = _trainer(endpoint, path)
        try:
            expected = [reference.train_step(random_batch(i, VOCAB)) for i in range(len(training.losses))]
        finally:
            reference.close()
    print(f"{counts['sent']} fuzz messages in {seconds:.1f}s, {counts['sent mid-step']} of them mid-step; "
          f"the client trained {steps_during} steps meanwhile; {dict(counts)}")
    assert counts["sent"] >= FUZZ_MESSAGES
    # All of them went out between the client's first step and its last; many mid-step.
    assert steps_during >= 20
    assert counts["sent mid-step"] >= FUZZ_MESSAGES // 20
    assert training.losses == expected  # bit for bit: the fuzzing touched nothing of the client's session
    assert min(counts[k] for k in ("header", "tensor entry", "reached a handler", "served")) > 0, counts
    # Every message was refused by name: none failed inside decode (handle's
    # last resort) or raised inside a handler.
    failures = [f"{r.getMessage()}: {r.exc_info[1]!r}" for r in caplog.records if r.levelno >= logging.ERROR]
    assert not failures, failures[:3]


# ------------------------------------------------------------ hostile replies to a client


class FakeServer:
    """A ROUTER that answers each request with ``junk`` replies, then
    ``answer(request)`` (None: no real answer at all)."""

    def __init__(self, junk: list[list[bytes]], answer):
        self.junk, self.answer = junk, answer
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.thread = threading.Thread(target=self._serve_one, daemon=True)

    def _serve_one(self) -> None:
        if not self.sock.poll(10_000):
            return
        routing_id, *frames = self.sock.recv_multipart()
        for junk in self.junk:
            self.sock.send_multipart([routing_id] + junk)
        reply = self.answer(decode(frames))
        if reply is not None:
            self.sock.send_multipart([routing_id] + [bytes(f) for f in encode(reply)])

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.thread.join(15)
        self.sock.close()


def _ok_with_rid(request: Message) -> Message:
    return Message("ok", step=request.step, meta={"rid": request.meta["rid"]}, tensors={"x": torch.arange(3.0)})


JUNK = [
    [b"\xc1 not msgpack"],
    [_header(op="ok", meta={"rid": 1}, tensors=[{"name": "x", "dtype": ["float32"], "shape": [2], "codec": "raw",
                                                   "nbytes": 8}]), bytes(8)],
    [_header(op="ok", meta={"rid": 1}, tensors=[{"name": "x", "dtype": "float32", "shape": [2], "codec": {},
                                                   "nbytes": 8}]), bytes(8)],
    [_header(op="forward", meta={"rid": 1})],  # a request, not a reply
    [_header(op="ok", meta={"rid": 999})],  # a reply to another request
    [_header(op="ok", meta={"rid": [1]})],
]


def test_a_client_drops_junk_replies_and_takes_the_real_one(caplog):
    with FakeServer(JUNK, _ok_with_rid) as fake:
        conn = Connection(fake.endpoint, "c", timeout=10)
        try:
            reply = conn.request(Message("status"))
        finally:
            conn.close()
    assert reply.op == "ok" and torch.equal(reply.tensors["x"], torch.arange(3.0))
    assert conn.messages == len(JUNK) + 1
    dropped = [r.getMessage() for r in caplog.records if "dropping" in r.getMessage()]
    assert len(dropped) == 4, dropped  # the three that do not decode and the request; late replies log at debug


def test_a_client_that_gets_only_junk_times_out_as_usual():
    start = time.monotonic()
    with FakeServer(JUNK * 50, lambda request: None) as fake:
        conn = Connection(fake.endpoint, "c", timeout=1.0)
        try:
            with pytest.raises(ServerUnavailable, match="no answer from the server"):
                conn.request(Message("status"))
        finally:
            conn.close()
    assert time.monotonic() - start < 10


def test_an_error_reply_with_a_code_of_any_type_raises_server_error():
    def error_with_list_code(request: Message) -> Message:
        return Message("error", meta={"rid": request.meta["rid"], "error": ["no"], "code": ["malformed"]})

    with FakeServer([], error_with_list_code) as fake:
        conn = Connection(fake.endpoint, "c", timeout=10)
        try:
            with pytest.raises(ServerError, match="no") as info:
                conn.request(Message("status"))
        finally:
            conn.close()
    assert info.value.code == "failed"
