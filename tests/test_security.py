"""CurveZMQ between clients and the server: encrypted traffic, refused keys
with a message that says what to do, plain mode on loopback only, and
sessions bound to the key that opened them."""

from __future__ import annotations

import logging
import os
import select
import json
import shutil
import socket
import stat
import subprocess
import threading
import time

import pytest
import torch

from conftest import VOCAB, random_batch, save_tiny_with_tokenizer, threaded_server
from edge.client import ClientConfig, ServerRefused, SplitClient
from server.service import ServerConfig
from split.cli import main
from split.keys import KeyFileError, create_keys, load_allowlist, load_key_pair, load_public_key
from split.launch import child_env, fedsplit_command, running_server
from split.lora import LoraSpec
from split.partition import load_config
from split.protocol import Hello, ModelInfo, OptimizerSettings
from split.security import is_loopback, load_client_keys
from split.transport import Connection, HandshakeFailed, ServerError
from split.wire import Message

QUICK = 10.0  # seconds: a refusal must come well before the 60 s connect timeout the clients here are given


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Key pairs server, k1, k2 and stranger; the allowlist holds k1 and k2."""
    folder = tmp_path_factory.mktemp("keys")
    for name in ("server", "k1", "k2", "stranger"):
        create_keys(folder, name)
    (folder / "allow").mkdir()
    for name in ("k1", "k2"):
        shutil.copy(folder / f"{name}.key", folder / "allow")
    return folder


def server_keys(folder) -> dict:
    return {"secret_key": str(folder / "server.key_secret"), "allow": str(folder / "allow")}


def client_keys(folder, name: str, server: str = "server") -> dict:
    return {"key": str(folder / f"{name}.key_secret"), "server_key": str(folder / f"{server}.key")}


@pytest.fixture(scope="module")
def curve_server(tiny_models, keys):
    path = tiny_models("bert")
    with threaded_server(path, "1,1", num_labels=3, **server_keys(keys)) as (endpoint, server):
        yield path, endpoint, server


def _client(path, endpoint, **kw) -> SplitClient:
    return SplitClient(ClientConfig(server=endpoint, model=str(path), num_labels=3, timeout=30,
                                    connect_timeout=60, **kw))


def _server_lora(client: SplitClient) -> dict[str, torch.Tensor]:
    return client.conn.request(Message("adapter")).tensors


def _hello(path) -> Message:
    """The hello a client of the tiny BERT sends."""
    config = load_config(path, "classification", 3, True)
    return Hello(ModelInfo.of(path, config), LoraSpec(), "classification", 0, None,
                 OptimizerSettings(1e-3, 0.0), num_labels=3).to_message()


# ---------------------------------------------------------------- encryption


def test_encrypted_training_gives_the_losses_of_plain_training(tiny_models, curve_server, keys):
    path, endpoint, _ = curve_server
    batches = [random_batch(i, VOCAB) for i in range(3)]
    with _client(path, endpoint, client_id="curve-losses", **client_keys(keys, "k1")) as client:
        encrypted = [client.train_step(b) for b in batches]
        encrypted_lora = client.adapter_state()
    with threaded_server(path, "1,1", num_labels=3) as (plain_endpoint, _):
        with _client(path, plain_endpoint, client_id="plain-losses") as client:
            plain = [client.train_step(b) for b in batches]
            plain_lora = client.adapter_state()
    assert encrypted == plain
    assert encrypted_lora.keys() == plain_lora.keys()
    assert all(torch.equal(encrypted_lora[k], plain_lora[k]) for k in plain_lora)


class RecordingProxy:
    """A TCP relay on loopback that keeps every byte it passes, both ways."""

    def __init__(self, target: str):
        host, port = target.removeprefix("tcp://").rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.recorded = bytearray()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        with self.listener:
            while not self.stopping.is_set():
                if select.select([self.listener], [], [], 0.05)[0]:
                    inbound, _ = self.listener.accept()
                    outbound = socket.create_connection(self.target)
                    relay = threading.Thread(target=self._relay, args=(inbound, outbound), daemon=True)
                    self.threads.append(relay)
                    relay.start()

    def _relay(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        with a, b:
            while not self.stopping.is_set():
                for sock in select.select(list(peers), [], [], 0.05)[0]:
                    data = sock.recv(1 << 20)
                    if not data:
                        return
                    with self.lock:
                        self.recorded += data
                    peers[sock].sendall(data)

    def close(self) -> None:
        self.stopping.set()
        for thread in list(self.threads):
            thread.join(5)


def _wire_bytes(path, server_endpoint: str, **kw) -> tuple[bytes, list[torch.Tensor]]:
    """What crossed the wire during one training step, and the hidden states
    the client sent and received in it."""
    proxy = RecordingProxy(server_endpoint)
    try:
        with _client(path, proxy.endpoint, **kw) as client:
            remote = client.segment.blocks()[client.cut.front]
            seen: list[torch.Tensor] = []
            remote.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
            remote.register_forward_hook(lambda m, args, out: seen.append(out.detach().clone()))
            client.train_step(random_batch(7, VOCAB, max_len=12))
        with proxy.lock:
            return bytes(proxy.recorded), seen
    finally:
        proxy.close()


def _slices(hidden: list[torch.Tensor]) -> list[bytes]:
    """The float32 bytes of each hidden state's first sequence: 12 tokens x 32 values, 1.5 KB."""
    return [h[0].contiguous().numpy().tobytes() for h in hidden]


