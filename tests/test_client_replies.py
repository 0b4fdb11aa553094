"""A server's replies are checked before the client computes with them: a
missing, misshapen, non-float or non-finite tensor is a ServerError naming it."""

from __future__ import annotations

import pytest
import torch

from edge.client import BackboneLink
from split.transport import ServerError
from split.wire import Message

HIDDEN = torch.randn(2, 5, 8)


class StubConnection:
    """Answers every request with the tensors it was given."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def request(self, msg: Message, **_) -> Message:
        return Message("ok", msg.client, msg.step, meta={"server_s": 0.01}, tensors=self.tensors)


def _forward(tensors: dict, labels=None):
    link = BackboneLink(StubConnection(tensors), rotary=False)
    link.labels = labels
    return link.remote_forward(HIDDEN, 0, train=True)


def test_a_well_formed_reply_is_taken():
    assert torch.equal(_forward({"hidden": HIDDEN * 2}), HIDDEN * 2)
    loss = _forward({"loss": torch.tensor([0.5]), "logits": torch.zeros(2, 3)}, labels=torch.tensor([0, 1]))
    assert loss.item() == 0.5


@pytest.mark.parametrize("tensors, labels, expected", [
    ({}, None, "lacks tensor 'hidden'"),
    ({"hidden": torch.randn(2, 5, 7)}, None, "'hidden' must be a float tensor of shape (2, 5, 8)"),
    ({"hidden": torch.randn(2, 5)}, None, "'hidden' must be a float tensor"),
    ({"hidden": torch.zeros(2, 5, 8, dtype=torch.int64)}, None, "'hidden' must be a float tensor"),
    ({"hidden": torch.full((2, 5, 8), float("nan"))}, None, "'hidden' holds NaN or infinite values"),
    ({"loss": torch.tensor([0.5])}, torch.tensor([0, 1]), "lacks tensor 'logits'"),
    ({"loss": torch.tensor([0.5]), "logits": torch.zeros(3, 3)}, torch.tensor([0, 1]), "'logits' must be"),
    ({"loss": torch.tensor([0.5, 1.0]), "logits": torch.zeros(2, 3)}, torch.tensor([0, 1]), "'loss' must be"),
    ({"loss": torch.tensor([float("inf")]), "logits": torch.zeros(2, 3)}, torch.tensor([0, 1]), "'loss' holds"),
])
def test_a_bad_forward_reply_is_a_server_error_naming_it(tensors, labels, expected):
    with pytest.raises(ServerError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        _forward(tensors, labels)


@pytest.mark.parametrize("grad, expected", [
    (None, "lacks tensor 'grad'"),
    (torch.randn(2, 4, 8), "'grad' must be a float tensor of shape"),
    (torch.full((2, 5, 8), float("-inf")), "'grad' holds NaN or infinite values"),
])
def test_a_bad_backward_reply_is_a_server_error_naming_it(grad, expected):
    link = BackboneLink(StubConnection({} if grad is None else {"grad": grad}), rotary=False)
    with pytest.raises(ServerError, match=expected):
        link.remote_backward(0, torch.ones(2, 5, 8), (2, 5, 8))
