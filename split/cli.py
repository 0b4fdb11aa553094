"""The ``fedsplit`` command: server, client, demo, keys, profile, plan, report, export and infer.

This module is the composition root: the one module that imports both sides.
Each subcommand imports its side when it runs, so a device that runs
``fedsplit client`` never imports server code, and a server never imports the
client runtime.
"""

from __future__ import annotations

import argparse
import signal
import sys
from importlib.metadata import version

import torch

from edge import device_demo, emulate_cli, report
from edge import export as export_command
from edge import infer as infer_command
from profiles import cli_profile, plan_command
from split import adapter_options
from split.argtypes import (add_command, codec_spec, dropout_rate, fraction, index_list, int_at_least,
                            nonnegative_float, nonnegative_int, positive_float, positive_int, positive_int_list,
                            trim_share)
from split.devices import DTYPES, resolve_device
from split.console import setup_logging, table_console
from split.lora import LoraSpec
from split.partition import Cut
from split.quant import MODES as QUANTIZE_MODES
from split.summary import round_table
from split.wire import Limits

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
SINGLE_CLIENT_OUT = "fedsplit-adapter"  # where a single (non-federated) client saves without --out


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples in epilogs keep their line breaks; every option's help ends
    with its default, unless the help already says it or there is none to show
    (None, an off switch)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        # Identity, not equality: a default of 0 or 0.0 equals False and is worth showing.
        nothing = default is None or default is False or default is argparse.SUPPRESS or default == []
        if nothing or "%(default)" in text or "(default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _subparser(sub, name: str, help: str, example: str) -> argparse.ArgumentParser:
    return add_command(sub, name, help, example, HelpFormatter)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="model folder or hub id (default: the built-in all-MiniLM-L6-v2)")
    p.add_argument("--task", default="classification", choices=["classification", "causal-lm"],
                   help="classification: text,label data and a new head; causal-lm: next-token "
                        "prediction on text (decoder families; README: supported models)")
    p.add_argument("--device", default="cpu", type=device_name,
                   help="where this side computes: cpu, cuda, cuda:N, mps, or auto (CUDA, else MPS, else CPU)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="precision of the frozen weights (LoRA and a trained head stay float32)")
    p.add_argument("--quantize", default="none", choices=QUANTIZE_MODES,
                   help="hold the frozen linear weights of this side's blocks in 8 bits (LLM.int8) or 4 bits (NF4) "
                        "with bitsandbytes; embeddings, norms, the head and LoRA stay in --dtype or float32 "
                        "(README: quantized frozen weights)")
    p.add_argument("--seed", type=nonnegative_int, default=0,
                   help="seed of LoRA initialisation, the new head, data order and every random draw")
    p.add_argument("--no-dropout", action="store_true", help="turn the model's dropout off")
    p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                   help="level of fedsplit's own log lines (libraries log warnings and worse only)")


def device_name(text: str) -> str:
    """An argparse type: a device this machine has (resolved again where it is used)."""
    try:
        resolve_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--device {text!r}: ").removeprefix(
            f"--device {text}: ")) from None
    return text


def _add_codec_args(p) -> None:
    p.add_argument("--codec-up", type=codec_spec, default="fp32", metavar="SPEC",
                   help="codec of the hidden states and gradients the client sends: fp32 (lossless), fp16, bf16, "
                        "int8[:outliers=N], nf4[:block=B], topk:density=D (docs/compression.md)")
    p.add_argument("--codec-down", type=codec_spec, default="fp32", metavar="SPEC",
                   help="codec the server answers the client in (same choices as --codec-up)")


def _lora_spec(args) -> LoraSpec:
    targets = tuple(t for t in args.targets.split(",") if t) if args.targets else None
    return LoraSpec(args.rank, args.alpha, args.lora_dropout, targets)


def _add_lora_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rank", type=positive_int, default=8, help="LoRA rank r")
    p.add_argument("--alpha", type=positive_float, default=16.0, help="LoRA scaling alpha (the update is alpha/r * BA)")
    p.add_argument("--lora-dropout", type=dropout_rate, default=0.0, help="dropout on the LoRA input, in [0, 1)")
    p.add_argument("--targets", default=None, help="comma-separated LoRA target modules (default: attention q,v)")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="learning rate of the LoRA factors (AdamW)")
    p.add_argument("--head-lr", type=positive_float, default=None,
                   help="learning rate of the new head (default: --lr)")


