"""FedDPA: the personal adapter trains beside the global one and never leaves the client."""

from __future__ import annotations

import threading

import torch

from conftest import VOCAB, random_batch
from edge.client import ClientConfig, SplitClient
from edge.federated import FederatedClient, FederatedOptions
from server.rounds import FederationConfig
from server.service import BackboneServer, ServerConfig
from split.lora import LoraSpec
from split.partition import Cut


def test_personal_adapter_trains_locally_and_is_never_uploaded(tiny_models):
    path = tiny_models("bert")
    server = BackboneServer(ServerConfig(model=str(path), cut=Cut(1, 1), bind="tcp://127.0.0.1:*", num_labels=3,
                                         dropout=False, federation=FederationConfig(rounds=2, min_clients=1,
                                                                                    local_steps=3)))
    endpoint = server.bind()
    stop = threading.Event()
    uploads = []
    original = server.coordinator.upload
    server.coordinator.upload = lambda *a, **kw: (uploads.append((a, kw)), original(*a, **kw))[1]
    thread = threading.Thread(target=server.serve, args=(stop.is_set,), daemon=True)
    thread.start()
    try:
        client = SplitClient(ClientConfig(server=endpoint, model=str(path), num_labels=3, dropout=False,
                                          lora=LoraSpec(4, 8.0), lr=2e-2))
        train = [random_batch(i, VOCAB) for i in range(4)]
        runner = FederatedClient(client, train, 40, test=train[:1],
                                 options=FederatedOptions(evaluate=True, personal=True, personal_test=train[:2]))
        runner.run()
        local = {n: p for n, p in client.model.named_parameters() if ".local." in n}
        assert local and any("lora_B" in n and p.abs().sum() > 0 for n, p in local.items())
        assert set(runner.personal_accuracy) == {"global", "personalised"}
        # Uploads carry the global adapter's factors only: the personal one's differ.
        (args, _), = uploads[-1:]
        uploaded_A = args[1].A
        assert uploaded_A
        for name, a in uploaded_A.items():
            mine = dict(client.model.named_parameters())[f"base_model.model.{name}.lora_A.local.weight"]
            assert not torch.equal(a, mine)
        with torch.no_grad():
            client.model.eval()
            both = client.predict(train[0])
            runner.personal.use_global()
            alone = client.predict(train[0])
            runner.personal.use_both()
        assert not torch.allclose(both, alone)
        client.close()
    finally:
        stop.set()
        thread.join(5)
