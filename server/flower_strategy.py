"""Every fedsplit strategy as a Flower strategy.

``FedsplitStrategy`` drives fedsplit's own round coordinator
(server/flower_host.py) from Flower's message loop, so sampling, mixed ranks,
block subsets, frozen-weight updates, admission of uploads, aggregation and
the ``round_N/`` checkpoints are exactly those of ``fedsplit server``. Flower
carries the control and the client-side halves:

- a QUERY round first: each node's ClientApp registers with the backbone
  server over ZeroMQ and joins the federation (fedsplit's join), and answers
  with its client name;
- per round, ``configure_train`` sends each client the coordinator selected
  its own train message: its round offer (client-side LoRA at its rank, head,
  frozen-weight updates) and its train config (rank, blocks, cut, the backbone
  server's address, the federation's settings);
- ``aggregate_train`` hands each reply's upload (client-side LoRA, head,
  round record) to the coordinator, which adds the client's server-side LoRA
  where it lives and aggregates; it returns the global adapter (PEFT names).

Unlike Flower's FedAvg, rounds follow the coordinator: a round it retries
(``short_round = "retry"``) is sent again, so ``start`` runs until the
coordinator is done rather than a fixed count of Flower rounds.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from split.flower_records import RecordError, from_records, state_to_record, to_records
from split.flower_settings import FlowerRun
from split.protocol import ProtocolError, UploadPayload

from .flower_host import FlowerHost

log = logging.getLogger(__name__)

CONFIG = "fedsplit.config"  # the train or join config of a message, and a reply's client name
METRICS = "fedsplit.metrics"  # a train reply's loss, samples, bytes and peak memory
JOIN = "fedsplit-join"  # group of the join round's messages
NODE_WAIT = 300.0  # seconds the join waits for the run's nodes to connect
MAX_NAME = 64


class FlowerRunError(RuntimeError):
    """The Flower run cannot go on; the text says why."""


class FedsplitStrategy(Strategy):
    """A fedsplit strategy (``run.strategy``) run by Flower around one backbone server."""

    def __init__(self, run: FlowerRun, host: FlowerHost):
        self.run = run
        self.host = host
        self.node_of: dict[str, int] = {}  # client name -> Flower node id
        self.name_of: dict[int, str] = {}
        self.sent: dict[str, int] = {}  # this round's messages: client -> node
        self.round_index = 0
        self.history: list[dict] = []  # per closed round: index, uploads, refused, metrics, seconds
        self.join_seconds = 0.0  # the join round's wall time (every node registers and joins)
        self._round_started = 0.0

    # ------------------------------------------------------------ join

    def join(self, grid: Grid, timeout: float) -> list[str]:
        """Ask every node to register and join; returns the joined client names."""
        started = deadline = time.monotonic()
        deadline += NODE_WAIT
        nodes = sorted(grid.get_node_ids())
        while len(nodes) < self.run.clients:
            if time.monotonic() > deadline:
                raise FlowerRunError(f"only {len(nodes)} of the run's {self.run.clients} nodes connected in "
                                     f"{NODE_WAIT:.0f}s; start more SuperNodes or lower 'clients'")
            time.sleep(1.0)
            nodes = sorted(grid.get_node_ids())
        config = ConfigRecord({"address": self.host.address, "settings": json.dumps(self.run.client_part())})
        messages = [Message(content=RecordDict({CONFIG: config}), dst_node_id=node, message_type=MessageType.QUERY,
                            group_id=JOIN) for node in nodes]
        for reply in grid.send_and_receive(messages, timeout=timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("node %d did not join: %s", node, reply.error.reason)
                continue
            name = _client_name(reply.content)
            if name in self.node_of:
                raise FlowerRunError(f"nodes {self.node_of[name]} and {node} both joined as {name!r}: give each "
                                     "SuperNode its own partition-id")
            self.node_of[name], self.name_of[node] = node, name
        joined = self.host.members()
        self.join_seconds = time.monotonic() - started
        if len(joined) < self.run.clients:
            raise FlowerRunError(f"{len(joined)} of {self.run.clients} clients joined the federation "
                                 "(the nodes' logs say why)")
        return joined

    # ------------------------------------------------------------ Strategy

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Start the coordinator's next round; one message per client it selected."""
        self._round_started = time.monotonic()
        self.round_index, offers = self.host.begin_round()
        self.sent = {}
        messages = []
        for name, offer in offers.items():
            node = self.node_of.get(name)
            if node is None:  # joined over ZeroMQ, but not through this run's nodes
                continue
            meta = offer.meta
            train = ConfigRecord({"client": name, "round": self.round_index, "rank": int(meta["rank"]),
                                  "blocks": [] if meta["blocks"] is None else list(meta["blocks"]),
                                  "all-blocks": meta["blocks"] is None, "cut": self.run.cut,
                                  "address": self.host.address,
                                  "settings": json.dumps(self.host.coordinator.config.settings().to_meta())})
            content = to_records(offer, RecordDict({CONFIG: train}))
            messages.append(Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN,
                                    group_id=str(server_round)))
            self.sent[name] = node
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Give the coordinator the round's uploads and close the round;
        returns the global adapter and the round's client metrics."""
        uploads, missing, metrics = {}, {}, []
        for reply in replies:
            name = self.name_of.get(reply.metadata.src_node_id)
            if name not in self.sent:
                log.warning("a reply from node %d, which this round did not ask, is ignored",
                            reply.metadata.src_node_id)
                continue
            if reply.has_error():
                missing[name] = f"its ClientApp failed: {reply.error.reason}"[:500]
                continue
            try:
                uploads[name] = UploadPayload.from_message(from_records(reply.content, "upload"))
            except (RecordError, ProtocolError) as exc:
                missing[name] = f"its reply holds no valid upload: {exc}"
                continue
            record = reply.content.metric_records.get(METRICS)
            if record is not None:
                metrics.append(record)
        for name in self.sent:
            if name not in uploads and name not in missing:
                missing[name] = "no reply before Flower's timeout"
        closed, refused = self.host.finish_round(uploads, missing)
        for name, why in {**missing, **refused}.items():
            log.warning("round %d: client %s left out: %s", self.round_index, name, why)
        summary = _summarise(metrics)
        self.history.append({"round": self.round_index, "closed": closed is not None,
                             "aggregated": closed is not None and closed.aggregated,
                             "uploads": sorted(uploads), "left_out": {**missing, **refused}, "metrics": summary,
                             "seconds": time.monotonic() - self._round_started})
        return state_to_record(self.host.global_adapter()), MetricRecord(summary) if summary else None

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # evaluation is the checkpoint's: fedsplit evaluates round_N/ adapters offline

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log.info("fedsplit %s through Flower: %d clients, %d rounds, fraction %.2f", self.run.strategy,
                 self.run.clients, self.run.rounds, self.run.fraction)

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int | None = None,
              timeout: float = 3600, train_config=None, evaluate_config=None, evaluate_fn=None) -> Result:
        """Join every node, then run the coordinator's rounds to the end
        (``num_rounds`` is the run's ``rounds``; a retried round runs again)."""
        if num_rounds is not None and num_rounds != self.run.rounds:
            raise FlowerRunError(f"num_rounds {num_rounds} differs from the run's rounds {self.run.rounds}")
        if evaluate_fn is not None:
            raise FlowerRunError("evaluate_fn is not supported: evaluate the round_N/ checkpoints instead")
        self.summary()
        self.join(grid, timeout)
        result = Result()
        server_round = 0
        while not self.host.done:
            server_round += 1
            messages = list(self.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid))
            replies = grid.send_and_receive(messages, timeout=timeout) if messages else []
            arrays, metrics = self.aggregate_train(server_round, replies)
            result.arrays = arrays
            if metrics is not None:
                result.train_metrics_clientapp[server_round] = metrics
        return result


def _client_name(content: RecordDict) -> str:
    """The client name in a join reply, checked (it came off the network)."""
    config = content.config_records.get(CONFIG)
    name = None if config is None else config.get("client")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or not name.isprintable():
        raise FlowerRunError(f"a join reply must name its client (printable, at most {MAX_NAME} characters), "
                             f"got {name!r}"[:200])
    return name


def _summarise(records: list[MetricRecord]) -> dict:
    """The round's client metrics: the sample-weighted mean loss, total
    samples and bytes, and the largest peak memory."""
    if not records:
        return {}
    samples = [int(r.get("num-examples", 0)) for r in records]
    total = sum(samples)
    loss = sum(float(r.get("loss", 0.0)) * n for r, n in zip(records, samples)) / max(total, 1)
    return {"loss": loss, "num-examples": total,
            "bytes-sent": sum(int(r.get("bytes-sent", 0)) for r in records),
            "bytes-received": sum(int(r.get("bytes-received", 0)) for r in records),
            "peak-memory": max(int(r.get("peak-memory", 0)) for r in records)}
