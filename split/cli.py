"""The ``fedsplit`` command: server, client and demo."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import warnings


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="model folder or hub id (default: the built-in all-MiniLM-L6-v2)")
    p.add_argument("--task", default="classification", choices=["classification", "causal-lm"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-dropout", action="store_true", help="turn the model's dropout off")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--log-level", default="WARNING")


def _lora_spec(args):
    from split.lora import LoraSpec

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

    d = sub.add_parser("demo", help="server + client on this machine, MiniLM on the built-in data")
    d.add_argument("--model", default=None)
    d.add_argument("--epochs", type=float, default=3.0)
    d.add_argument("--steps", type=int, default=None)
    d.add_argument("--cut", default="1,1")
    d.add_argument("--rank", type=int, default=8)
    d.add_argument("--lr", type=float, default=2e-3)
    d.add_argument("--head-lr", type=float, default=5e-3)
    d.add_argument("--out", default="fedsplit-demo-adapter")
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


def _server(args) -> int:
    from edge.train import set_threads
    from server.service import BackboneServer, ServerConfig
    from split.partition import Cut
    from split.wire import Limits

    set_threads(args.threads)
    limit = int(args.max_message_mb * (1 << 20))
    config = ServerConfig(model=args.model, cut=Cut.parse(args.cut), bind=args.bind, task=args.task,
                          num_labels=args.num_labels, seed=args.seed, dropout=not args.no_dropout,
                          session_timeout=args.session_timeout,
                          limits=Limits(max_tensor_bytes=limit, max_message_bytes=limit))
    server = BackboneServer(config)
    endpoint = server.bind()
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    print(f"fedsplit server: blocks {server.segment.cut.front}..{server.segment.num_layers - server.segment.cut.back - 1}"
          f" of {server.segment.num_layers} ({server.segment.owned_bytes / 1e6:.1f} MB) listening on {endpoint}",
          flush=True)
    server.serve(should_stop=lambda: bool(stopping))
    return 0


def _client(args) -> int:
    from edge.client import ClientConfig
    from edge.train import TrainOptions, run_client, set_threads, write_summary
    from split.partition import Cut

    set_threads(args.threads)
    config = ClientConfig(server=args.server, model=args.model, cut=Cut.parse(args.cut) if args.cut else None,
                          task=args.task, lora=_lora_spec(args), lr=args.lr, head_lr=args.head_lr,
                          seed=args.seed, dropout=not args.no_dropout, client_id=args.id,
                          timeout=args.timeout, connect_timeout=args.connect_timeout)
    if args.task != "classification":
        raise ValueError("`fedsplit client` trains classification on text,label data; "
                         "use the Python API (edge.client.SplitClient) for causal-lm")
    options = TrainOptions(data=args.data, test_data=args.test_data, epochs=args.epochs, max_steps=args.steps,
                           batch_size=args.batch_size, max_length=args.max_length, adapter_out=args.out,
                           progress=not args.no_progress)
    summary = run_client(config, options)
    write_summary(summary, args.summary_json)
    print(f"accuracy {summary.get('accuracy_before', float('nan')):.3f} -> {summary['accuracy_after']:.3f} "
          f"after {summary['steps']} steps; adapter saved to {summary.get('adapter')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
