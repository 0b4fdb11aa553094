"""The ``fedsplit`` command: server, client and demo.

This module is the composition root: the one module that imports both sides.
Each subcommand imports its side when it runs, so a device that runs
``fedsplit client`` never imports server code, and a server never imports the
client runtime.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import warnings

import torch

from split.lora import LoraSpec
from split.partition import Cut
from split.wire import Limits


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="model folder or hub id (default: the built-in all-MiniLM-L6-v2)")
    p.add_argument("--task", default="classification", choices=["classification", "causal-lm"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-dropout", action="store_true", help="turn the model's dropout off")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--log-level", default="WARNING")


def _lora_spec(args) -> LoraSpec:
    targets = tuple(t for t in args.targets.split(",") if t) if args.targets else None
    return LoraSpec(args.rank, args.alpha, args.lora_dropout, targets)


def _add_lora_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--targets", default=None, help="comma-separated LoRA target modules (default: attention q,v)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--head-lr", type=float, default=None, help="learning rate of the new head (default: --lr)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsplit", description="Split LoRA fine-tuning over ZeroMQ.")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("server", help="host the backbone blocks for clients")
    _add_model_args(s)
    s.add_argument("--cut", default="1,1", help="K1,K2: the server hosts blocks [K1, L-K2) (K2=0: two-part)")
    s.add_argument("--bind", default="tcp://*:5555")
    s.add_argument("--num-labels", type=int, default=2, help="classes of the head (two-part split only)")
    s.add_argument("--session-timeout", type=float, default=120.0,
                   help="seconds of silence after which a client's state is freed")
    s.add_argument("--max-message-mb", type=float, default=1024.0)
    s.add_argument("--server-lora", choices=["per-client", "shared"], default="per-client",
                   help="one server-side LoRA per client (aggregated in rounds) or one shared by all")
    f = s.add_argument_group("federation (rounds of several clients; on when --strategy is given)")
    f.add_argument("--strategy", default=None,
                   help="aggregation method: fedit, flexlora, hetlora, ... (every method: docs/algorithms.md)")
    f.add_argument("--strategy-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the strategy (repeatable), e.g. lam=0.01")
    f.add_argument("--rounds", type=int, default=3)
    f.add_argument("--fraction", type=float, default=1.0, help="share of clients sampled per round")
    f.add_argument("--min-clients", type=int, default=2, help="clients to wait for before round 0")
    f.add_argument("--min-uploads", type=int, default=1)
    f.add_argument("--short-round", choices=["skip", "retry"], default="skip",
                   help="what a round with fewer than --min-uploads uploads does")
    f.add_argument("--deadline", type=float, default=600.0, help="seconds a round waits for uploads")
    f.add_argument("--local-steps", type=int, default=10)
    f.add_argument("--local-epochs", type=float, default=0.0,
                   help="> 0: each client trains this many passes over its own data instead of --local-steps")
    f.add_argument("--client-init", choices=["avg", "re", "local"], default="avg",
                   help="clients start each round from the global LoRA (avg), a fresh one (re) or their own (local)")
    f.add_argument("--init", choices=["kaiming", "gaussian", "svd"], default="kaiming",
                   help="global LoRA before round 0 (svd: FeDeRA, from the pretrained weights)")
    f.add_argument("--reinit-every", type=int, default=0, metavar="TAU",
                   help="FedLoRU: every TAU rounds merge the global LoRA into the base and start afresh")
    f.add_argument("--checkpoint-dir", default=None, help="write round_N/ checkpoints here")
    f.add_argument("--resume", action="store_true", help="continue from the newest round in --checkpoint-dir")

    c = sub.add_parser("client", help="train through a server on local data")
    _add_model_args(c)
    _add_lora_args(c)
    c.add_argument("--server", default="tcp://127.0.0.1:5555")
    c.add_argument("--data", default="builtin", help="JSONL/CSV with text,label (default: built-in task)")
    c.add_argument("--test-data", default=None)
    c.add_argument("--cut", default=None, help="K1,K2 (default: the server's)")
    c.add_argument("--epochs", type=float, default=1.0)
    c.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument("--max-length", type=int, default=64)
    c.add_argument("--out", default="fedsplit-adapter", help="folder for the whole-model PEFT adapter")
    c.add_argument("--id", default="", help="client id (default: random)")
    c.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for any server reply")
    c.add_argument("--connect-timeout", type=float, default=30.0)
    c.add_argument("--no-progress", action="store_true")
    c.add_argument("--summary-json", default=None)
    g = c.add_argument_group("federation (when the server runs rounds)")
    g.add_argument("--num-clients", type=int, default=1, help="clients the training data is split among")
    g.add_argument("--client-index", type=int, default=0, help="this client's share")
    g.add_argument("--partition", choices=["iid", "dirichlet", "shards"], default="iid")
    g.add_argument("--partition-alpha", type=float, default=0.5, help="Dirichlet concentration")
    g.add_argument("--blocks", default=None, help="comma-separated blocks whose LoRA this client trains")
    g.add_argument("--eval-rounds", action="store_true", help="evaluate the global model every round")
    g.add_argument("--personal", action="store_true",
                   help="FedDPA: train a personal adapter beside the global one; report both accuracies "
                        "on a held-out 20%% of this client's data")

    d = sub.add_parser("demo", help="a federated session on this machine: MiniLM on the built-in data")
    d.add_argument("--model", default=None)
    d.add_argument("--clients", type=int, default=4, help="client processes (1: plain split training)")
    d.add_argument("--strategy", default="fedit")
    d.add_argument("--rounds", type=int, default=5)
    d.add_argument("--local-steps", type=int, default=10)
    d.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the label split")
    d.add_argument("--ranks", default=None, help="comma-separated ranks, cycled over the clients")
    d.add_argument("--personal", action="store_true", help="FedDPA personal adapters on every client")
    d.add_argument("--epochs", type=float, default=3.0, help="single-client demo only")
    d.add_argument("--steps", type=int, default=None, help="single-client demo only")
    d.add_argument("--cut", default="1,1")
    d.add_argument("--rank", type=int, default=8)
    d.add_argument("--lr", type=float, default=None, help="LoRA learning rate (default 5e-3; 2e-3 with one client)")
    d.add_argument("--head-lr", type=float, default=None, help="head learning rate (default 2e-2; 5e-3 with one client)")
    d.add_argument("--out", default="fedsplit-demo", help="adapter (one client) or checkpoint folder")
    return parser


def main(argv=None) -> int:
    # peft still calls a transformers property deprecated in v5; nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "WARNING").upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if args.command == "server":
            return _server(args)
        if args.command == "client":
            return _client(args)
        from edge.demo import run_demo

        return run_demo(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, ConnectionError, RuntimeError, FileNotFoundError) as exc:
        print(f"fedsplit {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _set_threads(threads: int | None) -> None:
    """Use ``threads`` intra-op threads (None: torch's default)."""
    if threads:
        torch.set_num_threads(threads)


def _server(args) -> int:
    from server.rounds import FederationConfig
    from server.service import BackboneServer, ServerConfig

    _set_threads(args.threads)
    limit = int(args.max_message_mb * (1 << 20))
    federation = None
    if args.strategy:
        federation = FederationConfig(
            strategy=args.strategy, strategy_options=_options(args.strategy_option), rounds=args.rounds,
            fraction=args.fraction, min_clients=args.min_clients, min_uploads=args.min_uploads,
            short_round=args.short_round, deadline=args.deadline, local_steps=args.local_steps,
            local_epochs=args.local_epochs,
            client_init=args.client_init, init=args.init, reinit_every=args.reinit_every, seed=args.seed)
    config = ServerConfig(model=args.model, cut=Cut.parse(args.cut), bind=args.bind, task=args.task,
                          num_labels=args.num_labels, seed=args.seed, dropout=not args.no_dropout,
                          session_timeout=args.session_timeout,
                          limits=Limits(max_tensor_bytes=limit, max_message_bytes=limit),
                          federation=federation, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                          server_lora=args.server_lora)
    server = BackboneServer(config)
    endpoint = server.bind()
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    print(f"fedsplit server: blocks {server.segment.cut.front}..{server.segment.num_layers - server.segment.cut.back - 1}"
          f" of {server.segment.num_layers} ({server.segment.owned_bytes / 1e6:.1f} MB) listening on {endpoint}",
          flush=True)
    if server.coordinator is None:
        server.serve(should_stop=lambda: bool(stopping))
        return 0
    # A federation ends once its last round closed and every client has left.
    fed = server.coordinator
    server.serve(should_stop=lambda: bool(stopping) or (fed.phase == "done" and not server.sessions.by_client))
    return 0


def _options(pairs: list[str]) -> dict:
    """``["lam=0.01", "weighting=uniform", "resend_frozen=false"]`` ->
    {"lam": 0.01, "weighting": "uniform", "resend_frozen": False}."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--strategy-option expects KEY=VALUE, got {pair!r}")
        if key in out:
            raise ValueError(f"--strategy-option {key} is given twice")
        out[key] = _option_value(value)
    return out


def _option_value(text: str):
    """An option's value: a bool for true/false, else an int, a float or the text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            continue
    return text


def _client(args) -> int:
    from edge.client import ClientConfig
    from edge.train import TrainOptions, run_client, write_summary

    _set_threads(args.threads)
    config = ClientConfig(server=args.server, model=args.model, cut=Cut.parse(args.cut) if args.cut else None,
                          task=args.task, lora=_lora_spec(args), lr=args.lr, head_lr=args.head_lr,
                          seed=args.seed, dropout=not args.no_dropout, client_id=args.id,
                          timeout=args.timeout, connect_timeout=args.connect_timeout)
    if args.task != "classification":
        raise ValueError("`fedsplit client` trains classification on text,label data; "
                         "use the Python API (edge.client.SplitClient) for causal-lm")
    options = TrainOptions(data=args.data, test_data=args.test_data, epochs=args.epochs, max_steps=args.steps,
                           batch_size=args.batch_size, max_length=args.max_length, adapter_out=args.out,
                           progress=not args.no_progress, partition=args.partition,
                           partition_alpha=args.partition_alpha, num_clients=args.num_clients,
                           client_index=args.client_index, eval_rounds=args.eval_rounds, personal=args.personal,
                           blocks=_blocks(args.blocks))
    summary = run_client(config, options)
    write_summary(summary, args.summary_json)
    if "rounds" in summary:
        acc = summary.get("final_accuracy")
        print(f"federation done: {len(summary['rounds'])} rounds, {summary['steps']} steps"
              + (f", final accuracy {acc:.3f}" if acc is not None else ""))
        return 0
    print(f"accuracy {summary.get('accuracy_before', float('nan')):.3f} -> {summary['accuracy_after']:.3f} "
          f"after {summary['steps']} steps; adapter saved to {summary.get('adapter')}")
    return 0


def _blocks(text: str | None) -> list[int] | None:
    """``"0,3,5"`` -> [0, 3, 5]."""
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--blocks expects comma-separated block indices such as 0,3,5, got {text!r}") from None


if __name__ == "__main__":
    sys.exit(main())
