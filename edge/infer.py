"""``fedsplit infer``: split inference with the client's segments in onnxruntime.

Per batch: the front segment turns token ids into the hidden state at the
cut (onnxruntime), the server runs its blocks on it (a forward with
``train=false`` over the same connection and handshake a training client
uses), and the back segment turns the server's hidden state into logits
(onnxruntime). The server must host the same checkpoint (the fingerprint in
the hello) and serve the same adapter (``fedsplit server --adapter``): the
client compares the digest of the server-side LoRA it is served with the
export's manifest before it sends a single text.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from split.adapter_folder import tensors_digest
from split.onnx_manifest import TOKENIZER, Manifest, read_manifest
from split.protocol import Hello
from split.security import PLAIN_WARNING, check_pair, check_plain, load_client_keys
from split.transport import Connection
from split.wire import Message

from .client import BackboneLink, ServerRefused, leave, register
from .data import DataError, Sample, load_inputs, pad_batch
from .heartbeat import Heartbeat
from .onnx_runtime import OnnxSegments, batch_arrays
from .tokenizer import load_tokenizer

log = logging.getLogger(__name__)

HEARTBEAT_SHARE = 4  # ping every 1/4 of the server's session timeout, as a training client does


@dataclass
class InferOptions:
    """What ``fedsplit infer`` runs on and where its results go."""

    server: str
    onnx: str
    data: str
    out: str | None = None  # None: predictions to standard output
    batch_size: int = 32
    max_length: int = 64
    client_id: str = ""
    timeout: float = 120.0
    connect_timeout: float = 30.0
    key: str | None = None
    server_key: str | None = None
    threads: int | None = None  # onnxruntime intra-op threads (None: its default)

    def __post_init__(self):
        if self.batch_size < 1 or self.max_length < 2:
            raise ValueError(f"batch size must be >= 1 and max length >= 2, got {self.batch_size}, "
                             f"{self.max_length}")
        for name in ("timeout", "connect_timeout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number of seconds > 0, got {value}")
        if not check_pair(("--key", self.key), ("--server-key", self.server_key)):
            check_plain(self.server, "--server", "--key and --server-key")


class RemoteBackbone:
    """The server's blocks for an export: registered with the manifest's
    model, cut and LoRA, and checked to serve the export's server-side adapter."""

    def __init__(self, options: InferOptions, manifest: Manifest):
        keys = load_client_keys(options.key, options.server_key)
        if keys is None:
            log.warning(PLAIN_WARNING, options.server)
        client_id = options.client_id or f"infer-{uuid.uuid4().hex[:8]}"
        # No resends: an inference forward is cheap to redo, and a lost session is an error here.
        self.conn = Connection(options.server, client_id, timeout=options.timeout, keys=keys, reconnect_for=0)
        self.heartbeat = None
        try:
            hello = Hello(manifest.model, manifest.lora, manifest.task, seed=0, cut=manifest.cut,
                          num_labels=manifest.num_labels)
            welcome = register(self.conn, hello, options.connect_timeout, retry=False)
            self._check_adapter(manifest)
            self.heartbeat = Heartbeat(self.conn, welcome.session_timeout / HEARTBEAT_SHARE)
        except BaseException:
            self.close(say_bye=False)
            raise
        self.link = BackboneLink(self.conn, "position_ids" in manifest.front.inputs)

    def _check_adapter(self, manifest: Manifest) -> None:
        served = self.conn.request(Message("adapter")).tensors
        if tensors_digest(served) != manifest.server_adapter:
            raise ServerRefused(
                f"the server at {self.conn.address} does not serve the adapter this export was made from "
                f"({manifest.adapter or 'see its manifest'}): its server-side LoRA differs. Start it with "
                f"`fedsplit server --cut {manifest.cut} --adapter {manifest.adapter or 'ADAPTER_DIR'}` "
                "(and the same --model)")

    def forward(self, hidden: np.ndarray, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """The server's blocks applied to the front's hidden state."""
        link = self.link
        link.attention_mask = torch.from_numpy(arrays["attention_mask"])
        link.position_ids = torch.from_numpy(arrays["position_ids"]) if link.rotary else None
        out = link.remote_forward(torch.from_numpy(hidden), link.next_step(), train=False)
        return out.numpy()

    def close(self, say_bye: bool = True) -> None:
        """Leave the server and close the socket."""
        leave(self.conn, self.heartbeat, say_bye)


def label_ids(samples: list, labels: tuple[str, ...]) -> list[int] | None:
    """Each sample's class index in ``labels`` (None for unlabelled data); a
    label the model does not know is an error naming its record."""
    if not samples or not isinstance(samples[0], Sample):
        return None
    index = {name: i for i, name in enumerate(labels)}
    for sample in samples:
        if sample.label not in index:
            raise DataError(f"{sample.where}: label {sample.label!r} is not one of the model's labels "
                            f"{list(labels)[:10]}")
    return [index[s.label] for s in samples]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def run_inference(options: InferOptions) -> dict:
    """Classify every text of ``options.data``; returns the summary (and
    writes one JSON line per text to ``options.out`` or standard output)."""
    folder = Path(options.onnx).expanduser()
    manifest = read_manifest(folder)
    if manifest.max_positions is not None and options.max_length > manifest.max_positions:
        raise ValueError(f"--max-length {options.max_length} exceeds the model's {manifest.max_positions} "
                         f"positions; use --max-length {manifest.max_positions} or less")
    samples = load_inputs(options.data)
    labels = manifest.labels or tuple(str(i) for i in range(manifest.num_labels))
    truth = label_ids(samples, labels)
    texts = [s.text if isinstance(s, Sample) else s for s in samples]
    tokenizer = load_tokenizer(folder / TOKENIZER, manifest.vocab_size)
    segments = OnnxSegments(folder, manifest, options.threads)
    remote = RemoteBackbone(options, manifest)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seconds = {"front_s": 0.0, "server_s": 0.0, "back_s": 0.0}
    predictions: list[int] = []
    sink = open(options.out, "w", encoding="utf-8") if options.out else sys.stdout
    try:
        for start in range(0, len(texts), options.batch_size):
            chunk = texts[start:start + options.batch_size]
            ids, mask = pad_batch(tokenizer(chunk, truncation=True, max_length=options.max_length)["input_ids"],
                                  pad)
            arrays = batch_arrays(ids.numpy(), mask.numpy())
            clock = time.perf_counter()
            arrays["hidden"] = segments.run_front(arrays)
            seconds["front_s"] += time.perf_counter() - clock
            clock = time.perf_counter()
            arrays["hidden"] = remote.forward(arrays["hidden"], arrays)
            seconds["server_s"] += time.perf_counter() - clock
            clock = time.perf_counter()
            logits = segments.run_back(arrays)
            seconds["back_s"] += time.perf_counter() - clock
            probs = softmax(logits.astype(np.float64))
            for row, text in enumerate(chunk):
                k = int(probs[row].argmax())
                predictions.append(k)
                record = {"text": text, "prediction": labels[k], "probability": round(float(probs[row, k]), 6)}
                if truth is not None:
                    record["label"] = labels[truth[start + row]]
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
        bytes_sent, bytes_received = remote.conn.bytes_sent, remote.conn.bytes_received
    finally:
        if sink is not sys.stdout:
            sink.close()
        remote.close()
    summary = {"samples": len(texts), "cut": str(manifest.cut), "bytes_sent": bytes_sent,
               "bytes_received": bytes_received, **seconds}
    if truth is not None:
        summary["accuracy"] = sum(p == t for p, t in zip(predictions, truth)) / len(truth)
    return summary


def report(summary: dict) -> str:
    """The closing line of ``fedsplit infer``."""
    acc = f", accuracy {summary['accuracy']:.4f}" if "accuracy" in summary else ""
    return (f"fedsplit infer: {summary['samples']} texts{acc}; client front {summary['front_s']:.2f} s, server "
            f"round trips {summary['server_s']:.2f} s, client back {summary['back_s']:.2f} s; "
            f"{summary['bytes_sent'] / 1e6:.2f} MB sent, {summary['bytes_received'] / 1e6:.2f} MB received")


# ---------------------------------------------------------------- command line


EXAMPLE = "fedsplit infer --server tcp://127.0.0.1:5555 --onnx my-onnx --data test.jsonl --out predictions.jsonl"
HELP = "classify texts with an export's ONNX segments and the server's backbone (split inference)"


def add_parser(sub, formatter_class=None) -> None:
    """Register ``fedsplit infer``."""
    from split.argtypes import add_command, int_at_least, positive_float, positive_int

    p = add_command(sub, "infer", HELP, EXAMPLE, formatter_class)
    p.add_argument("--server", default="tcp://127.0.0.1:5555",
                   help="a `fedsplit server --adapter` serving the export's adapter; one on another machine "
                        "needs --key and --server-key")
    p.add_argument("--onnx", required=True, metavar="DIR", help="the folder `fedsplit export --out` wrote")
    p.add_argument("--data", required=True, metavar="FILE",
                   help="JSONL/CSV file with a 'text' field (and 'label': the accuracy is printed)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="write the predictions here, one JSON object per line (default: standard output)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="texts per forward")
    p.add_argument("--max-length", type=int_at_least(2), default=64,
                   help="tokens per text; longer texts are truncated (train and infer with the same)")
    p.add_argument("--key", default=None, metavar="FILE", help="this client's NAME.key_secret: CurveZMQ on")
    p.add_argument("--server-key", default=None, metavar="FILE", help="the server's public NAME.key")
    p.add_argument("--id", default="", help="client id (default: random)")
    p.add_argument("--timeout", type=positive_float, default=120.0, help="seconds to wait for any server reply")
    p.add_argument("--connect-timeout", type=positive_float, default=30.0,
                   help="seconds to wait for the server's first reply")
    p.add_argument("--threads", type=positive_int, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--log-level", default="INFO", type=str.upper,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], help="level of fedsplit's log lines")


def run(args) -> int:
    """Run ``fedsplit infer``."""
    options = InferOptions(server=args.server, onnx=args.onnx, data=args.data, out=args.out,
                           batch_size=args.batch_size, max_length=args.max_length, client_id=args.id,
                           timeout=args.timeout, connect_timeout=args.connect_timeout, key=args.key,
                           server_key=args.server_key, threads=args.threads)
    print(report(run_inference(options)), file=sys.stderr)
    return 0
