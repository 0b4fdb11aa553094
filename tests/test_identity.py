"""A session belongs to whoever holds its token (and, on an encrypted socket,
its key), not to whoever names its client id."""

from __future__ import annotations

import pytest
import torch

from conftest import VOCAB, random_batch, status, threaded_server
from edge.client import ClientConfig, ServerRefused, SplitClient
from split.transport import Connection, ServerError
from split.wire import Message


@pytest.fixture(scope="module")
def bert_server(tiny_models):
    path = tiny_models("bert")
    with threaded_server(path, "1,1", num_labels=3) as (endpoint, server):
        yield path, endpoint, server


def _client(path, endpoint, **kw) -> SplitClient:
    return SplitClient(ClientConfig(server=endpoint, model=str(path), num_labels=3, timeout=30, **kw))


def _server_lora(client: SplitClient) -> dict[str, torch.Tensor]:
    return {k: v for k, v in client.conn.request(Message("adapter")).tensors.items()}


def test_a_hello_with_another_clients_id_is_refused_and_evicts_nothing(bert_server):
    path, endpoint, server = bert_server
    victim = _client(path, endpoint, client_id="victim")
    try:
        victim.train_step(random_batch(0, VOCAB))
        before = _server_lora(victim)
        with pytest.raises(ServerRefused, match="client id 'victim' is in use by another session"):
            _client(path, endpoint, client_id="victim")
        # The refused hello left the victim's session and its trained server-side LoRA as they were.
        after = _server_lora(victim)
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)
        victim.train_step(random_batch(1, VOCAB))
    finally:
        victim.close()


def test_requests_without_the_sessions_token_are_refused(bert_server):
    path, endpoint, server = bert_server
    victim = _client(path, endpoint, client_id="victim2")
    thief = Connection(endpoint, "victim2", timeout=10)
    try:
        for token in ("", "0" * 32, victim.conn.token[:-1] + "x"):
            thief.token = token
            for op in ("adapter", "bye", "backward"):
                with pytest.raises(ServerError, match="no session for client 'victim2' with this token") as exc:
                    thief.request(Message(op))
                assert exc.value.code == "session"
        # The victim's session survived every attempt.
        victim.train_step(random_batch(2, VOCAB))
        # Its own token serves it from any connection: a reconnect keeps the session.
        thief.token = victim.conn.token
        assert thief.request(Message("adapter")).tensors
    finally:
        thief.close()
        victim.close()


def test_a_client_with_its_token_may_register_again(bert_server):
    path, endpoint, server = bert_server
    client = _client(path, endpoint, client_id="again")
    try:
        old = client.conn.token
        hello = client.conn.request(Message("status"))  # any request with the token is served
        assert hello.op == "ok"
        client._join()  # the same connection, holding its token, says hello again
        assert client.conn.token != old
        client.train_step(random_batch(3, VOCAB))
    finally:
        client.close()


def test_status_names_no_client(bert_server):
    path, endpoint, server = bert_server
    client = _client(path, endpoint, client_id="secret-name")
    try:
        reply = status(endpoint)
        assert reply["sessions"] >= 1
        assert "secret-name" not in repr(reply)
    finally:
        client.close()


def test_routing_ids_are_not_chosen_by_the_client(bert_server):
    path, endpoint, server = bert_server
    a, b = _client(path, endpoint, client_id="same-name-a"), _client(path, endpoint, client_id="same-name-b")
    try:
        ids = [server.sessions.by_client[c].routing_id for c in ("same-name-a", "same-name-b")]
        assert not any(b"same-name" in i for i in ids)
        assert ids[0] != ids[1]
    finally:
        a.close()
        b.close()