def test_plain_frames_carry_the_hidden_states_and_encrypted_ones_do_not(tiny_models, curve_server, keys):
    path, endpoint, _ = curve_server
    with threaded_server(path, "1,1", num_labels=3) as (plain_endpoint, _):
        plain, plain_hidden = _wire_bytes(path, plain_endpoint, client_id="sniffed-plain")
    encrypted, encrypted_hidden = _wire_bytes(path, endpoint, client_id="sniffed-curve", **client_keys(keys, "k1"))
    # Both runs sent the cut-1 hidden state and got the server's back (the same batch, the same values).
    assert len(plain_hidden) == len(encrypted_hidden) == 2
    assert all(torch.equal(p, e) for p, e in zip(plain_hidden, encrypted_hidden))
    # In the clear, both hidden states are on the wire byte for byte ...
    assert all(s in plain for s in _slices(plain_hidden))
    # ... encrypted, neither is, though at least as many bytes crossed.
    assert len(encrypted) >= len(plain) > sum(h.numel() * 4 for h in plain_hidden)
    assert not any(s in encrypted for s in _slices(encrypted_hidden))


# ---------------------------------------------------------------- refusals at the handshake


def _refusal(path, endpoint, **kw) -> tuple[str, float]:
    started = time.monotonic()
    with pytest.raises(ServerRefused) as info:
        _client(path, endpoint, **kw)
    return str(info.value), time.monotonic() - started


def test_an_unknown_key_is_refused_at_once_and_the_server_keeps_serving(curve_server, keys):
    path, endpoint, _ = curve_server
    text, seconds = _refusal(path, endpoint, **client_keys(keys, "stranger"))
    assert f"the server at {endpoint} does not accept this client's key: add stranger.key" in text
    assert "--allow folder" in text
    assert seconds < QUICK
    with _client(path, endpoint, client_id="after-stranger", **client_keys(keys, "k2")) as client:
        assert client.train_step(random_batch(1, VOCAB)) > 0


def test_a_client_without_keys_is_told_the_server_requires_encryption(curve_server):
    path, endpoint, _ = curve_server
    # ZeroMQ reports this refusal as a mechanism mismatch or as a dropped
    # handshake, whichever side notices first; several tries meet both.
    for _ in range(5):
        text, seconds = _refusal(path, endpoint)
        assert f"the server at {endpoint}" in text and "requires encryption" in text
        assert "pass --key and --server-key" in text
        assert seconds < QUICK


def test_a_wrong_server_key_is_named(curve_server, keys):
    path, endpoint, _ = curve_server
    text, seconds = _refusal(path, endpoint, **client_keys(keys, "k1", server="k2"))
    assert f"check that --server-key {keys / 'k2.key'} is the public half of the server's --secret-key" in text
    assert seconds < QUICK


def test_keys_against_a_plain_server_are_named(tiny_models, keys):
    path = tiny_models("bert")
    with threaded_server(path, "1,1", num_labels=3) as (endpoint, _):
        for _ in range(5):  # a mismatch or a dropped handshake, as above
            text, seconds = _refusal(path, endpoint, **client_keys(keys, "k1"))
            assert f"the server at {endpoint}" in text and "runs in plain mode" in text
            assert "drop --key and --server-key" in text
            assert seconds < QUICK


# ---------------------------------------------------------------- plain mode: loopback only


@pytest.mark.parametrize("endpoint", ["tcp://*:5555", "tcp://0.0.0.0:5555", "tcp://192.168.1.5:5555",
                                      "tcp://eth0:5555", "tcp://example.org:5555", "tcp://[::]:5555"])
