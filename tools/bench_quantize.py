"""Benchmark: onnxruntime CPU latency of a CNN in float32, int8 static, pruned float32 and pruned + int8.

    python tools/bench_quantize.py [--model resnet50] [--ratio 0.5] [--threads 2] [--runs 30] [--json out.json]

The CNN is torchvision's, with random weights (latency does not depend on the values), exported with
torch.onnx.export(dynamo=False, opset 17) into a temporary folder; nothing large is kept. Calibration uses
random images, so no accuracy is reported here (tests/test_quantize.py measures accuracy on the digits model).

All variants are timed in one process, in interleaved rounds (round r times every variant once, in turn), so
machine noise from other processes hits every variant alike; each figure is the median over rounds, and the
ratios are of those medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from onnxprune.recipe import Recipe


def export_cnn(name: str, folder: Path, size: int) -> onnx.ModelProto:
    import torch
    import torchvision

    net = getattr(torchvision.models, name)(weights=None).eval()
    path = folder / f"{name}.onnx"
    torch.onnx.export(net, torch.randn(1, 3, size, size), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    return onnx.load(str(path))


def time_variants(models: dict[str, onnx.ModelProto], feed: dict[str, np.ndarray], threads: int, runs: int,
                  warmup: int) -> dict[str, float]:
    """Median milliseconds per run for each model, timed in interleaved rounds."""
    import onnxruntime as ort

    sessions = {}
    for key, model in models.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        sessions[key] = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for session in sessions.values():
        for _ in range(warmup):
            session.run(None, feed)
    samples: dict[str, list[float]] = {key: [] for key in sessions}
    for _ in range(runs):
        for key, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feed)
            samples[key].append((time.perf_counter() - start) * 1000)
    return {key: statistics.median(values) for key, values in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="torchvision classification model name")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--ratio", type=float, default=0.5, help="pruning ratio for the pruned rows (0 to skip)")
    parser.add_argument("--calib", type=int, default=16, help="random calibration images")
    parser.add_argument("--batch", default="1", help="batch sizes timed, comma-separated")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--runs", type=int, default=30, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    from onnxprune.quantize.quantize import quantize_model
    from onnxprune.report import environment

    rng = np.random.default_rng(0)
    calib = [{"input": rng.standard_normal((4, 3, args.size, args.size)).astype(np.float32)}
             for _ in range(max(1, args.calib // 4))]
    with tempfile.TemporaryDirectory(prefix="bench-quant-") as tmp:
        t0 = time.perf_counter()
        fp32 = export_cnn(args.model, Path(tmp), args.size)
        print(f"exported {args.model} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    models = {"float32": fp32}
    t0 = time.perf_counter()
    models["int8 static"] = quantize_model(fp32, "static", calibration=calib).model
    print(f"quantized in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    notes = []
    if args.ratio > 0:
        try:
            from onnxprune.pipeline.prune import prune_model
        except ImportError as exc:
            notes.append(f"pruned rows skipped: onnxprune.pipeline.prune is not available ({exc})")
        else:
            pruned = prune_model(fp32, Recipe(ratio=args.ratio)).model
            models[f"pruned {args.ratio:g}"] = pruned
            models[f"pruned {args.ratio:g} + int8 static"] = quantize_model(pruned, "static", calibration=calib).model
    rows = []
    for batch in (int(b) for b in args.batch.split(",")):
        feed = {"input": rng.standard_normal((batch, 3, args.size, args.size)).astype(np.float32)}
        load = os.getloadavg()[0]
        latency = time_variants(models, feed, args.threads, args.runs, args.warmup)
        base = latency["float32"]
        print(f"\n{args.model}, batch {batch}, {args.threads} threads, median of {args.runs} interleaved rounds "
              f"(1-min load average before timing: {load:.2f})")
        print("| variant | latency ms | speed-up vs float32 | size MB | smaller by |")
        print("|---|---|---|---|---|")
        for key, ms in latency.items():
            row = {"batch": batch, "variant": key, "latency_ms": ms, "speedup_vs_float32": base / ms,
                   "size_mb": models[key].ByteSize() / 1e6,
                   "size_ratio_vs_float32": fp32.ByteSize() / models[key].ByteSize(), "load_average": load}
            rows.append(row)
            print(f"| {key} | {ms:.1f} | {row['speedup_vs_float32']:.2f}x | {row['size_mb']:.1f} "
                  f"| {row['size_ratio_vs_float32']:.2f}x |")
    for note in notes:
        print(note)
    if args.json:
        report = {"model": args.model, "threads": args.threads, "runs": args.runs, "ratio": args.ratio,
                  "rows": rows, "notes": notes, **environment()}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
