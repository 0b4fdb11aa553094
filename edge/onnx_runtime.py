"""An export's two segments in onnxruntime sessions.

The sessions are checked against the manifest when they load: a graph whose
inputs or outputs are not the ones the manifest names (a file swapped or
edited) is refused before any data is fed to it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from split.onnx_manifest import Manifest, ManifestError, SegmentFile


def onnxruntime():
    """The onnxruntime module, or a clear error saying how to install it."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise RuntimeError("onnxruntime is not installed: pip install 'fedsplit[onnx]' (on a Jetson or a "
                           "Raspberry Pi, the onnxruntime CPU wheel for aarch64 from PyPI)") from None
    return ort


class OnnxSegments:
    """The front and back segments of the export in ``folder``."""

    def __init__(self, folder: str | Path, manifest: Manifest, threads: int | None = None,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",)):
        ort = onnxruntime()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        folder = Path(folder)
        self.manifest = manifest
        self.front = _session(ort, folder, manifest.front, options, providers)
        self.back = _session(ort, folder, manifest.back, options, providers)

    def run_front(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """The hidden state at the cut for a batch (``arrays`` holds at least the front's inputs)."""
        return _run(self.front, self.manifest.front, arrays)

    def run_back(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """The head's logits for the server's hidden state (``arrays["hidden"]``) and the batch."""
        return _run(self.back, self.manifest.back, arrays)


def _session(ort, folder: Path, segment: SegmentFile, options, providers):
    path = folder / segment.file
    try:
        session = ort.InferenceSession(str(path), options, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
        raise ManifestError(f"{path}: onnxruntime cannot load it ({type(exc).__name__}: {str(exc)[:300]}); "
                            "export again") from None
    inputs = tuple(i.name for i in session.get_inputs())
    outputs = tuple(o.name for o in session.get_outputs())
    if inputs != segment.inputs or outputs != segment.outputs:
        raise ManifestError(f"{path} takes {list(inputs)} and gives {list(outputs)}, the manifest says "
                            f"{list(segment.inputs)} and {list(segment.outputs)}: the folder was changed after "
                            "export; export again")
    return session


def _run(session, segment: SegmentFile, arrays: dict[str, np.ndarray]) -> np.ndarray:
    return session.run(list(segment.outputs), {name: arrays[name] for name in segment.inputs})[0]


def batch_arrays(input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
    """The arrays a segment may take for a right-padded batch: ids, mask and
    positions 0..T-1 per row (what transformers uses when none are given)."""
    batch, length = input_ids.shape
    positions = np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length)).copy()
    return {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
            "position_ids": positions}
