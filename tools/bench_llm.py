"""Held-out perplexity of a small GQA decoder after pruning 20 % and 30 % of its decoder parameters.

The decoder is tools/train_llm.py's (models/stdlib_llama.onnx: trained on the Python standard library's training
files), with its calibration and held-out windows (models/stdlib_calib.npz, models/stdlib_heldout.npz, from
files kept apart). Every variant prunes to a parameter budget with global allocation, in one run:

  * what: heads and neurons ("both"), attention heads only ("heads", the MLPs excluded), MLP neurons only
    ("neurons"); heads as whole KV groups (gqa-mode kv-groups) or query heads inside every group (query-heads);
  * how: onnxprune's default data-aware prune (`--criterion hybrid --recover lstsq`), and a FLAP-like baseline
    (An et al., AAAI'24: activation-fluctuation scores, `--criterion fluctuation`, and its bias compensation,
    `--recover bias`).

"Decoder parameters" are the weights of the decoder layers' linear projections (the embedding table and the
output head are not pruned and not counted). A budget the variant cannot reach (heads alone are under a quarter
of this decoder) is reported as reached.

    python tools/bench_llm.py --markdown
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = (("both", (), "kv-groups"), ("both", (), "query-heads"), ("heads", ("*mlp*",), "kv-groups"),
            ("heads", ("*mlp*",), "query-heads"), ("neurons", ("*self_attn*",), "kv-groups"))
METHODS = (("onnxprune (hybrid + lstsq)", {"criterion": "hybrid", "recover": "lstsq"}),
           ("FLAP-like (fluctuation + bias)", {"criterion": "fluctuation", "recover": "bias"}))


def decoder_params(model: onnx.ModelProto) -> int:
    """Weights of the MatMul/Gemm layers that do not write a graph output (the output head)."""
    inits = {t.name: t for t in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    total = 0
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in inits \
                and node.output[0] not in outputs:
            total += int(np.prod(inits[node.input[1]].dims))
    return total


def all_params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)


def held_out_perplexity(model, data) -> float:
    from onnxprune.evaluate.metrics import perplexity
    from onnxprune.runtime.session import run_batches

    return perplexity(run_batches(model, data, threads=2), data.feeds)["perplexity"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "stdlib_llama.onnx"))
    parser.add_argument("--calib", default=str(ROOT / "models" / "stdlib_calib.npz"))
    parser.add_argument("--heldout", default=str(ROOT / "models" / "stdlib_heldout.npz"))
    parser.add_argument("--fractions", default="0.2,0.3", help="Shares of the decoder parameters to remove.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()

    from onnxprune.evaluate.data import load_data
    from onnxprune.pipeline.prepare import prepare
    from onnxprune.pipeline.prune import prune_model
    from onnxprune.pipeline.statistics import channel_stats
    from onnxprune.report import environment

    model = onnx.load(args.model)
    calib = load_data(args.calib, model, batch_size=args.batch_size)
    held = load_data(args.heldout, model, batch_size=args.batch_size)
    dense = held_out_perplexity(model, held)
    decoder, total = decoder_params(model), all_params(model)
    print(f"dense: held-out perplexity {dense:.4f} on {len(held)} windows; {decoder:,} decoder parameters of "
          f"{total:,}; calibration {len(calib)} windows", flush=True)
    rows = []
    for variant, exclude, mode in VARIANTS:
        prep = prepare(model, exclude, gqa_mode=mode)
        stats = channel_stats(prep, calib.feeds)
        for fraction in (float(f) for f in args.fractions.split(",")):
            keep = 1.0 - fraction * decoder / total
            for method, options in METHODS:
                start = time.perf_counter()
                result = prune_model(model, prepared=prep, target_params=keep, calibration=calib, stats=stats,
                                     allocate="global", **options)
                seconds = time.perf_counter() - start
                ppl = held_out_perplexity(result.model, held)
                removed = 1.0 - decoder_params(result.model) / decoder
                rows.append({"target": fraction, "what": variant, "gqa_mode": mode, "method": method,
                             "removed": removed, "perplexity": ppl, "ratio": ppl / dense, "seconds": seconds,
                             "interface_changes": len(result.interface)})
                print(f"{fraction:.0%} {variant:8s} {mode:11s} {method:32s} removed {removed:6.1%} "
                      f"ppl {ppl:8.4f} x{ppl / dense:.4f}  {seconds:5.1f}s", flush=True)
    if args.markdown:
        print("\n| target | pruned | gqa mode | method | decoder params removed | held-out ppl | x dense | prune s |")
        print("|---|---|---|---|---|---|---|---|")
        print(f"| — | dense | — | — | 0 % | {dense:.4f} | 1.000 | — |")
        for r in rows:
            print(f"| {r['target']:.0%} | {r['what']} | {r['gqa_mode'] if r['what'] != 'neurons' else '—'} | "
                  f"{r['method']} | {r['removed']:.1%} | {r['perplexity']:.4f} | {r['ratio']:.3f} | "
                  f"{r['seconds']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"dense": dense, "decoder_params": decoder, "params": total,
                                               "rows": rows, **environment()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