def test_plain_mode_beyond_loopback_is_refused(endpoint):
    assert not is_loopback(endpoint)
    with pytest.raises(ValueError, match="reaches beyond this machine.*fedsplit keys.*--secret-key and --allow"):
        ServerConfig(bind=endpoint)
    with pytest.raises(ValueError, match="reaches beyond this machine.*--key and --server-key"):
        ClientConfig(server=endpoint)
    with pytest.raises(ValueError, match="reaches beyond this machine"):
        Connection(endpoint, "probe")


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:5555", "tcp://127.0.0.2:*", "tcp://[::1]:5555",
                                      "tcp://localhost:5555", "ipc:///tmp/fedsplit.sock", "inproc://fedsplit"])
def test_loopback_endpoints_may_be_plain(endpoint):
    assert is_loopback(endpoint)
    assert ServerConfig(bind=endpoint).bind == endpoint


def test_with_keys_any_endpoint_may_be_bound(keys):
    assert ServerConfig(bind="tcp://*:5555", **server_keys(keys)).bind == "tcp://*:5555"
    assert ClientConfig(server="tcp://192.168.1.5:5555", **client_keys(keys, "k1")).key


def test_the_server_command_refuses_a_plain_public_bind(capsys):
    assert main(["server", "--bind", "tcp://*:5555"]) == 2
    err = capsys.readouterr().err
    assert "fedsplit server: error: --bind tcp://*:5555 reaches beyond this machine" in err
    assert "create keys with `fedsplit keys DIR --name NAME`" in err


def test_plain_mode_says_so_in_the_log(tiny_models, caplog):
    with caplog.at_level(logging.WARNING, logger="server.service"):
        with threaded_server(tiny_models("bert"), "1,1", num_labels=3) as (endpoint, _):
            pass
    assert f"plain mode on {endpoint}: traffic is neither encrypted nor authenticated" in caplog.text


def test_one_key_of_a_pair_alone_is_refused(keys):
    with pytest.raises(ValueError, match="--secret-key needs --allow too"):
        ServerConfig(secret_key=server_keys(keys)["secret_key"])
    with pytest.raises(ValueError, match="--server-key needs --key too"):
        ClientConfig(server_key=client_keys(keys, "k1")["server_key"])


# ---------------------------------------------------------------- sessions belong to keys


def test_a_session_opened_with_one_key_is_refused_to_another_even_with_its_token(curve_server, keys):
    path, endpoint, server = curve_server
    victim = _client(path, endpoint, client_id="shared-id", **client_keys(keys, "k1"))
    thief = Connection(endpoint, "shared-id", timeout=10, keys=load_client_keys(**client_keys(keys, "k2")))
    try:
        victim.train_step(random_batch(2, VOCAB))
        before = _server_lora(victim)
        assert server.sessions.by_client["shared-id"].peer == load_key_pair(keys / "k1.key_secret").public.decode()
        for token in ("", victim.conn.token):
            thief.token = token
            # Neither use nor end it: the token is not enough from another key.
            for op in ("adapter", "forward", "backward", "bye"):
                with pytest.raises(ServerError, match="no session for client 'shared-id' with this token") as exc:
                    thief.request(Message(op))
                assert exc.value.code == "session"
            # Nor replace it with a hello under its client id.
            with pytest.raises(ServerError, match="client id 'shared-id' is in use by another session"):
                thief.request(_hello(path))
        after = _server_lora(victim)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        victim.train_step(random_batch(3, VOCAB))
        # The owner's key with the token is served from any connection (a reconnect keeps the session) ...
        again = Connection(endpoint, "shared-id", timeout=10, keys=load_client_keys(**client_keys(keys, "k1")))
        try:
            again.token = victim.conn.token
            assert again.request(Message("adapter")).tensors.keys() == before.keys()
            # ... and a hello from the owner's key may replace the session (a restarted client).
            again.token = ""
            assert again.request(_hello(path)).meta["token"] not in ("", victim.conn.token)
        finally:
            again.close()
    finally:
        thief.close()
        victim.close(say_bye=False)


# ---------------------------------------------------------------- key files


