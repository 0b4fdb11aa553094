"""``fedsplit export``: a client's front and back segments as ONNX files.

The client segment is built as a client builds it (only the tensors it owns
are read), the saved adapter's client-side LoRA is attached and merged into
the frozen weights, its trained head loaded, and each segment exported with
torch's dynamo-based exporter with dynamic batch and sequence axes. The
manifest (``split.onnx_manifest``) records the checkpoint's fingerprint, the
cut, the LoRA spec and a digest of the server blocks' LoRA, which ``fedsplit
infer`` checks against the server before it sends anything.

Every tensor the client side needs must be in the adapter folder, and every
tensor in it must belong somewhere: a missing, misshapen or stray tensor is an
error, never a default.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from split.adapter_folder import AdapterError, AdapterFolder, read_adapter, server_part, tensors_digest
from split.families import block_of
from split.lora import PEFT_PREFIX, attach_lora, fold_into, lora_layers, set_factors
from split.onnx_manifest import TOKENIZER, Manifest, SegmentFile
from split.partition import CLIENT, Cut, Segment, build_segment, load_config, resolve_model_path
from split.protocol import ModelInfo

from .onnx_segments import BackSegment, FrontSegment, back_segment, front_segment, sample_inputs
from .tokenizer import load_tokenizer, vocabulary_files

log = logging.getLogger(__name__)

FRONT, BACK = "front.onnx", "back.onnx"
SAMPLE_BATCH, SAMPLE_LENGTH = 2, 8  # the inputs the graphs are traced with (any size runs afterwards)


@dataclass
class Exported:
    """An export: its manifest and the torch modules the ONNX files were made from."""

    manifest: Manifest
    front: FrontSegment
    back: BackSegment
    folder: Path
    seconds: float


def merged_client(model: str | Path | None, adapter: AdapterFolder, cut: Cut, num_labels: int,
                  attn_implementation: str = "eager") -> Segment:
    """The client segment of ``model`` for ``cut`` with ``adapter``'s head
    loaded and its client-side LoRA (and frozen-weight changes) merged in;
    ``segment.model`` is a plain transformers model afterwards. Eager
    attention: the ONNX graph then holds plain matrix products and a softmax."""
    seg = build_segment(model, CLIENT, cut, task=adapter.task, num_labels=num_labels, dropout=False,
                        attn_implementation=attn_implementation)
    fam, hosted = seg.family, set(cut.server_blocks(seg.num_layers))
    _load_heads(seg, adapter)
    for module, delta in adapter.base_delta.items():
        if block_of(module) not in hosted:  # the server folds its own blocks' changes
            fold_into(seg.model.get_submodule(module).weight, delta, fam.conv1d)
    peft = attach_lora(seg.model, adapter.spec, fam, adapter.task, seed=0,
                       blocks=None if adapter.blocks is None else list(adapter.blocks))
    wanted = set(lora_layers(peft))
    factors = adapter.lora_factors()
    missing = sorted(wanted - set(factors))
    if missing:
        raise AdapterError(f"{adapter.path}: no LoRA tensors for the client's modules {', '.join(missing[:4])}"
                           f"{' ...' if len(missing) > 4 else ''}; it is not an adapter for this model and cut "
                           f"(--cut {cut})")
    stray = sorted(m for m in factors if m not in wanted and block_of(m) not in hosted)
    if stray:
        raise AdapterError(f"{adapter.path}: LoRA tensors for {', '.join(stray[:4])}, which the client segment "
                           f"of cut {cut} does not have with targets {list(adapter.spec.target_modules(fam))}")
    try:
        set_factors(peft, {m: factors[m]["A"] for m in wanted}, {m: factors[m]["B"] for m in wanted})
    except ValueError as exc:
        raise AdapterError(f"{adapter.path}: {exc}; it is not an adapter for this model") from None
    seg.model = peft.merge_and_unload()
    return seg


def _load_heads(seg: Segment, adapter: AdapterFolder) -> None:
    """Put the adapter's trained head into the segment, refusing a missing,
    misshapen or unknown head tensor."""
    heads = tuple(seg.family.trained_heads(seg.task))
    given = adapter.head_tensors()
    params = dict(seg.model.named_parameters())
    wanted = {n for n in params if any(n.startswith(h + ".") for h in heads)}
    missing = sorted(wanted - set(given))
    if missing:
        raise AdapterError(f"{adapter.path}: no tensor for the trained head's {', '.join(missing)}; a fedsplit "
                           f"adapter for {seg.task} keeps its head ({', '.join(heads)})")
    stray = sorted(set(given) - wanted)
    if stray:
        raise AdapterError(f"{adapter.path}: tensors {', '.join(PEFT_PREFIX + s for s in stray[:4])} are neither "
                           "LoRA factors nor the model's head")
    with torch.no_grad():
        for name in wanted:
            if tuple(given[name].shape) != tuple(params[name].shape):
                raise AdapterError(f"{adapter.path}: head tensor {name} has shape {tuple(given[name].shape)}, the "
                                   f"model with {seg.config.num_labels} labels has {tuple(params[name].shape)}")
            params[name].copy_(given[name])


def _dims(names: tuple[str, ...], max_positions: int | None) -> dict[str, dict[int, object]]:
    """Dynamic batch and sequence axes for every input (the hidden state's width stays fixed)."""
    batch = torch.export.Dim("batch", max=1 << 20)
    sequence = torch.export.Dim("sequence", max=max_positions or (1 << 20))
    return {name: {0: batch, 1: sequence} for name in names}


def export_segment(module: FrontSegment | BackSegment, inputs: tuple[torch.Tensor, ...], output: str, path: Path,
                   max_positions: int | None, optimize: bool = True) -> SegmentFile:
    """Export one segment to ``path`` (weights beside it when over 2 GB)."""
    names = module.input_names()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter; errors still raise
        program = torch.onnx.export(module, inputs, None, input_names=list(names), output_names=[output],
                                    dynamic_shapes=_dims(names, max_positions), dynamo=True, optimize=optimize,
                                    verbose=False)
    program.save(str(path))
    graph_inputs = tuple(i.name for i in program.model.graph.inputs)
    return SegmentFile(path.name, graph_inputs, (output,))


def _check_exporter() -> None:
    """torch's ONNX exporter needs onnx and onnxscript; say how to get them before any work."""
    import importlib.util

    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise RuntimeError(f"fedsplit export needs {' and '.join(missing)} (torch's ONNX exporter): "
                           "pip install 'fedsplit[onnx]'")


def _opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _tokenizer(source: str | None, adapter: AdapterFolder, model_path: Path, vocab_size: int):
    """The tokenizer the export ships: --tokenizer, else the adapter folder's, else the model folder's."""
    if source is not None:
        return load_tokenizer(source, vocab_size)
    for folder in (adapter.path, model_path):
        if vocabulary_files(folder):
            return load_tokenizer(folder, vocab_size)
    raise AdapterError(f"neither {adapter.path} nor {model_path} holds a tokenizer: pass --tokenizer "
                       "PATH_OR_HUB_ID (infer tokenizes with the one the export ships)")


def export_client(model: str | None, adapter_dir: str | Path, out: str | Path, cut: Cut | None = None,
                  num_labels: int | None = None, tokenizer: str | None = None, optimize: bool = True) -> Exported:
    """Export the client segments of ``model`` with the adapter in
    ``adapter_dir`` into ``out`` (front.onnx, back.onnx, manifest.json,
    tokenizer/)."""
    started = time.perf_counter()
    _check_exporter()
    adapter = read_adapter(adapter_dir)
    if adapter.task != "classification":
        raise AdapterError(f"{adapter.path} is a {adapter.task} adapter; fedsplit export handles classification")
    if adapter.labels is not None and num_labels is not None and num_labels != len(adapter.labels):
        raise AdapterError(f"--num-labels {num_labels}, but {adapter.path} names {len(adapter.labels)} labels")
    num_labels = len(adapter.labels) if adapter.labels is not None else num_labels
    if num_labels is None:
        raise AdapterError(f"{adapter.path} has no config.json naming its labels: pass --num-labels N, the "
                           "classes of its head")
    path = resolve_model_path(model)
    config = load_config(path, adapter.task, num_labels, dropout=False)
    info = ModelInfo.of(path, config)
    if adapter.model is not None and adapter.model.fingerprint != info.fingerprint:
        raise AdapterError(f"{adapter.path} was trained on checkpoint {adapter.model.source} (fingerprint "
                           f"{adapter.model.fingerprint[:12]}), --model is {info.source} (fingerprint "
                           f"{info.fingerprint[:12]}): give the checkpoint it was trained on")
    cut = adapter.cut(cut)
    cut.check(config.num_hidden_layers)
    if cut.two_part:
        raise AdapterError(f"cut {cut}: in a two-part split the server holds the head; export needs K2 >= 1")
    server = server_part(adapter, cut, config.num_hidden_layers)
    if not server:
        raise AdapterError(f"{adapter.path} has no LoRA tensors in the server's blocks of cut {cut}: the server "
                           "could not serve it")
    tok = _tokenizer(tokenizer, adapter, path, config.get_text_config().vocab_size)
    seg = merged_client(path, adapter, cut, num_labels)
    text = config.get_text_config()
    width, vocab = text.hidden_size, text.vocab_size
    positions = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    if hasattr(seg.model.config, "use_cache"):
        seg.model.config.use_cache = False  # no key/value cache in an exported graph
    front = front_segment(seg.model, seg.family, cut, seg.num_layers)
    back = back_segment(seg.model, seg.family, cut, seg.num_layers, width)
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    length = min(SAMPLE_LENGTH, positions or SAMPLE_LENGTH)
    front_file = export_segment(front, sample_inputs(front, SAMPLE_BATCH, length, vocab, width, pad), "hidden",
                                out / FRONT, positions, optimize)
    back_file = export_segment(back, sample_inputs(back, SAMPLE_BATCH, length, vocab, width, pad), "logits",
                               out / BACK, positions, optimize)
    tok.save_pretrained(str(out / TOKENIZER))
    manifest = Manifest(model=info, task=adapter.task, cut=cut, lora=adapter.spec,
                        server_adapter=tensors_digest(server), labels=adapter.labels, num_labels=num_labels,
                        vocab_size=vocab, max_positions=positions, opset=_opset(out / FRONT), front=front_file,
                        back=back_file, adapter=str(adapter.path.resolve()))
    manifest.write(out)
    return Exported(manifest, front, back, out, time.perf_counter() - started)


# ---------------------------------------------------------------- command line


EXAMPLE = "fedsplit export --adapter my-adapter --out my-onnx"
HELP = "write a client's front and back segments (LoRA merged) as ONNX files for `fedsplit infer`"


def add_parser(sub, formatter_class=None) -> None:
    """Register ``fedsplit export``."""
    from split.argtypes import add_command, int_at_least

    p = add_command(sub, "export", HELP, EXAMPLE, formatter_class)
    p.add_argument("--model", default=None,
                   help="the base model folder or hub id the adapter was trained on (default: the built-in "
                        "all-MiniLM-L6-v2)")
    p.add_argument("--adapter", required=True, metavar="DIR",
                   help="a client's saved adapter (`fedsplit client --out`) or a round_N checkpoint folder")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write front.onnx, back.onnx, "
                                                                  "manifest.json and the tokenizer into")
    p.add_argument("--cut", default=None, metavar="K1,K2",
                   help="the cut to export at (default: the one the adapter folder records)")
    p.add_argument("--num-labels", type=int_at_least(2), default=None,
                   help="classes of the head, when the adapter folder does not name its labels")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder or hub id (default: the adapter folder's, else the model folder's)")
    p.add_argument("--threads", type=int_at_least(1), default=None, help="torch intra-op threads")


def run(args) -> int:
    """Run ``fedsplit export``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    cut = Cut.parse(args.cut) if args.cut else None
    done = export_client(args.model, args.adapter, args.out, cut=cut, num_labels=args.num_labels,
                         tokenizer=args.tokenizer)
    m = done.manifest
    sizes = {f.file: (done.folder / f.file).stat().st_size for f in (m.front, m.back)}
    print(f"fedsplit export: cut {m.cut}, {m.model.model_type} ({m.model.source}), LoRA r={m.lora.rank} merged; "
          f"{m.front.file} ({sizes[m.front.file] / 1e6:.1f} MB, inputs {', '.join(m.front.inputs)}), "
          f"{m.back.file} ({sizes[m.back.file] / 1e6:.1f} MB, inputs {', '.join(m.back.inputs)}), opset {m.opset}, "
          f"in {done.folder} ({done.seconds:.1f} s)")
    model = f" --model {args.model}" if args.model else ""
    print(f"serve it with: fedsplit server{model} --cut {m.cut} --adapter {args.adapter}")
    return 0

