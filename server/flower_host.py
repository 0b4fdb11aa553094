"""The backbone server of a Flower run, with its rounds driven from outside.

Where it runs: inside the ServerApp's process, serving from a thread. The
strategy (server/flower_strategy.py) then reads each client's server-side LoRA
where it lives, so that half never crosses a link, and the ServerApp process,
otherwise idle while Flower waits for replies, does the server's compute. On a
real deployment this is the machine of the SuperLink, whose nodes must reach
the backbone server's address (``backbone-bind``, ``backbone-address``).

The rounds are fedsplit's: ``FlowerHost`` runs the server's own
``Coordinator`` (sampling, downloads, server-side loading, admission of
uploads, aggregation) on the server's compute thread (``BackboneServer.submit``),
with the server's own round clock off, and writes the same ``round_N/``
checkpoints as ``fedsplit server``. No Flower import here.
"""

from __future__ import annotations

import logging
import threading

from split.flower_settings import FlowerRun
from split.partition import Cut
from split.protocol import UploadPayload
from split.wire import Message

from .checkpoint import adapter_tensors
from .rounds import FederationConfig, FederationError, RoundLog
from .service import BackboneServer, ServerConfig

log = logging.getLogger(__name__)

# Idle simulated clients send nothing between their rounds (no heartbeat runs
# in a ClientApp), so their sessions, which hold their server-side LoRA, must
# outlive many rounds: a week.
SESSION_TIMEOUT = 7 * 24 * 3600.0
CALL_TIMEOUT = 600.0  # seconds a coordinator call may wait for the compute thread


class FlowerHost:
    """A ``BackboneServer`` serving from a thread, whose coordinator the strategy drives."""

    def __init__(self, run: FlowerRun, num_labels: int, min_clients: int):
        federation = FederationConfig(strategy=run.strategy, strategy_options=dict(run.strategy_options),
                                      rounds=run.rounds, fraction=run.fraction, min_clients=min_clients,
                                      local_steps=run.local_steps, seed=run.seed, deadline=run.deadline,
                                      client_init=run.client_init)
        self.run = run
        self.server = BackboneServer(ServerConfig(
            model=run.model or None, cut=Cut.parse(run.cut), bind=run.backbone_bind,
            secret_key=run.secret_key or None, allow=run.allow or None, num_labels=num_labels, seed=run.seed,
            federation=federation, checkpoint_dir=run.checkpoint_dir or None, session_timeout=SESSION_TIMEOUT,
            max_sessions=max(64, min_clients)))
        self.server.round_clock = False
        self.coordinator = self.server.coordinator
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.address = ""

    # ------------------------------------------------------------ lifetime

    def start(self) -> str:
        """Bind and serve from a thread; returns the address clients connect to."""
        endpoint = self.server.bind()
        self._thread = threading.Thread(target=self.server.serve, args=(self._stop.is_set,),
                                        kwargs={"poll_ms": 20}, name="fedsplit-backbone", daemon=True)
        self._thread.start()
        self.address = self.run.backbone_address or endpoint
        log.info("backbone server on %s; clients connect to %s", endpoint, self.address)
        return self.address

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        self.server.close()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def _call(self, fn):
        """``fn()`` on the server's compute thread (the coordinator's owner)."""
        return self.server.submit(fn).result(CALL_TIMEOUT)

    # ------------------------------------------------------------ rounds

    def members(self) -> list[str]:
        """The clients that have joined, sorted."""
        return self._call(lambda: sorted(self.coordinator.members))

    @property
    def done(self) -> bool:
        return self.coordinator.phase == "done"

    def begin_round(self) -> tuple[int, dict[str, Message]]:
        """Start the next round if none runs; returns its index and each
        selected client's offer as a round reply (its deltas: every
        frozen-weight update so far on its side, see edge/pooled.py)."""
        return self._call(self._begin)

    def _begin(self) -> tuple[int, dict[str, Message]]:
        coord = self.coordinator
        if coord.phase == "waiting":
            coord.tick()
        if coord.phase != "running":
            why = coord.stalled or f"{len(coord.members)} of {coord.config.min_clients} clients have joined"
            raise RuntimeError(f"round {coord.round} cannot start: {why}")
        offers = {}
        for client in sorted(coord.undelivered):
            offer = coord.poll(client)
            member = coord.members[client]
            offer.deltas = {m: d for m, d in coord.merged.items() if m in member.modules}
            offers[client] = offer.to_message(client)
        return coord.round, offers

    def finish_round(self, uploads: dict[str, UploadPayload], missing: dict[str, str]) -> tuple[RoundLog | None, dict]:
        """Take the round's uploads, leave out the clients that sent none
        (``missing``: client -> why), close the round (aggregate, checkpoint);
        returns its log (None: the round is retried) and the uploads refused,
        client -> why."""
        return self._call(lambda: self._finish(uploads, missing))

    def _finish(self, uploads: dict[str, UploadPayload], missing: dict[str, str]):
        coord, refused = self.coordinator, {}
        for client, payload in sorted(uploads.items()):
            try:
                coord.upload(client, payload)
            except FederationError as exc:
                refused[client] = str(exc)
                continue
            self.server.runlog.upload(client, payload.round, payload.record, len(coord.uploads), len(coord.selected))
        # The round waits for no one who will not upload: Flower's replies are all in.
        for client in coord.selected:
            if client not in coord.uploads and client not in coord.refused:
                coord.refused[client] = missing.get(client) or refused.get(client) or "no upload came"
        closed = coord.tick()
        self.server.runlog.rounds(coord.history)
        if closed is not None and self.server.config.checkpoint_dir is not None:
            self.server._checkpoint(closed.round)
        return closed, refused

    def global_adapter(self) -> dict:
        """The global model as PEFT adapter tensors (whole-model names)."""
        return self._call(lambda: adapter_tensors(self.coordinator.global_model(),
                                                  self.server.sessions.shared_factors()))
