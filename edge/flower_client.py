"""The fedsplit ClientApp: a split client as a Flower ClientApp.

- On the join QUERY it registers with the backbone server over ZeroMQ (the
  address comes in the message) and joins the federation, as ``fedsplit
  client`` does, under the name ``client{partition-id}``; it answers with
  that name.
- On a TRAIN message it loads the round offer, trains the round's local steps
  through the backbone server (activations over fedsplit's ZeroMQ link, in
  the run's link codecs) and replies with its upload (client-side LoRA at its
  rank, head, round record) and its metrics: loss, samples, bytes sent and
  received over the link, peak memory. The server-side half of its LoRA stays
  on the backbone server, which the strategy reads directly.

A node's own state lives in ``context.state`` between its rounds: its session
token, step counters and LoRA and head. A worker process (a Ray actor in a
simulation) builds a client segment once per LoRA shape and reuses it for
every client it runs (``edge.pooled``), so idle simulated clients cost
nothing but their state. The node's data share is ``partition-id`` of
``num-partitions`` (Flower's node config) under the run's partition.
"""

from __future__ import annotations

import json
import logging

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from split.flower_records import from_records, record_to_state, state_to_record, to_records
from split.flower_settings import FlowerRun, SettingsError
from split.lora import LoraSpec
from split.partition import Cut
from split.protocol import FederationSettings, RoundOffer

from .client import ClientConfig
from .pooled import ClientCounters, PooledClient, join_client, round_client
from .shard import ShardSpec, shard

log = logging.getLogger(__name__)

CONFIG, METRICS = "fedsplit.config", "fedsplit.metrics"  # as server/flower_strategy.py names them
STATE, TENSORS = "fedsplit.client", "fedsplit.client-tensors"  # in context.state
_POOL: dict[tuple, PooledClient] = {}  # per worker process: one segment per LoRA shape and settings


def client_app() -> ClientApp:
    """The ClientApp (examples/flower/fedsplit_flower/client_app.py serves it)."""
    app = ClientApp()

    @app.query()
    def join(msg: Message, context: Context) -> Message:
        return _answering(msg, lambda: _join(msg, context))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return _answering(msg, lambda: _train(msg, context))

    return app


def _answering(msg: Message, work) -> Message:
    """The reply ``work()`` builds; a failure is logged here with its cause
    and goes back as Flower's error reply (the strategy leaves the client out)."""
    try:
        return Message(work(), reply_to=msg)
    except Exception:
        log.exception("fedsplit ClientApp: the %s message failed", msg.metadata.message_type)
        raise


def _partition(context: Context, run: FlowerRun) -> int:
    """This node's partition index, checked against the run's partitions."""
    index, count = context.node_config.get("partition-id"), context.node_config.get("num-partitions", run.clients)
    if not isinstance(index, int) or isinstance(index, bool):
        raise SettingsError("the node config needs an integer partition-id (e.g. flower-supernode --node-config "
                            "\"partition-id=0 num-partitions=4\")")
    if count != run.clients:
        raise SettingsError(f"the node config says num-partitions={count}, the run's clients={run.clients}; "
                            "they must agree (every node cuts the same partition)")
    if not 0 <= index < run.clients:
        raise SettingsError(f"partition-id {index} is outside the run's {run.clients} partitions")
    return index


def _settings(config: ConfigRecord) -> FlowerRun:
    text = config.get("settings")
    if not isinstance(text, str):
        raise SettingsError("the join message carries no fedsplit settings")
    try:
        return FlowerRun.from_config(json.loads(text))
    except json.JSONDecodeError as exc:
        raise SettingsError(f"the join message's settings are not JSON: {exc}") from None


def _address(config: ConfigRecord) -> str:
    address = config.get("address")
    if not isinstance(address, str) or not address.startswith(("tcp://", "ipc://")):
        raise SettingsError(f"the message's backbone address must be tcp://HOST:PORT, got {address!r}"[:200])
    return address


def _pool(run: FlowerRun, rank: int, num_labels: int, context: Context) -> PooledClient:
    """This worker's client segment for ``run`` at ``rank``, built on first use."""
    key = (run.model, run.cut, rank, run.alpha, run.seed, run.lr, run.head_lr, run.codec_up, run.codec_down,
           num_labels, context.node_config.get("key"), context.node_config.get("server-key"))
    pool = _POOL.get(key)
    if pool is None:
        config = ClientConfig(model=run.model or None, cut=Cut.parse(run.cut), num_labels=num_labels,
                              lora=LoraSpec(rank=rank, alpha=run.alpha), lr=run.lr, head_lr=run.head_lr,
                              seed=run.seed, codec_up=run.codec_up, codec_down=run.codec_down,
                              key=context.node_config.get("key") or None,
                              server_key=context.node_config.get("server-key") or None)
        pool = _POOL[key] = PooledClient(config)
    return pool


def _join(msg: Message, context: Context) -> RecordDict:
    config = msg.content.config_records.get(CONFIG)
    if config is None:
        raise SettingsError("the join message carries no fedsplit config")
    run, address = _settings(config), _address(config)
    index = _partition(context, run)
    data = shard(ShardSpec.of(run), index)
    pool = _pool(run, run.rank_of(index), len(data.labels), context)
    name = f"client{index}"
    try:
        counters, _ = join_client(pool, name, address, data.train, data.num_samples, data.labels)
    finally:
        pool.close()
    context.state[STATE] = ConfigRecord({**counters.to_config(), "settings": config["settings"], "client": name})
    return RecordDict({CONFIG: ConfigRecord({"client": name})})


def _train(msg: Message, context: Context) -> RecordDict:
    state = context.state.config_records.get(STATE)
    if state is None:
        raise SettingsError("this node has not joined the federation (no join message reached it)")
    config = msg.content.config_records.get(CONFIG)
    if config is None:
        raise SettingsError("the train message carries no fedsplit config")
    run = FlowerRun.from_config(json.loads(state["settings"]))
    name = state["client"]
    if config.get("client") != name:
        raise SettingsError(f"the train message is for {config.get('client')!r}, this node joined as {name!r}")
    settings = FederationSettings.from_meta(json.loads(config["settings"]), "train config")
    offer = RoundOffer.from_message(from_records(msg.content, "ok"))
    index = _partition(context, run)
    data = shard(ShardSpec.of(run), index)
    pool = _pool(run, run.rank_of(index), len(data.labels), context)
    saved = context.state.array_records.get(TENSORS)
    try:
        upload, record, counters, tensors = round_client(
            pool, name, _address(config), ClientCounters.from_config(state), None if saved is None else
            record_to_state(saved), settings, offer, data.train, data.num_samples)
        sent, received = pool.conn.bytes_sent, pool.conn.bytes_received
    finally:
        pool.close()
    context.state[STATE] = ConfigRecord({**state, **counters.to_config()})
    context.state[TENSORS] = state_to_record(tensors)
    metrics = MetricRecord({"loss": float(record.get("loss", 0.0)), "num-examples": data.num_samples,
                            "bytes-sent": int(sent), "bytes-received": int(received),
                            "peak-memory": int(record.get("peak_rss", 0) or 0)})
    return to_records(upload, RecordDict({METRICS: metrics}))


