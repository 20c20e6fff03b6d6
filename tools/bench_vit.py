"""onnxprune vs Torch-Pruning on torchvision ViT-B/16: MLP neurons at the same ratio, side by side in one run.

Both tools prune the same randomly initialised torchvision `vit_b_16` (no pretrained weights offline: the
figures are MACs, latency and time to prune, not accuracy), by L1 magnitude, removing `--ratio` of the
neurons of every MLP (fc1 outputs = fc2 inputs); the hidden size and the heads stay. Heads are not compared:
onnxprune keeps the packed `in_proj` of torchvision's nn.MultiheadAttention frozen, and Torch-Pruning's
MultiheadAttention pruner removes embedding dimensions (the hidden size), not whole heads (its `num_heads`
option applies to separate q/k/v or fused qkv nn.Linear layers, as in timm).

  * onnxprune: export (TorchScript exporter, opset 17) once, then `prune_model(ratio=...)` on the ONNX file;
    the prune time includes analysis, rewrite and validation, not the export.
  * Torch-Pruning: `MetaPruner(pruning_ratio_dict={mlp fc1: ratio})` + `step()` on the PyTorch model; the prune
    time includes dependency-graph tracing, not the export of the result.
  * MACs: onnxprune.stats.count_macs of each ONNX model (batch 1). Latency: onnxruntime CPU, batch 1, median
    of `--repeats` runs after a warm-up, `--threads` intra-op threads; ratio pruned / unpruned.

    python tools/bench_vit.py --ratio 0.3 [--small] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx


def latency(model: onnx.ModelProto, feed: dict, threads: int, repeats: int) -> float:
    from onnxprune.validate import session

    sess = session(model, threads=threads)
    sess.run(None, feed)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.3, help="share of each MLP's neurons removed")
    parser.add_argument("--small", action="store_true", help="a 2-layer ViT on 32x32 images (smoke test)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json")
    args = parser.parse_args()

    import torch
    import torch_pruning as tp
    import torchvision

    sys.path.insert(0, str(Path(__file__).parent))
    import export_transformers as et

    from onnxprune.prune import prune_model
    from onnxprune.stats import count_macs

    size = 32 if args.small else 224
    torch.manual_seed(0)
    model = et.vit(small=args.small).eval()
    x = torch.randn(1, 3, size, size)
    feed = {"pixel_values": x.numpy()}
    tmp = Path(tempfile.mkdtemp())
    base_path = et.export(model, "vit", tmp / "vit.onnx", dynamo=False, image_size=size)
    base = onnx.load(str(base_path))

    t = time.perf_counter()
    ours = prune_model(base, ratio=args.ratio, criterion="l1")
    ours_s = time.perf_counter() - t
    heads_frozen = sum(1 for g in ours.analysis.groups if not g.prunable and "self_attention" in g.sources[0])

    fc1 = [m.mlp[0] for m in model.modules() if isinstance(m, torchvision.models.vision_transformer.EncoderBlock)]
    t = time.perf_counter()
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.0,
                                  pruning_ratio_dict={m: args.ratio for m in fc1})
    pruner.step()
    tp_s = time.perf_counter() - t
    tp_path = et.export(model, "vit", tmp / "vit_tp.onnx", dynamo=False, image_size=size)
    theirs = onnx.load(str(tp_path))

    neurons = lambda m: sum(int(w.dims[1]) for w in m.graph.initializer  # noqa: E731 - fc1 weight [E, N]
                            if any(n.op_type == "MatMul" and n.input[1] == w.name and "mlp.0" in n.name
                                   for n in m.graph.node))
    rows = {}
    lat0 = latency(base, feed, args.threads, args.repeats)
    for name, m, secs in (("unpruned", base, 0.0), ("onnxprune", ours.model, ours_s), ("torch-pruning", theirs, tp_s)):
        lat = lat0 if name == "unpruned" else latency(m, feed, args.threads, args.repeats)
        rows[name] = {"macs": count_macs(m), "mlp_neurons": neurons(m), "latency_s": lat, "latency_ratio": lat / lat0,
                      "prune_seconds": secs}
    for name in ("onnxprune", "torch-pruning"):
        rows[name]["macs_reduction"] = 1 - rows[name]["macs"] / rows["unpruned"]["macs"]
    out = {"model": "vit_small" if args.small else "vit_b_16", "ratio": args.ratio, "threads": args.threads,
           "onnxprune_frozen_attention_groups": heads_frozen, "rows": rows,
           "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                        "torch_pruning": tp.__version__, "onnx": onnx.__version__,
                        "onnxruntime": __import__("onnxruntime").__version__, "python": platform.python_version()},
           "machine": f"{platform.machine()} {platform.processor() or ''}".strip()}
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
