"""Forward and backward on the backbone for one client's step; no sockets.

A training forward keeps the autograd graph (the injected input and the
output) in the session until that step's backward arrives. The server runs
only the blocks the client's cut leaves to it: hosted blocks the client keeps
itself become passthroughs for the duration of the call.

Nothing non-finite reaches a server-side adapter: a hidden state or a gradient
holding NaN or infinity is refused before it is used, and a backward whose
gradients come out non-finite is refused before they are applied. One such
step would otherwise poison the client's server-side LoRA, or, with a shared
one, every client's.

Limits: a forward carries at most ``max_tokens`` tokens (batch x sequence)
and no longer a sequence than the model has positions, which bounds the time
and memory of one call; a client leaves at most ``max_pending`` forwards
waiting for their backward; and what every waiting graph holds (measured as
the bytes of the tensors autograd saved for the backward) stays within the
sessions' ``PendingMemory`` budget.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from split.families import get_module, join, set_module
from split.partition import Cut, Segment
from split.placeholders import Passthrough
from split.seeds import seeded_rng

from .admission import value_problem
from .sessions import MB, SHARED, BusyError, RequestError, Session, Sessions


class BackboneCompute:
    """The backbone's share of a split step, on behalf of a session."""

    def __init__(self, segment: Segment, sessions: Sessions, max_pending: int = 8,
                 device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32, *,
                 max_tokens: int):
        self.segment = segment
        self.sessions = sessions
        self.max_pending = max_pending
        self.max_tokens = max_tokens
        # Received tensors arrive as CPU bytes in the sender's dtype; they are
        # moved to this device and the frozen weights' dtype here.
        self.device, self.dtype = device, dtype
        text = segment.config.get_text_config()
        self.width = text.hidden_size
        # Positions the model was trained for (None: it names none); GPT-2 calls them n_positions.
        self.max_positions = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)

    def check_inputs(self, tensors: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The hidden state, mask and positions of a forward, refused when
        malformed or over the limits. Reads nothing but the tensors and the
        config, so the loop thread refuses a forward before it waits its turn."""
        hidden, mask = tensors.get("hidden"), tensors.get("attention_mask")
        if hidden is None or mask is None:
            raise RequestError("forward needs tensors 'hidden' and 'attention_mask'")
        if hidden.dim() != 3 or hidden.shape[-1] != self.width or not hidden.is_floating_point():
            raise RequestError(f"'hidden' must be a float tensor of shape (batch, tokens, {self.width}), "
                               f"got {tuple(hidden.shape)} {hidden.dtype}")
        batch, length = hidden.shape[:2]
        if batch * length > self.max_tokens:
            raise RequestError(f"a forward of {batch} x {length} = {batch * length} tokens exceeds the server's "
                               f"limit of {self.max_tokens} tokens per request (--max-tokens); send smaller "
                               "batches or shorter sequences")
        if self.max_positions is not None and length > self.max_positions:
            raise RequestError(f"sequences of {length} tokens exceed the model's {self.max_positions} positions; "
                               f"truncate them (--max-length {self.max_positions} at most)")
        if tuple(mask.shape) != tuple(hidden.shape[:2]):
            raise RequestError(f"'attention_mask' must have shape {tuple(hidden.shape[:2])}, got {tuple(mask.shape)}")
        positions = tensors.get("position_ids")
        if positions is not None and (positions.dim() != 2 or positions.shape[-1] != hidden.shape[1]):
            raise RequestError(f"'position_ids' must have shape (batch or 1, {hidden.shape[1]})")
        return hidden, mask, positions

    def _check_room(self, session: Session, step: int) -> None:
        """Refuse a training forward before it runs when its graph could not be
        kept: the client has its limit of forwards waiting, or all waiting
        graphs together have spent the budget. Both pass once backwards arrive."""
        if len(session.graphs) >= self.max_pending:
            raise BusyError(f"{len(session.graphs)} forwards are waiting for their backward, this server's limit "
                            "per client (--max-pending); send the backward of earlier steps first")
        if step in session.graphs:
            raise RequestError(f"step {step} already has a forward waiting for its backward")
        if self.sessions.pending.full():
            count, held = self.sessions.pending.totals()
            raise BusyError(f"{count} waiting forwards hold {held / MB:.0f} MiB, the server's whole budget "
                            f"(--max-pending-mb {self.sessions.pending.budget / MB:.0f}); retry after some backwards")

    def forward(self, session: Session, step: int, tensors: dict, train: bool) -> dict[str, torch.Tensor]:
        """Run the client's server blocks (and, in a two-part split, norm, head
        and loss) on the received hidden state; returns the reply tensors."""
        hidden, mask, positions = self.check_inputs(tensors)
        # Scanned here, not in check_inputs: the loop thread checks shapes and
        # limits only, so the values are read once, in the forward's turn.
        _refuse_nonfinite("the forward's 'hidden'", hidden)
        if train:
            self._check_room(session, step)
        self.sessions.activate(session)
        seg = self.segment
        mask = mask.to(self.device, torch.long)
        h_in = hidden.to(self.device, self.dtype).detach().requires_grad_(train)
        seg.injected.value = h_in
        self.sessions.model.train(train)
        kwargs = {"attention_mask": mask}
        if positions is not None:
            kwargs["position_ids"] = positions.to(self.device, torch.long)
        try:
            with self._client_blocks(session.cut), torch.set_grad_enabled(train), self._saved_bytes(train) as held, \
                    seeded_rng(h_in.device, session.seed, "dropout", "server", step):
                if session.cut.two_part:
                    labels = self._check_labels(tensors.get("labels"), hidden.shape[:2])
                    out = seg.model(input_ids=self._dummy_ids(mask, pooled=True),
                                    labels=labels.to(self.device, torch.long), **kwargs)
                    result = {"loss": out.loss.detach().reshape(1), "logits": out.logits.detach()}
                    keep = out.loss
                else:
                    out = seg.base()(input_ids=self._dummy_ids(mask, pooled=False), **kwargs).last_hidden_state
                    result = {"hidden": out.detach()}
                    keep = out
        finally:
            seg.injected.value = None
        # Checked before the graph is kept: a step that cannot be backpropagated is not pending.
        for name, value in result.items():
            _refuse_nonfinite(f"the server's output {name!r}", value,
                              "the server-side LoRA may have diverged; lower the learning rate")
        if train:
            # Refused here, the graph is freed with this frame; kept, it is counted until its backward.
            session.graphs.put(step, h_in, keep, _storage_bytes(held, h_in, keep))
        return result

    @contextmanager
    def _saved_bytes(self, measure: bool) -> Iterator[dict[int, int]]:
        """While a training forward runs, the storages autograd saves for its
        backward (data pointer -> bytes), without the model's own parameters
        and buffers, which exist anyway: what keeping the graph costs."""
        held: dict[int, int] = {}
        if not measure:
            yield held
            return
        model = self.sessions.model
        weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:
                held[storage.data_ptr()] = storage.nbytes()
            return tensor  # saved as it is: the hook only counts

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield held

    def backward(self, session: Session, step: int, grad: torch.Tensor | None) -> torch.Tensor:
        """Backpropagate the client's gradient through the kept graph, step the
        session's optimizer, and return the gradient at the cut."""
        entry = session.graphs.pop(step, None)
        if entry is None:
            raise RequestError(f"no forward is waiting for a backward at step {step} (a forward whose backward "
                               "does not come in time is dropped)")
        h_in, out = entry.h_in, entry.out
        if grad is None:
            raise RequestError("backward needs tensor 'grad'")
        if grad.numel() != out.numel() or (out.dim() > 0 and tuple(grad.shape) != tuple(out.shape)):
            raise RequestError(f"'grad' must have shape {tuple(out.shape) or (1,)}, got {tuple(grad.shape)}")
        if not grad.is_floating_point():
            raise RequestError(f"'grad' must be a float tensor, got {grad.dtype}")
        _refuse_nonfinite("the backward's 'grad'", grad)
        self.sessions.activate(session)
        params = [p for p in session.params if p.requires_grad]
        # Gradients are computed apart and added only once all are finite: a
        # shared adapter's accumulated gradients hold other clients' steps too.
        grads = torch.autograd.grad(out, [h_in, *params], grad.to(out.device, out.dtype).reshape(out.shape),
                                    allow_unused=True)
        for g in grads:
            if g is not None:
                _refuse_nonfinite("a gradient of this step", g, "the step is dropped; lower the learning rate")
        for p, g in zip(params, grads[1:]):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g
        if session.gradients is not None:  # --allocation fisher
            session.gradients.record(params, grads[1:])
        # A shared adapter may step only when no other client's graph still
        # needs its current values; until then gradients accumulate.
        if session.adapter != SHARED or not self.sessions.graphs_waiting():
            session.optimizer.step()
            session.optimizer.zero_grad(set_to_none=True)
        session.steps += 1
        return grads[0].detach()

    def _check_labels(self, labels: torch.Tensor | None, batch_tokens) -> torch.Tensor:
        """The labels of a two-part forward, checked against the server's head:
        class ids for classification, token ids or -100 for causal LM."""
        if labels is None:
            raise RequestError("a two-part forward needs 'labels'")
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise RequestError(f"'labels' must be integers, got {labels.dtype}")
        cfg, task = self.segment.config, self.segment.task
        causal = task != "classification"
        shape = tuple(batch_tokens) if causal else tuple(batch_tokens[:1])
        high = cfg.get_text_config().vocab_size if causal else cfg.num_labels
        if tuple(labels.shape) != shape:
            raise RequestError(f"'labels' must have shape {shape}, got {tuple(labels.shape)}")
        bad = (labels < 0) | (labels >= high)
        if causal:
            bad &= labels != -100  # positions the loss ignores
        if bool(bad.any()):
            raise RequestError(f"'labels' must lie in [0, {high})" + (" or be -100" if causal else "")
                               + f" for this server's head, got {labels[bad][0].item()}")
        return labels

    @contextmanager
    def _client_blocks(self, cut: Cut):
        """Run only the client's server blocks: hosted blocks the client keeps
        itself become passthroughs for the duration of the call."""
        seg = self.segment
        blocks = seg.blocks()
        mine = set(cut.server_blocks(seg.num_layers))
        saved = {}
        for i in seg.cut.server_blocks(seg.num_layers):
            if i not in mine:
                saved[i] = blocks[i]
                blocks[i] = Passthrough()
        norm_path = join(seg.family.prefix, seg.family.norm) if seg.family.norm else None
        norm = None
        if norm_path and seg.cut.two_part and not cut.two_part:
            norm = get_module(seg.model, norm_path)
            set_module(seg.model, norm_path, torch.nn.Identity())
        try:
            yield
        finally:
            for i, block in saved.items():
                blocks[i] = block
            if norm is not None:
                set_module(seg.model, norm_path, norm)

    def _dummy_ids(self, mask: torch.Tensor, pooled: bool) -> torch.Tensor:
        """Token ids for the server's forward: the injected embedding ignores them,
        but a pooled classification head finds each sequence's last token by its
        pad id, so padding positions carry the pad id."""
        if not pooled:
            return torch.zeros_like(mask)
        cfg = self.segment.config
        pad = cfg.pad_token_id or 0
        other = (pad + 1) % cfg.get_text_config().vocab_size
        return torch.where(mask.bool(), torch.full_like(mask, other), torch.full_like(mask, pad))


def _refuse_nonfinite(what: str, tensor: torch.Tensor,
                      hint: str = "check the client's inputs and learning rate") -> None:
    """Refuse a tensor holding NaN or infinity before it touches a server-side adapter."""
    problem = value_problem(tensor)
    if problem is not None:
        raise RequestError(f"{what} {problem}; refused ({hint})")


def _storage_bytes(held: dict[int, int], *tensors: torch.Tensor) -> int:
    """Bytes of the saved storages plus those of ``tensors``, each storage once."""
    storages = dict(held)
    for tensor in tensors:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storages.values())
