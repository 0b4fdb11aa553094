"""``fedsplit plan``: plan each device's cut, rank, trainable blocks and batch
for a model, print the table and write the plan file.

The model is read as its config only (no weights): a local folder, or the
built-in all-MiniLM-L6-v2 by default. The plan is keyed by each profile's
``name``, which a client started with ``--profile`` asks the server for.
"""

from __future__ import annotations

import argparse

from split.argtypes import int_at_least, nonnegative_float, positive_int
from split.devices import DTYPES

HELP = "plan each device's cut, LoRA rank, trainable blocks and batch size from its profile"
EXAMPLE = "fedsplit plan --profiles jetson-nano orin-nano pi5 laptop --seq-len 64 --json plan.json"


def ranks_type(text: str) -> tuple[int, ...]:
    """An argparse type: ``4..64`` (powers of two) or ``4,8,16``."""
    from .planner import rank_ladder

    try:
        return rank_ladder(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def codecs_type(text: str) -> tuple[str, ...]:
    """An argparse type: wire codecs separated by commas (``fp32,fp16,int8``)."""
    from .codec_choice import parse_codec_list

    try:
        return tuple(spec.text for spec in parse_codec_list(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def weights_type(text: str) -> tuple[str, ...]:
    """An argparse type: ``float32,8bit,4bit`` (weight choices, preferred first)."""
    from .planner import weights_list

    try:
        return weights_list(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def margin_type(text: str) -> float:
    """An argparse type: a share of the budget kept free, in [0, 1)."""
    value = nonnegative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``fedsplit plan``."""
    p.add_argument("--model", default=None,
                   help="model folder (its config.json is all that is read; default: the built-in all-MiniLM-L6-v2)")
    p.add_argument("--profiles", nargs="+", required=True, metavar="PROFILE",
                   help="device profiles: built-in names (jetson-nano, orin-nano, agx-orin, pi4, pi5, laptop, "
                        "workstation) or .toml files")
    p.add_argument("--seq-len", type=int_at_least(2), default=64,
                   help="tokens per sample the clients train with (their --max-length)")
    p.add_argument("--ranks", type=ranks_type, default=ranks_type("4..64"), metavar="R_MIN..R_MAX|R,R,...",
                   help="candidate LoRA ranks: 4..64 means the powers of two from 4 to 64 (default: 4..64)")
    p.add_argument("--cut", default="1,1",
                   help="K1,K2: the server's --cut; every client keeps at least these blocks")
    p.add_argument("--margin", type=margin_type, default=0.15,
                   help="share of each device's memory budget the plan leaves free, in [0, 1)")
    p.add_argument("--batch", type=positive_int, default=16,
                   help="nominal batch: every device's, unless its memory needs less or its speed allows more")
    p.add_argument("--max-batch", type=positive_int, default=64, help="largest batch a fast device may get")
    p.add_argument("--min-blocks", type=positive_int, default=1,
                   help="blocks every device trains at least (FedRA capacity floor)")
    p.add_argument("--order", choices=["top", "bottom"], default="top",
                   help="which blocks train first: the highest (cheapest in activation memory) or the lowest")
    p.add_argument("--strategy", default=None,
                   help="the server's --strategy: one that trains one rank (fedit, layermean, ...) gives every "
                        "device the same rank, one without block subsets (fedit, flexlora, ...) every block")
    p.add_argument("--same-rank", action="store_true",
                   help="every device the same rank (what fedit, layermean and the other one-rank methods need)")
    p.add_argument("--all-blocks", action="store_true",
                   help="every device trains every block (methods without block subsets need it)")
    p.add_argument("--offload", action="store_true",
                   help="a device with time and memory to spare takes more blocks off the server (a deeper cut)")
    p.add_argument("--server-seconds", type=nonnegative_float, default=0.0,
                   help="the server's share of a step in seconds, added to every device's predicted step time")
    p.add_argument("--task", default="classification", choices=["classification", "causal-lm"],
                   help="what the clients train (the head and its activations differ)")
    p.add_argument("--num-labels", type=int_at_least(2), default=2, help="classes of the classification head")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="precision of the clients' frozen weights (their --dtype)")
    p.add_argument("--codecs", type=codecs_type, default=("fp32",), metavar="CODEC,CODEC,...",
                   help="wire codecs a device may get, each direction: the most precise one whose predicted step "
                        "time is within 10%% of the fastest (docs/planner.md). Default fp32 alone (lossless)")
    p.add_argument("--weights", type=weights_type, default=("float32",), metavar="W,W,...",
                   help="how the clients' blocks may hold their linear weights, preferred first: float32 "
                        "(unquantized, in --dtype), bfloat16, 8bit, 4bit (bitsandbytes: devices whose profile says "
                        "bitsandbytes = true). A device takes the first choice its memory fits; e.g. "
                        "float32,8bit,4bit (default: float32)")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="write the plan here, for `fedsplit server --plan FILE`")


def run(args, strategy: tuple[bool, bool] | None = None) -> int:
    """Plan, print the table and write ``--json``. ``strategy``: what the
    server's --strategy can aggregate (heterogeneous ranks, block subsets),
    looked up by the caller; None without --strategy."""
    from split.partition import Cut

    from .cost import ModelShape
    from .planfile import PlanFile, write_plan
    from .planner import PlanOptions, plan_with, straggler_ratio
    from .plan_table import render
    from .schema import resolve_profile

    cut = Cut.parse(args.cut)
    same_rank, all_blocks = args.same_rank, args.all_blocks
    if strategy is not None:
        heterogeneous_ranks, block_subsets = strategy
        same_rank, all_blocks = same_rank or not heterogeneous_ranks, all_blocks or not block_subsets
    profiles = [resolve_profile(name) for name in args.profiles]
    path, config, model = _model(args.model, args.num_labels, args.task)
    shape = ModelShape.from_config(config, num_labels=args.num_labels, task=args.task)
    options = PlanOptions(seq_len=args.seq_len, ranks=args.ranks, server_cut=(cut.front, cut.back),
                          margin=args.margin, batch=args.batch, max_batch=args.max_batch, same_rank=same_rank,
                          all_blocks=all_blocks, min_capacity=args.min_blocks, order=args.order,
                          offload=args.offload, server_seconds=args.server_seconds, dtype=args.dtype,
                          codecs=args.codecs, weights=args.weights)
    plans = plan_with(shape, profiles, options)
    plan = PlanFile(model, args.seq_len, (cut.front, cut.back), {p.device: p for p in plans}, args.margin,
                    same_rank)
    render(plan, title=f"fedsplit plan: {model.source or path.name}, {shape.num_layers} blocks, "
                       f"server cut {cut}, sequence {args.seq_len}, margin {args.margin:.0%}")
    print(f"pace {max(p.predicted_step_s for p in plans):.3f} s a step; predicted straggler ratio "
          f"{straggler_ratio(plans):.2f} (slowest over fastest step)")
    if model.fingerprint is None:
        print(f"note: {path} holds no weights: the plan names no checkpoint fingerprint, and a server checks only "
              "the model's type, depth and width against it")
    if args.json:
        print(f"plan written to {write_plan(plan, args.json)} (start the server with --plan {args.json})")
    return 0


def _model(model: str | None, num_labels: int, task: str = "classification"):
    """(folder, config, PlanModel) of ``model``: its config only, and the
    checkpoint fingerprint when the folder holds the weights."""
    from split.fingerprint import checkpoint_fingerprint
    from split.partition import load_config, resolve_model_path

    from .planfile import PlanModel

    path = resolve_model_path(model)
    config = load_config(path, task, num_labels, dropout=True)
    weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    fingerprint = checkpoint_fingerprint(path) if weights else None
    return path, config, PlanModel(config.model_type, config.num_hidden_layers, config.get_text_config().hidden_size,
                                   fingerprint, f"{path.parent.name}/{path.name}")
