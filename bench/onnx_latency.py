"""Client-side latency of the MiniLM front and back segments: onnxruntime
against torch, measured side by side in one run.

The built-in all-MiniLM-L6-v2 gets a rank-8 adapter on query and value of
every block (random non-zero B, random head: the values do not change the
time), saved as a client saves one, and is exported at cut 1,1 with
``fedsplit export``'s code. Each segment then runs in three ways on the same
inputs, alternating call by call so that drift in the machine's speed hits
them alike:

- torch client: the segment as the torch client computes it (peft LoRA
  unmerged, the model's default attention);
- torch merged: the very module that was exported (LoRA merged, eager attention);
- onnxruntime: the exported file, on the CPU execution provider.

torch and onnxruntime get the same number of threads; with one (the
default) the calling thread's CPU time is the clock, which a busy machine
does not inflate. Prints and writes the
median milliseconds per call and the ratios onnxruntime / torch, with the
largest difference between onnxruntime's and the torch client's outputs.

    python bench/onnx_latency.py [--threads 1] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from peft import set_peft_model_state_dict
from transformers import AutoModelForSequenceClassification

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.export import export_client  # noqa: E402
from edge.onnx_runtime import OnnxSegments, batch_arrays  # noqa: E402
from edge.onnx_segments import back_segment, front_segment  # noqa: E402
from split.adapter_folder import read_adapter, record_split  # noqa: E402
from split.families import block_of, family_for  # noqa: E402
from split.lora import LoraSpec, adapter_state, attach_lora, save_adapter  # noqa: E402
from split.partition import CLIENT, Cut, build_segment, load_config, resolve_model_path  # noqa: E402
from split.protocol import ModelInfo  # noqa: E402

CUT = Cut(1, 1)
LABELS = ["a", "b", "c", "d"]
SPEC = LoraSpec(rank=8, alpha=16.0)
SETTINGS = ((1, 16), (1, 64), (8, 64), (16, 64), (32, 128))  # batch x sequence
RESULTS = Path(__file__).resolve().parent / "results"


def save_minilm_adapter(folder: Path) -> Path:
    """A whole-model MiniLM adapter as a client saves one, with random B and head."""
    path = resolve_model_path(None)
    config = load_config(path, "classification", len(LABELS), dropout=False)
    model = AutoModelForSequenceClassification.from_pretrained(path, config=config)
    fam = family_for(config)
    heads = fam.trained_heads("classification")
    peft = attach_lora(model, SPEC, fam, "classification", 0, modules_to_save=heads)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    save_adapter(folder, adapter_state(peft), SPEC, fam, "classification", str(path), heads, labels=LABELS)
    record_split(folder, CUT, ModelInfo.of(path, config))
    return folder


def torch_client_segments(adapter_dir: Path):
    """Front and back as the torch client computes them: LoRA unmerged, default attention."""
    seg = build_segment(None, CLIENT, CUT, num_labels=len(LABELS), dropout=False)
    heads = seg.family.trained_heads("classification")
    peft = attach_lora(seg.model, SPEC, seg.family, "classification", 0, modules_to_save=heads)
    hosted = set(CUT.server_blocks(seg.num_layers))
    tensors = read_adapter(adapter_dir).tensors
    set_peft_model_state_dict(peft, {k: v for k, v in tensors.items() if block_of(k) not in hosted})
    model = peft.base_model.model.eval()
    width = seg.config.hidden_size
    return front_segment(model, seg.family, CUT, seg.num_layers), back_segment(model, seg.family, CUT,
                                                                                 seg.num_layers, width)


def inputs_for(batch: int, length: int, vocab: int, width: int, seed: int) -> dict[str, np.ndarray]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab - 1, (batch, length), generator=gen).numpy()
    arrays = batch_arrays(ids, np.ones((batch, length), dtype=np.int64))
    arrays["hidden"] = torch.randn(batch, length, width, generator=gen).numpy()
    return arrays


def median_ms(calls: dict, repeats: int, warmup: int, clock) -> dict[str, float]:
    """Median milliseconds of each call by ``clock``, the calls alternating."""
    times = {name: [] for name in calls}
    for i in range(warmup + repeats):
        for name, call in calls.items():
            start = clock()
            call()
            if i >= warmup:
                times[name].append((clock() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def clock_for(threads: int):
    """With one thread, both runtimes compute on the calling thread: its CPU
    time does not count the time other processes held the cores, which makes
    the figure stable on a busy machine. With more, wall time."""
    return (time.thread_time, "thread CPU time") if threads == 1 else (time.perf_counter, "wall time")


def measure(threads: int, repeats: int, warmup: int) -> dict:
    torch.set_num_threads(threads)
    clock, clock_name = clock_for(threads)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = save_minilm_adapter(Path(tmp) / "adapter")
        exported = export_client(None, adapter, Path(tmp) / "onnx")
        onnx = OnnxSegments(exported.folder, exported.manifest, threads=threads)
        client_front, client_back = torch_client_segments(adapter)
        sizes = {f.file: (exported.folder / f.file).stat().st_size
                 for f in (exported.manifest.front, exported.manifest.back)}
        rows = []
        m = exported.manifest
        for batch, length in SETTINGS:
            arrays = inputs_for(batch, length, m.vocab_size, m.model.hidden_size, seed=batch * 1000 + length)
            tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
            for name, merged, client, run in (("front", exported.front, client_front, onnx.run_front),
                                              ("back", exported.back, client_back, onnx.run_back)):
                args = tuple(tensors[n] for n in merged.input_names())
                with torch.inference_mode():
                    diff = float(np.abs(run(arrays) - client(*args).numpy()).max())
                    ms = median_ms({"torch_client": lambda: client(*args), "torch_merged": lambda: merged(*args),
                                    "onnxruntime": lambda: run(arrays)}, repeats, warmup, clock)
                rows.append({"segment": name, "batch": batch, "sequence": length, **{f"{k}_ms": v for k, v in ms.items()},
                             "ratio_vs_client": ms["onnxruntime"] / ms["torch_client"],
                             "ratio_vs_merged": ms["onnxruntime"] / ms["torch_merged"], "max_abs_diff": diff})
                print(f"{name:5s} {batch:3d} x {length:3d}: torch client {ms['torch_client']:8.2f} ms, torch merged "
                      f"{ms['torch_merged']:8.2f} ms, onnxruntime {ms['onnxruntime']:8.2f} ms, ratio "
                      f"{rows[-1]['ratio_vs_client']:.2f} (vs merged {rows[-1]['ratio_vs_merged']:.2f}), "
                      f"max |diff| {diff:.1e}", flush=True)
        return {"model": "all-MiniLM-L6-v2", "cut": str(CUT), "lora": SPEC.to_dict(), "threads": threads,
                "clock": clock_name,
                "repeats": repeats, "warmup": warmup, "export_seconds": exported.seconds, "file_bytes": sizes,
                "opset": m.opset, "torch": torch.__version__, "onnxruntime": _ort_version(),
                "machine": f"{platform.machine()}, {platform.processor() or platform.system()}", "rows": rows}


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def markdown(result: dict) -> str:
    lines = ["# ONNX segment latency (client side)", "",
             f"all-MiniLM-L6-v2 split at {result['cut']}, LoRA r={result['lora']['rank']} on query/value; "
             f"{result['threads']} thread(s) for torch {result['torch']} and onnxruntime {result['onnxruntime']}; "
             f"{result['clock']}, median of {result['repeats']} calls after {result['warmup']} warm-up calls, the three variants "
             "alternating (bench/onnx_latency.py). Export took "
             f"{result['export_seconds']:.1f} s; front.onnx {result['file_bytes']['front.onnx'] / 1e6:.1f} MB, "
             f"back.onnx {result['file_bytes']['back.onnx'] / 1e6:.1f} MB (opset {result['opset']}).", "",
             "| segment | batch x seq | torch client, ms | torch merged, ms | onnxruntime, ms | ort / torch client "
             "| ort / torch merged | max abs diff |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['segment']} | {r['batch']} x {r['sequence']} | {r['torch_client_ms']:.2f} | "
                     f"{r['torch_merged_ms']:.2f} | {r['onnxruntime_ms']:.2f} | {r['ratio_vs_client']:.2f} | "
                     f"{r['ratio_vs_merged']:.2f} | {r['max_abs_diff']:.1e} |")
    lines += ["", "torch client: the segment as the torch client runs it (peft LoRA unmerged, default attention); "
              "torch merged: the module that was exported (LoRA merged, eager attention). Ratios below 1: "
              "onnxruntime is faster."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1,
                   help="threads for torch and onnxruntime alike (1: timed by the thread's CPU clock)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per variant and setting")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    p.add_argument("--out", default=str(RESULTS / "onnx_latency"), help="results path without suffix")
    args = p.parse_args(argv)
    result = measure(args.threads, args.repeats, args.warmup)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