SERVER_EXAMPLE = ("fedsplit server --cut 1,1 --bind tcp://*:5555 --secret-key keys/server.key_secret "
                  "--allow keys/clients --strategy fedit --rounds 10 --min-clients 4")
CLIENT_EXAMPLE = ("fedsplit client --server tcp://SERVER_HOST:5555 --key keys/client1.key_secret "
                  "--server-key keys/server.key --data train.jsonl --test-data test.jsonl --epochs 3 --out my-adapter")
DEMO_EXAMPLE = ("fedsplit demo --clients 4 --strategy flexlora --ranks 4,8,16 --rounds 5\n"
                "  fedsplit demo --devices laptop,orin-nano,pi5,jetson-nano")
KEYS_EXAMPLE = "fedsplit keys keys --name client1"


def build_parser() -> argparse.ArgumentParser:
    """The ``fedsplit`` argument parser: server, client, demo, keys, profile and plan subcommands."""
    parser = argparse.ArgumentParser(prog="fedsplit", description="Split LoRA fine-tuning over ZeroMQ.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('fedsplit')}",
                        help="print the fedsplit version and exit")
    sub = parser.add_subparsers(dest="command", required=True, help="what to run")

    s = _subparser(sub, "server", "host the backbone blocks for clients", SERVER_EXAMPLE)
    _add_model_args(s)
    s.add_argument("--cut", default="1,1", help="K1,K2: the server hosts blocks [K1, L-K2) (K2=0: two-part)")
    s.add_argument("--bind", default="tcp://127.0.0.1:5555",
                   help="ZeroMQ endpoint to listen on; one other machines can reach (tcp://*:5555) needs "
                        "--secret-key and --allow")
    s.add_argument("--secret-key", default=None, metavar="FILE",
                   help="this server's NAME.key_secret (from `fedsplit keys`): CurveZMQ encryption and client "
                        "authentication on; needs --allow. Without it: plain mode, loopback --bind only")
    s.add_argument("--allow", default=None, metavar="DIR",
                   help="folder of the client public keys (NAME.key) this server admits; read at start")
    # One class has nothing to learn, and clients refuse data with fewer than two labels.
    s.add_argument("--num-labels", type=int_at_least(2), default=2,
                   help="classes of the head (two-part split only; at least 2)")
    s.add_argument("--session-timeout", type=positive_float, default=120.0,
                   help="seconds of silence after which a client's state is freed")
    s.add_argument("--pending-timeout", type=positive_float, default=60.0,
                   help="seconds a forward waits for its backward before its graph is dropped (a forward never "
                        "backwarded would otherwise hold back a shared server-side LoRA)")
    s.add_argument("--max-message-mb", type=positive_float, default=1024.0,
                   help="largest message (and tensor) accepted, in MiB")
    s.add_argument("--server-lora", choices=["per-client", "shared"], default="per-client",
                   help="one server-side LoRA per client (aggregated in rounds) or one shared by all")
    s.add_argument("--plan", default=None, metavar="FILE",
                   help="plan file (`fedsplit plan --json`), checked at start: clients started with --profile "
                        "get their cut, rank, batch, length and blocks from it")
    lim = s.add_argument_group("limits (what clients may ask of the server; beyond them a request is refused)")
    lim.add_argument("--max-rank", type=positive_int, default=256,
                     help="largest LoRA rank a client may ask for (and at most each module's smaller dimension)")
    lim.add_argument("--max-tokens", type=positive_int, default=16384,
                     help="largest batch x sequence of one forward (a sequence is also at most the model's positions)")
    lim.add_argument("--max-sessions", type=positive_int, default=64, help="clients served at once")
    lim.add_argument("--max-pending", type=positive_int, default=8,
                     help="forwards one client may leave waiting for their backward")
    lim.add_argument("--max-pending-mb", type=positive_float, default=2048.0,
                     help="memory all waiting forwards may hold together, in MiB (each graph's saved tensors)")
    lim.add_argument("--max-queued", type=positive_int, default=8,
                     help="requests one connection may have waiting for their turn at the model")
    lim.add_argument("--max-header-kb", type=positive_float, default=1024.0,
                     help="largest message header (op, metadata, tensor list), in KiB")
    lim.add_argument("--recv-hwm", type=positive_int, default=8,
                     help="messages ZeroMQ buffers per connection before the server reads them")
    f = s.add_argument_group("federation (rounds of several clients; on when --strategy is given)")
    f.add_argument("--strategy", default=None,
                   help="aggregation method: fedit, flexlora, hetlora, ... (every method: docs/algorithms.md)")
    f.add_argument("--strategy-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the strategy (repeatable), e.g. lam=0.01")
    f.add_argument("--rounds", type=positive_int, default=3, help="rounds of the federation")
    f.add_argument("--fraction", type=fraction, default=1.0, help="share of clients sampled per round, in (0, 1]")
    f.add_argument("--min-clients", type=positive_int, default=2, help="clients to wait for before round 0")
    f.add_argument("--min-uploads", type=positive_int, default=1,
                   help="uploads a round needs to be aggregated (see --short-round)")
    f.add_argument("--short-round", choices=["skip", "retry"], default="skip",
                   help="what a round with fewer than --min-uploads uploads does")
    f.add_argument("--deadline", type=positive_float, default=600.0, help="seconds a round waits for uploads")
    f.add_argument("--local-steps", type=positive_int, default=10, help="training steps per client per round")
    f.add_argument("--local-epochs", type=nonnegative_float, default=0.0,
                   help="> 0: each client trains this many passes over its own data instead of --local-steps")
    f.add_argument("--client-init", choices=["avg", "re", "local"], default="avg",
                   help="clients start each round from the global LoRA (avg), a fresh one (re) or their own (local)")
    f.add_argument("--init", choices=["kaiming", "gaussian", "svd"], default="kaiming",
                   help="global LoRA before round 0 (svd: FeDeRA, from the pretrained weights)")
    f.add_argument("--reinit-every", type=nonnegative_int, default=0, metavar="TAU",
                   help="FedLoRU: every TAU rounds merge the global LoRA into the base and start afresh (0: never)")
    f.add_argument("--max-samples", type=positive_int, default=1_000_000,
                   help="most training samples a client may declare at join (its aggregation weight); an upload "
                        "may claim at most what its client declared")
    f.add_argument("--max-upload-value", type=positive_float, default=1e3,
                   help="uploads holding a value of larger magnitude are refused, as are NaN and infinity")
    f.add_argument("--allocation", choices=["fixed", "fedra", "fedpilot", "fisher"], default="fixed",
                   help="which blocks each client trains every round: fixed (its --blocks), fedra (random, "
                        "its --capacity), fedpilot or fisher (a knapsack over its --train-memory-mb); all but "
                        "fixed need --strategy layermean (docs/algorithms.md#allocation)")
    f.add_argument("--cover-all", action="store_true",
                   help="--allocation fedra: the round's clients together train every block when their "
                        "capacities allow")
    adapter_options.add_arguments(f)
    r = s.add_argument_group("robust aggregation (any --strategy; docs/algorithms.md#robust)")
    r.add_argument("--clip-norm", type=positive_float, default=None,
                   help="scale each client's update (upload minus download) down to at most this L2 norm")
    r.add_argument("--clip-median", type=positive_float, default=None, metavar="MULTIPLE",
                   help="scale each client's update down to at most MULTIPLE x the round's median update norm")
    r.add_argument("--robust", choices=["none", "trimmed-mean", "median"], default="none",
                   help="coordinate-wise statistic the uploads are reduced to before the strategy aggregates")
    r.add_argument("--trim", type=trim_share, default=None,
                   help="--robust trimmed-mean: share of values trimmed at each end of every coordinate, in "
                        "(0, 0.5) (default: 0.1)")
    k = s.add_argument_group("checkpoints and restarts")
    k.add_argument("--checkpoint-dir", default=None,
                   help="write round_N/ checkpoints here (with each client's server-side adapter); without "
                        "--strategy, each client's server-side adapter every --save-every steps")
    k.add_argument("--save-every", type=nonnegative_int, default=20, metavar="N",
                   help="plain split training with --checkpoint-dir: save a client's server-side adapter every N "
                        "of its steps (0: never)")
    k.add_argument("--resume", action="store_true",
                   help="continue from --checkpoint-dir: a federation from its newest round; clients that "
                        "register again get their saved server-side adapters back")
    k.add_argument("--run-dir", default=None, metavar="DIR",
                   help="write every client's round records (clients.jsonl) and every round (rounds.jsonl) "
                        "here, for `fedsplit report DIR`; a federation only")
    s.add_argument("--adapter", default=None, metavar="DIR",
                   help="serve this saved adapter's server-side LoRA to every client (split inference with "
                        "`fedsplit export`/`infer`; docs/onnx.md)")

    c = _subparser(sub, "client", "train through a server on local data", CLIENT_EXAMPLE)
    _add_model_args(c)
    _add_lora_args(c)
    c.add_argument("--tokenizer", default=None,
                   help="tokenizer folder or hub id (default: the --model folder, which must then hold "
                        "tokenizer files)")
    c.add_argument("--server", default="tcp://127.0.0.1:5555",
                   help="the server's ZeroMQ endpoint; one on another machine needs --key and --server-key")
    c.add_argument("--key", default=None, metavar="FILE",
                   help="this client's NAME.key_secret (from `fedsplit keys`): CurveZMQ on; needs --server-key. "
                        "Without it: plain mode, loopback --server only")
    c.add_argument("--server-key", default=None, metavar="FILE",
                   help="the server's public NAME.key, copied from the server machine")
    c.add_argument("--data", default=None,
                   help="JSONL/CSV file: text,label for classification, text for causal-lm "
                        "(default: the built-in classification task)")
    c.add_argument("--test-data", default=None,
                   help="JSONL/CSV test file (default: a stratified 20%% of --data is held out)")
    c.add_argument("--cut", default=None, help="K1,K2 (default: the server's)")
    _add_codec_args(c)
    c.add_argument("--epochs", type=positive_float, default=1.0,
                   help="passes over the training data (single client; see --steps)")
    c.add_argument("--steps", type=positive_int, default=None, help="stop after this many steps (overrides --epochs)")
    c.add_argument("--batch-size", type=positive_int, default=16, help="training samples per step")
    # Two tokens at least: a causal LM needs one to predict from and one to predict,
    # a classifier's tokenizer adds its own special tokens.
    c.add_argument("--max-length", type=int_at_least(2), default=64,
                   help="tokens per sample; longer texts are truncated (at most the model's positions)")
    c.add_argument("--out", default=None,
                   help=f"folder for the whole-model PEFT adapter (default: {SINGLE_CLIENT_OUT} for a single "
                        "client; a federated client saves only when --out is given, see README)")
    c.add_argument("--id", default="", help="client id (default: random)")
    c.add_argument("--timeout", type=positive_float, default=120.0, help="seconds to wait for any server reply")
    c.add_argument("--connect-timeout", type=positive_float, default=30.0,
                   help="seconds to wait for the server's first reply")
    c.add_argument("--reconnect-for", type=nonnegative_float, default=300.0, metavar="SECONDS",
                   help="how long a request the server did not answer is resent, with backoff (a server "
                        "restart); the client then registers again by itself (0: fail at once)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.add_argument("--summary-json", default=None, help="write the run's summary (metrics, bytes) to this file")
    c.add_argument("--profile", default=None, metavar="NAME",
                   help="this device's profile (a built-in name such as pi5, or a .toml file): take the cut, rank, "
                        "batch size, max length, dtype and blocks from the server's --plan entry for it")
    c.set_defaults(client_parser=c)  # to tell options given from defaults (edge.planned)
    c.add_argument("--emulate", default=None, metavar="PROFILE",
                   help="run as a device would: a built-in profile (pi5, jetson-nano, ...) or a .toml file; "
                        "compute slowed to its speed, its link's bandwidth and RTT on every message, its memory "
                        "budget enforced (the summary gains the emulated times)")
    emulate_cli.add_arguments(c)
    c.add_argument("--run-dir", default=None, metavar="DIR",
                   help="write every training step (steps.jsonl) and round record (clients.jsonl) here, for "
                        "`fedsplit report DIR`")
    g = c.add_argument_group("federation (when the server runs rounds)")
    g.add_argument("--num-clients", type=positive_int, default=1, help="clients the training data is split among")
    g.add_argument("--client-index", type=nonnegative_int, default=0,
                   help="this client's share, in [0, --num-clients)")
    g.add_argument("--partition", choices=["iid", "dirichlet", "shards"], default="iid",
                   help="how the training data is split among the clients")
    g.add_argument("--partition-alpha", type=positive_float, default=0.5, help="Dirichlet concentration")
    g.add_argument("--blocks", type=index_list, default=None,
                   help="comma-separated blocks whose LoRA this client trains (default: all)")
    g.add_argument("--capacity", type=positive_int, default=None,
                   help="blocks this client can train per round, for a server that allocates them (--allocation)")
    g.add_argument("--train-memory-mb", type=positive_float, default=None,
                   help="memory this client affords for trainable blocks, in MiB, for a server that allocates "
                        "them (each block's cost comes from the cost model at this --batch-size and --max-length)")
    g.add_argument("--eval-rounds", action="store_true", help="evaluate the global model every round")
    g.add_argument("--personal", action="store_true",
                   help="FedDPA: train a personal adapter beside the global one; report both accuracies "
                        "on a held-out 20%% of this client's data")

    d = _subparser(sub, "demo", "a federated session on this machine: MiniLM on the built-in data", DEMO_EXAMPLE)
    d.add_argument("--model", default=None, help="model folder or hub id (default: the built-in all-MiniLM-L6-v2)")
    d.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id (default: the --model folder)")
    d.add_argument("--clients", type=positive_int, default=4, help="client processes (1: plain split training)")
    d.add_argument("--strategy", default=None,
                   help="aggregation method (docs/algorithms.md) (default: fedit; layermean with --devices)")
    d.add_argument("--rounds", type=positive_int, default=None,
                   help="rounds of the federation (default: 5; 3 with --devices)")
    d.add_argument("--local-steps", type=positive_int, default=None,
                   help="training steps per client per round (default: 10; 5 with --devices)")
    d.add_argument("--alpha", type=positive_float, default=0.5, help="Dirichlet concentration of the label split")
    d.add_argument("--ranks", type=positive_int_list, default=None,
                   help="comma-separated ranks, cycled over the clients (default: --rank)")
    d.add_argument("--personal", action="store_true", help="FedDPA personal adapters on every client")
    d.add_argument("--epochs", type=positive_float, default=3.0, help="single-client demo only")
    d.add_argument("--steps", type=positive_int, default=None, help="single-client demo only")
    d.add_argument("--cut", default="1,1", help="K1,K2: the server hosts blocks [K1, L-K2)")
    d.add_argument("--rank", type=positive_int, default=8, help="LoRA rank of every client")
    _add_codec_args(d)
    d.add_argument("--lr", type=positive_float, default=None,
                   help="LoRA learning rate (default 5e-3; 2e-3 with one client)")
    d.add_argument("--head-lr", type=positive_float, default=None,
                   help="head learning rate (default 2e-2; 5e-3 with one client)")
    d.add_argument("--quantize", default="none", choices=QUANTIZE_MODES,
                   help="every client holds its blocks' frozen linear weights in 8 or 4 bits (bitsandbytes)")
    d.add_argument("--out", default="fedsplit-demo",
                   help="adapter (one client) or checkpoint folder; with --devices, the run's folder goes in it")
    device_demo.add_arguments(d)
    d.set_defaults(demo_parser=d)  # the device demo refuses options it does not use (edge.device_demo)

    k = _subparser(sub, "keys", "create a CurveZMQ key pair for a server or a client", KEYS_EXAMPLE)
    k.add_argument("folder", metavar="DIR", help="folder to write NAME.key and NAME.key_secret into (made if missing)")
    k.add_argument("--name", default="server",
                   help="file name of the pair, e.g. server, client1 (one pair per machine)")
    cli_profile.add_parser(sub, HelpFormatter)
    plan_command.add_arguments(_subparser(sub, "plan", plan_command.HELP, plan_command.EXAMPLE))
    report.add_parser(sub)
    export_command.add_parser(sub, HelpFormatter)
    infer_command.add_parser(sub, HelpFormatter)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "log_level", "INFO"))
    try:
        if args.command == "server":
            return _server(args)
        if args.command == "client":
            return _client(args, sys.argv[1:] if argv is None else list(argv))
        if args.command == "keys":
            return _keys(args)
        if args.command == "profile":
            return cli_profile.run(args)
        if args.command == "plan":
            return _plan(args)
        if args.command == "report":
            return report.run(args)
        if args.command == "export":
            return export_command.run(args)
        if args.command == "infer":
            return infer_command.run(args)
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
    from server.strategies.robust import RobustConfig

    _set_threads(args.threads)
    limit = int(args.max_message_mb * (1 << 20))
    federation = None
    robust = {"--clip-norm": args.clip_norm, "--clip-median": args.clip_median, "--trim": args.trim,
              "--robust": None if args.robust == "none" else args.robust}
    if not args.strategy and (args.allocation != "fixed" or args.cover_all):
        raise ValueError("--allocation and --cover-all set which blocks each round trains; this server runs no "
                         "federation: add --strategy layermean")
    if not args.strategy and any(v is not None for v in robust.values()):
        given = ", ".join(k for k, v in robust.items() if v is not None)
        raise ValueError(f"{given} set(s) how rounds aggregate; this server runs no federation: add --strategy")
    if args.strategy:
        federation = FederationConfig(
            strategy=args.strategy, strategy_options=_options(args.strategy_option), rounds=args.rounds,
            fraction=args.fraction, min_clients=args.min_clients, min_uploads=args.min_uploads,
            short_round=args.short_round, deadline=args.deadline, local_steps=args.local_steps,
            local_epochs=args.local_epochs,
            client_init=args.client_init, init=args.init, reinit_every=args.reinit_every, seed=args.seed,
            max_samples=args.max_samples, max_upload_value=args.max_upload_value,
            robust=RobustConfig(args.clip_norm, args.clip_median, args.robust, args.trim),
            allocation=args.allocation, cover_all=args.cover_all, **adapter_options.config(args))
    config = ServerConfig(model=args.model, cut=Cut.parse(args.cut), bind=args.bind, task=args.task,
                          num_labels=args.num_labels, seed=args.seed, dropout=not args.no_dropout,
                          session_timeout=args.session_timeout, pending_timeout=args.pending_timeout,
                          limits=Limits(max_tensor_bytes=limit, max_message_bytes=limit,
                                        max_header_bytes=int(args.max_header_kb * (1 << 10))),
                          federation=federation, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                          save_every=args.save_every,
                          server_lora=args.server_lora, device=args.device, dtype=args.dtype, quantize=args.quantize,
                          secret_key=args.secret_key, allow=args.allow,
                          max_rank=args.max_rank, max_tokens=args.max_tokens, max_sessions=args.max_sessions,
                          max_pending=args.max_pending, max_pending_mb=args.max_pending_mb,
                          max_queued=args.max_queued, recv_hwm=args.recv_hwm, plan=args.plan, run_dir=args.run_dir,
                          adapter=args.adapter)
    server = BackboneServer(config)
    endpoint = server.bind()
    try:
        stopping = []
        signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
        wire = (f"CurveZMQ, {len(server.keys.allowed)} client keys" if server.keys is not None
                else "plain, loopback only")
        print(f"fedsplit server: blocks {server.segment.cut.front}.."
              f"{server.segment.num_layers - server.segment.cut.back - 1} of {server.segment.num_layers} "
              f"({server.segment.owned_bytes / 1e6:.1f} MB, {_precision(args)} on {server.device}) listening on "
              f"{endpoint} ({wire})", flush=True)
        if server.plan is not None:
            print(f"fedsplit server: plan {args.plan} for {', '.join(map(repr, server.plan.clients))}", flush=True)
        if server.served is not None:
            print(f"fedsplit server: serving the adapter {server.served.describe()}", flush=True)
        if server.coordinator is None:
            server.serve(should_stop=lambda: bool(stopping))
            return 0
        # A federation ends once its last round closed and every client has left.
        fed = server.coordinator
        server.serve(should_stop=lambda: bool(stopping) or (fed.phase == "done" and not server.sessions.count()))
        table = server.runlog.table()
        if table is not None:
            table_console().print(table)
        return 0
    finally:
        server.close()