def test_fedsplit_keys_writes_keys_a_server_and_client_use(tiny_models, tmp_path, capsys):
    assert main(["keys", str(tmp_path / "keys"), "--name", "srv"]) == 0
    assert main(["keys", str(tmp_path / "keys"), "--name", "cli"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'keys' / 'cli.key'} (public" in out
    assert "copy cli.key into the server's --allow folder" in out
    secret = tmp_path / "keys" / "cli.key_secret"
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    # Run again, it overwrites nothing.
    before = secret.read_bytes()
    assert main(["keys", str(tmp_path / "keys"), "--name", "cli"]) == 2
    assert "already exist" in capsys.readouterr().err
    assert secret.read_bytes() == before
    (tmp_path / "allow").mkdir()
    shutil.copy(tmp_path / "keys" / "cli.key", tmp_path / "allow")
    path = tiny_models("bert")
    with threaded_server(path, "1,1", num_labels=3, secret_key=str(tmp_path / "keys" / "srv.key_secret"),
                         allow=str(tmp_path / "allow")) as (endpoint, server):
        with _client(path, endpoint, client_id="from-cli-keys", key=str(secret),
                     server_key=str(tmp_path / "keys" / "srv.key")) as client:
            assert client.train_step(random_batch(4, VOCAB)) > 0
            assert server.sessions.by_client["from-cli-keys"].peer == load_key_pair(secret).public.decode()


def test_key_files_are_checked_with_a_message_that_says_what_to_do(keys, tmp_path):
    (tmp_path / "noise.txt").write_text("not a key\n")
    (tmp_path / "empty").mkdir()
    cases = [
        (lambda: load_key_pair(tmp_path / "missing.key_secret"), "no such file; create keys with `fedsplit keys"),
        (lambda: load_key_pair(tmp_path), "a folder, not a key file"),
        (lambda: load_key_pair(tmp_path / "noise.txt"), "not a ZeroMQ key file"),
        (lambda: load_key_pair(keys / "k1.key"), "holds only a public key; --key needs the secret file"),
        (lambda: load_public_key(keys / "server.key_secret"), "holds a secret key, which never leaves its machine"),
        (lambda: load_allowlist(tmp_path / "nowhere"), "--allow .*nowhere: no such folder"),
        (lambda: load_allowlist(tmp_path / "empty"), "no client public keys"),
        (lambda: create_keys(tmp_path, "../up"), "give a plain file name"),
    ]
    for load, message in cases:
        with pytest.raises(KeyFileError, match=message):
            load()


def test_a_client_refused_by_the_handshake_is_refused_on_every_request(curve_server, keys):
    # Not only hello: any request of a connection the server refuses ends at once, with the reason.
    path, endpoint, _ = curve_server
    conn = Connection(endpoint, "probe", timeout=60, keys=load_client_keys(**client_keys(keys, "stranger")))
    try:
        started = time.monotonic()
        for _ in range(2):
            with pytest.raises(HandshakeFailed, match="add stranger.key"):
                conn.request(Message("status"))
        assert time.monotonic() - started < QUICK
    finally:
        conn.close()


# ---------------------------------------------------------------- the commands


@pytest.mark.slow
def test_the_server_and_client_commands_run_encrypted(tmp_path, keys):
    model = save_tiny_with_tokenizer("bert", tmp_path / "model")
    # Three labels: the tiny model's head has three classes.
    lines = [json.dumps({"text": f"{w} is word {i}", "label": "abc"[i % 3]})
             for i, w in enumerate(["red", "apple", "blue", "pear", "green", "plum"] * 3)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")

    def client(*args: str) -> subprocess.Popen:
        command = fedsplit_command("client", "--server", endpoint, "--model", str(model), "--data",
                                   str(tmp_path / "train.jsonl"), "--steps", "2", "--batch-size", "4",
                                   "--no-progress", "--out", str(tmp_path / "adapter"), *args)
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())

    def finished(proc: subprocess.Popen) -> subprocess.CompletedProcess:
        out, err = proc.communicate(timeout=300)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    server_args = ["--secret-key", server_keys(keys)["secret_key"], "--allow", server_keys(keys)["allow"]]
    with running_server(model, "1,1", *server_args, probe_keys=load_client_keys(**client_keys(keys, "k1"))) as endpoint:
        # The three clients start side by side: the refusals must not depend on the order.
        procs = [client("--key", str(keys / "k1.key_secret"), "--server-key", str(keys / "server.key")),
                 client("--key", str(keys / "stranger.key_secret"), "--server-key", str(keys / "server.key")),
                 client()]
        trained, stranger, keyless = (finished(p) for p in procs)
    assert trained.returncode == 0, trained.stderr
    assert "after 2 steps" in trained.stdout
    assert stranger.returncode == 2
    assert "fedsplit client: error: the server at" in stranger.stderr
    assert "does not accept this client's key: add stranger.key" in stranger.stderr
    assert keyless.returncode == 2
    assert "requires encryption" in keyless.stderr and "pass --key and --server-key" in keyless.stderr
