"""The codecs of one client's split traffic, and how a sender applies them.

A client picks a codec per direction (``fedsplit client --codec-up SPEC
--codec-down SPEC``) and says so in its hello; each side then sends in its
own direction's codec:

- up (client -> server): the forward's ``hidden`` and the backward's ``grad``;
- down (server -> client): the forward reply's ``hidden`` and the backward
  reply's ``grad``.

Everything else travels raw: attention masks, position ids and labels (exact
integers), and in the two-part split (k2 = 0) the logits and the loss the
server sends back (a few numbers per sample, and the loss the client reports
must be the server's) and the client's backward ``grad`` (the gradient of the
loss, one number, which scales every gradient after it).

A sender whose codec keeps an error-feedback residual (top-k) keeps one per
tensor name of its direction, for training traffic only: an evaluation
forward has no later step to carry a residual into, and must not receive a
training step's. The residual is applied when the message is built
(``code``), so a message resent unchanged or replayed from the server's reply
cache is the same bytes and moves no residual twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from .codecs import RAW, CodecSpec, ErrorFeedback, parse_codec, uses_error_feedback
from .wire import Message

UP, DOWN = "up", "down"


@dataclass(frozen=True)
class LinkCodecs:
    """A client's codec for each direction (fp32 both ways: lossless, the default)."""

    up: CodecSpec = RAW
    down: CodecSpec = RAW

    @classmethod
    def parse(cls, up: str | CodecSpec = "fp32", down: str | CodecSpec = "fp32") -> "LinkCodecs":
        """From spec texts (or specs); ValueError naming the direction and what is wrong."""
        specs = []
        for direction, value in ((UP, up), (DOWN, down)):
            if isinstance(value, CodecSpec):
                specs.append(value)
                continue
            try:
                specs.append(parse_codec(value))
            except ValueError as exc:
                raise ValueError(f"--codec-{direction}: {exc}") from None
        return cls(*specs)

    def to_meta(self) -> dict:
        return {UP: self.up.text, DOWN: self.down.text}

    @classmethod
    def from_meta(cls, meta) -> "LinkCodecs":
        """From a hello's ``codecs`` map; ValueError naming what is wrong."""
        if not isinstance(meta, dict) or set(meta) != {UP, DOWN}:
            raise ValueError(f"field 'codecs' must be a map of exactly {UP!r} and {DOWN!r} to codec texts")
        for direction in (UP, DOWN):
            if not isinstance(meta[direction], str):
                raise ValueError(f"field 'codecs': {direction!r} must be a codec text such as 'int8'")
        return cls.parse(meta[UP], meta[DOWN])

    @property
    def lossless(self) -> bool:
        return self.up.lossless and self.down.lossless


class Sender:
    """One side's sending direction: its codec and, for a codec that keeps
    one, its error-feedback residual per tensor name."""

    def __init__(self, spec: CodecSpec = RAW):
        self.spec = spec
        self.feedback = ErrorFeedback()

    def code(self, msg: Message, names: tuple[str, ...], train: bool = True) -> Message:
        """``msg`` with its tensors called ``names`` (those it has) set to go in
        this direction's codec, error feedback applied to them when ``train``.
        Call once per message built, never again for a resend."""
        if self.spec.lossless:
            return msg
        for name in names:
            tensor = msg.tensors.get(name)
            if tensor is None:
                continue
            if train and uses_error_feedback(self.spec):
                msg.tensors[name] = self.feedback.correct(name, tensor, self.spec)
            msg.codecs[name] = self.spec
        return msg