def _precision(args) -> str:
    """How a side holds its frozen weights, in words."""
    if args.quantize == "none":
        return args.dtype
    return f"{args.dtype}, blocks' linear weights {args.quantize}"


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


def _client(args, argv: list[str]) -> int:
    from edge.client import ClientConfig
    from edge.train import TrainOptions, run_client, write_summary

    emulation = emulate_cli.emulation(args)  # checked before any work
    _set_threads(args.threads)
    profile, budget = "", None
    if args.profile:
        from edge.allocation import planned_budget
        from edge.planned import apply_profile

        plan = apply_profile(args, argv[argv.index("client") + 1:])
        planned_budget(args, plan)
        profile, budget = plan.device, plan.budget_bytes
    config = ClientConfig(server=args.server, model=args.model, cut=Cut.parse(args.cut) if args.cut else None,
                          task=args.task, lora=_lora_spec(args), lr=args.lr, head_lr=args.head_lr,
                          seed=args.seed, dropout=not args.no_dropout, client_id=args.id,
                          timeout=args.timeout, connect_timeout=args.connect_timeout,
                          reconnect_for=args.reconnect_for,
                          device=args.device, dtype=args.dtype, quantize=args.quantize, key=args.key,
                          server_key=args.server_key, codec_up=args.codec_up, codec_down=args.codec_down)
    options = TrainOptions(data=args.data, test_data=args.test_data, epochs=args.epochs, max_steps=args.steps,
                           batch_size=args.batch_size, max_length=args.max_length, adapter_out=args.out,
                           single_client_out=SINGLE_CLIENT_OUT, tokenizer=args.tokenizer,
                           progress=not args.no_progress, partition=args.partition,
                           partition_alpha=args.partition_alpha, num_clients=args.num_clients,
                           client_index=args.client_index, eval_rounds=args.eval_rounds, personal=args.personal,
                           blocks=args.blocks, profile=profile, capacity=args.capacity,
                           train_memory_mb=args.train_memory_mb, planned=bool(args.profile), run_dir=args.run_dir,
                           budget_bytes=budget)
    emulator = None
    if emulation is not None:
        from edge.emulate import emulated_device

        emulator = emulated_device(**emulation)
        options.budget_bytes = emulator.budget_bytes  # the budget the emulation enforces
        print(f"fedsplit client: {emulator.describe()}", file=sys.stderr, flush=True)
    summary = run_client(config, options, emulator)
    if emulator is not None:
        summary["emulation"] = emulator.summary()
    write_summary(summary, args.summary_json)
    if summary.get("round_records"):
        table_console().print(round_table(summary["round_records"], "fedsplit client: per round"))
    print(_client_report(summary))
    if emulator is not None:
        print(emulator.report())
    return 0


