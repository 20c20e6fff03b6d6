"""onnxprune vs Torch-Pruning on torchvision ViT-B/16: attention heads and MLP neurons at the same ratios, in one run.

Both tools prune the same randomly initialised torchvision `vit_b_16` (no pretrained weights offline: the
figures are MACs, latency and time to prune, not accuracy) by L1 magnitude: `--head-ratio` of every layer's
heads (whole heads: q, k, v blocks and the output projection's input) and `--ratio` of every MLP's neurons; the
hidden size stays.

  * onnxprune: the model exported as users export it (TorchScript exporter, opset 17: nn.MultiheadAttention's
    packed in_proj), then `prune_model(ratio=..., head_ratio=...)` on the ONNX model; the prune time includes
    analysis, rewrite and validation, not the export.
  * Torch-Pruning cannot remove heads from nn.MultiheadAttention (its pruner removes embedding dims), so each
    one is replaced by an equivalent timm-style module (one qkv nn.Linear, `num_heads`; outputs checked equal),
    then `MetaPruner(num_heads=..., prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=...,
    pruning_ratio_dict={fc1: ratio})` + `step()`; the prune time includes dependency tracing, not the export.
  * MACs: onnxprune.graph.stats.count_macs of each ONNX model (batch 1). Latency: onnxruntime CPU, batch 1, median of
    `--repeats` runs after a warm-up, `--threads` intra-op threads; each pruned model against the unpruned
    export of the same graph form.

    python tools/bench_vit.py --ratio 0.3 --head-ratio 0.25 [--small] [--json out.json]
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
from onnxprune.recipe import Recipe

if __package__ in (None, ""):  # run as `python tools/bench_vit.py`: the checkout's root, for `tools.*` and onnxprune
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def latency(model: onnx.ModelProto, feed: dict, threads: int, repeats: int) -> float:
    from onnxprune.runtime.session import internal_session

    sess = internal_session(model, threads=threads)
    sess.run(None, feed)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def features(model, x):
    """What the classifier head reads (vit_b_16's head starts at zero, so its logits compare nothing)."""
    import torch

    seen = []
    hook = model.heads.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0]))
    with torch.no_grad():
        model(x)
    hook.remove()
    return seen[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.3, help="share of each MLP's neurons removed")
    parser.add_argument("--head-ratio", type=float, default=0.25, help="share of each layer's heads removed")
    parser.add_argument("--small", action="store_true", help="a 2-layer ViT on 32x32 images (smoke test)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json")
    args = parser.parse_args()

    import copy

    import torch
    import torch_pruning as tp
    import torchvision
    from torchvision.models.vision_transformer import EncoderBlock

    from tools import export_transformers as et

    from onnxprune.pipeline.prune import prune_model
    from onnxprune.graph.stats import count_macs

    size = 32 if args.small else 224
    torch.manual_seed(0)
    model = et.vit(small=args.small).eval()
    x = torch.randn(1, 3, size, size)
    feed = {"pixel_values": x.numpy()}
    tmp = Path(tempfile.mkdtemp())
    base = onnx.load(str(et.export(model, "vit", tmp / "vit.onnx", dynamo=False, image_size=size)))

    t = time.perf_counter()
    ours = prune_model(base, Recipe(ratio=args.ratio, head_ratio=args.head_ratio, criterion="l1"))
    ours_s = time.perf_counter() - t

    split = copy.deepcopy(model)
    blocks = [m for m in split.modules() if isinstance(m, EncoderBlock)]
    for block in blocks:
        block.self_attention = et.split_attention(block.self_attention)
    err = float((features(split, x) - features(model, x)).abs().max() / features(model, x).abs().max())
    assert err < 1e-4, f"the split-qkv model differs from torchvision's: {err}"
    split_base = onnx.load(str(et.export(split, "vit", tmp / "vit_split.onnx", dynamo=False, image_size=size)))
    attn = [b.self_attention for b in blocks]
    t = time.perf_counter()
    pruner = tp.pruner.MetaPruner(
        split, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.0,
        # a group is only looked at when it has a ratio: the qkv groups get the head ratio, and with
        # prune_head_dims=False only whole heads go
        pruning_ratio_dict={b.mlp[0]: args.ratio for b in blocks} | {a.qkv: args.head_ratio for a in attn},
        ignored_layers=[split.heads],
        num_heads={a.qkv: a.num_heads for a in attn}, prune_num_heads=True, prune_head_dims=False,
        head_pruning_ratio=args.head_ratio)
    pruner.step()
    for a in attn:
        a.num_heads = pruner.num_heads[a.qkv]
    tp_s = time.perf_counter() - t
    with torch.no_grad():
        split(x)  # the pruned module still runs
    theirs = onnx.load(str(et.export(split, "vit", tmp / "vit_tp.onnx", dynamo=False, image_size=size)))

    def widths(m: onnx.ModelProto) -> dict:
        """Summed MLP neurons and attention heads (q/k/v features / 3 / head_dim) of an exported ViT."""
        head_dim = 768 // 12 if not args.small else 8
        inits = {t.name: t for t in m.graph.initializer}
        neurons = heads = 0
        for n in m.graph.node:
            if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits:
                dims = list(inits[n.input[1]].dims)
                out = dims[0] if n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute) \
                    else dims[-1]
                if "mlp.0" in n.name or "mlp/mlp.0" in n.name:
                    neurons += out
                elif "in_proj" in n.name or "qkv" in n.name or "self_attention/MatMul" in n.name:
                    heads += out // 3 // head_dim
        return {"mlp_neurons": neurons, "heads": heads}

    rows = {}
    lat0, lat_split = (latency(m, feed, args.threads, args.repeats) for m in (base, split_base))
    for name, m, secs, ref in (("unpruned", base, 0.0, lat0), ("unpruned (split qkv)", split_base, 0.0, lat_split),
                               ("onnxprune", ours.model, ours_s, lat0), ("torch-pruning", theirs, tp_s, lat_split)):
        lat = ref if name.startswith("unpruned") else latency(m, feed, args.threads, args.repeats)
        rows[name] = {"macs": count_macs(m), **widths(m), "latency_s": lat, "latency_ratio": lat / ref,
                      "prune_seconds": secs}
    for name, ref in (("onnxprune", "unpruned"), ("torch-pruning", "unpruned (split qkv)")):
        rows[name]["macs_reduction"] = 1 - rows[name]["macs"] / rows[ref]["macs"]
    out = {"model": "vit_small" if args.small else "vit_b_16", "ratio": args.ratio, "head_ratio": args.head_ratio,
           "threads": args.threads, "rows": rows,
           "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                        "torch_pruning": tp.__version__, "onnx": onnx.__version__,
                        "onnxruntime": __import__("onnxruntime").__version__, "python": platform.python_version()},
           "machine": f"{platform.machine()} {platform.processor() or ''}".strip()}
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
