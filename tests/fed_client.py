"""A federated client process on a tiny model and random batches (used by tests)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import VOCAB, random_batch  # noqa: E402
from edge.client import ClientConfig, SplitClient  # noqa: E402
from edge.federated import FederatedClient, FederatedOptions  # noqa: E402
from split.lora import LoraSpec  # noqa: E402


def main(endpoint: str, model: str, client_id: str, rank: int, index: int) -> None:
    client = SplitClient(ClientConfig(server=endpoint, model=model, num_labels=3, dropout=False,
                                      lora=LoraSpec(rank, 8.0), client_id=client_id, lr=5e-3, timeout=60))
    train = [random_batch(1000 * index + i, VOCAB, num_labels=3) for i in range(5)]
    runner = FederatedClient(client, train, num_samples=10 * (index + 1), test=train,
                             options=FederatedOptions(evaluate=True))
    records = runner.run()
    client.close()
    print(json.dumps({"rounds": [r.__dict__ for r in records], "final_accuracy": runner.final_accuracy}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