def _plan(args) -> int:
    strategy = None
    if args.strategy:
        from server.strategies import get_strategy

        method = get_strategy(args.strategy)
        strategy = (method.heterogeneous_ranks, method.block_subsets)
    return plan_command.run(args, strategy)


def _keys(args) -> int:
    from split.keys import create_keys

    public, secret = create_keys(args.folder, args.name)
    print(f"wrote {public} (public: may be copied anywhere)\n"
          f"  and {secret} (secret: stays on this machine, readable by its owner only)\n"
          f"if {args.name} is the server: start it with --secret-key {secret} --allow CLIENT_KEYS_DIR, and give "
          f"each client {public.name} for its --server-key\n"
          f"if {args.name} is a client: copy {public.name} into the server's --allow folder (then restart the "
          f"server), and start the client with --key {secret} --server-key SERVER.key")
    return 0


def _client_report(summary: dict) -> str:
    """The client's closing line."""
    saved = f"; adapter saved to {summary['adapter']}" if "adapter" in summary else ""
    if "personal_adapter" in summary:
        saved += f", personal adapter to {summary['personal_adapter']}"
    if "rounds" in summary:
        acc = summary.get("final_accuracy")
        return (f"federation done: {len(summary['rounds'])} rounds, {summary['steps']} steps"
                + (f", final accuracy {acc:.3f}" if acc is not None else "") + saved)
    if "perplexity_after" in summary:
        return (f"held-out loss {summary.get('loss_before', float('nan')):.3f} -> {summary['loss_after']:.3f}, "
                f"perplexity {summary.get('perplexity_before', float('nan')):.1f} -> "
                f"{summary['perplexity_after']:.1f} after {summary['steps']} steps{saved}")
    return (f"accuracy {summary.get('accuracy_before', float('nan')):.3f} -> {summary['accuracy_after']:.3f} "
            f"after {summary['steps']} steps{saved}")


if __name__ == "__main__":
    sys.exit(main())
