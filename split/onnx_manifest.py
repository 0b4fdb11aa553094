"""The manifest of an ONNX export: which model, cut and adapter the two ONNX
segments were made from, and their input and output names.

``fedsplit export`` writes it as ``manifest.json`` beside ``front.onnx`` and
``back.onnx``; ``fedsplit infer`` reads it to register with the server (the
checkpoint's fingerprint, the cut, the LoRA spec) and to check that the server
serves the same server-side adapter. The file is user input when it is read:
every field is checked, and a bad one is an error naming the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .json_files import read_json_object
from .lora import LoraSpec
from .partition import Cut
from .protocol import ModelInfo, ProtocolError

MANIFEST = "manifest.json"
FORMAT = "fedsplit-onnx/1"
TOKENIZER = "tokenizer"  # the tokenizer's folder inside the export
# Names a segment's inputs may have: what the client holds (ids, mask, positions)
# and, for the back, the hidden state the server returned.
INPUTS = {"front": ("input_ids", "attention_mask", "position_ids"),
          "back": ("hidden", "attention_mask", "input_ids", "position_ids")}
OUTPUTS = {"front": ("hidden",), "back": ("logits",)}


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the field."""


@dataclass(frozen=True)
class SegmentFile:
    """One exported segment: its file (inside the export folder) and its names."""

    file: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"file": self.file, "inputs": list(self.inputs), "outputs": list(self.outputs)}


@dataclass(frozen=True)
class Manifest:
    """What ``fedsplit infer`` needs to know about an export."""

    model: ModelInfo
    task: str
    cut: Cut
    lora: LoraSpec
    server_adapter: str  # split.adapter_folder.tensors_digest of the server blocks' LoRA
    labels: tuple[str, ...] | None
    num_labels: int
    vocab_size: int
    max_positions: int | None
    opset: int
    front: SegmentFile
    back: SegmentFile
    adapter: str = ""  # the adapter folder it was made from, for messages

    def to_dict(self) -> dict:
        return {"format": FORMAT, "model": self.model.to_meta(), "task": self.task,
                "cut": [self.cut.front, self.cut.back], "lora": self.lora.to_dict(),
                "server_adapter": self.server_adapter, "labels": None if self.labels is None else list(self.labels),
                "num_labels": self.num_labels, "vocab_size": self.vocab_size, "max_positions": self.max_positions,
                "opset": self.opset, "front": self.front.to_dict(), "back": self.back.to_dict(),
                "adapter": self.adapter}

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / MANIFEST
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def read_manifest(folder: str | Path) -> Manifest:
    """The manifest of the export in ``folder``, every field checked, and its
    segment files present."""
    folder = Path(folder).expanduser()
    path = folder / MANIFEST
    if not path.is_file():
        raise ManifestError(f"--onnx {folder}: no {MANIFEST}; give the folder `fedsplit export --out` wrote")
    data = read_json_object(path, ManifestError, "give the folder `fedsplit export --out` wrote")
    try:
        manifest = _parse(data)
    except (KeyError, TypeError, ValueError, ProtocolError) as exc:
        text = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ManifestError(f"{path}: {text}; export again with `fedsplit export`") from None
    for segment in (manifest.front, manifest.back):
        if not (folder / segment.file).is_file():
            raise ManifestError(f"{path} names {segment.file}, which is not in {folder}; copy the whole folder")
    return manifest


def _parse(data) -> Manifest:
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    if data.get("format") != FORMAT:
        raise ValueError(f"format is {data.get('format')!r}, this fedsplit reads {FORMAT!r}")
    task = data["task"]
    if task != "classification":
        raise ValueError(f"task {task!r}: fedsplit infer runs classification exports")
    cut = data["cut"]
    if not (isinstance(cut, list) and len(cut) == 2 and all(_int(v, 0) for v in cut)):
        raise ValueError(f"cut must be [K1, K2], got {cut!r}")
    model = ModelInfo.from_meta(data["model"], MANIFEST)
    cut = Cut(*cut)
    cut.check(model.num_layers)
    if cut.two_part:
        raise ValueError("cut K2 = 0: an export keeps the last blocks and the head on the client (K2 >= 1)")
    if not isinstance(data["lora"], dict):
        raise ValueError("lora must be a map")
    lora = LoraSpec.from_dict(data["lora"])
    digest = data["server_adapter"]
    if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        raise ValueError("server_adapter must be 64 hex digits")
    num_labels, vocab, positions, opset = data["num_labels"], data["vocab_size"], data["max_positions"], data["opset"]
    for name, value, low in (("num_labels", num_labels, 2), ("vocab_size", vocab, 1), ("opset", opset, 1)):
        if not _int(value, low):
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if positions is not None and not _int(positions, 1):
        raise ValueError(f"max_positions must be an integer >= 1 or null, got {positions!r}")
    labels = data["labels"]
    if labels is not None:
        if (not isinstance(labels, list) or len(labels) != num_labels
                or not all(isinstance(x, str) and x for x in labels) or len(set(labels)) != len(labels)):
            raise ValueError(f"labels must be null or {num_labels} distinct names, got {labels!r}"[:300])
        labels = tuple(labels)
    adapter = data.get("adapter", "")
    if not isinstance(adapter, str):
        raise ValueError("adapter must be a string")
    return Manifest(model, task, cut, lora, digest, labels, num_labels, vocab, positions, opset,
                    _segment(data["front"], "front"), _segment(data["back"], "back"), adapter)


def _segment(value, which: str) -> SegmentFile:
    if not isinstance(value, dict):
        raise ValueError(f"{which} must be a map")
    file, inputs, outputs = value["file"], value["inputs"], value["outputs"]
    # A plain file name: the manifest never points outside its folder.
    if not (isinstance(file, str) and file.endswith(".onnx") and Path(file).name == file and not file.startswith(".")):
        raise ValueError(f"{which}.file must be a .onnx file name inside the folder, got {file!r}")
    for kind, names, allowed in (("inputs", inputs, INPUTS[which]), ("outputs", outputs, OUTPUTS[which])):
        if not (isinstance(names, list) and names and all(n in allowed for n in names)
                and len(set(names)) == len(names)):
            raise ValueError(f"{which}.{kind} must name some of {list(allowed)}, got {names!r}"[:300])
    return SegmentFile(file, tuple(inputs), tuple(outputs))


def _int(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low
