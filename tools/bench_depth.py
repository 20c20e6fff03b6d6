"""Depth vs width pruning on SmolLM2-135M (issue 19): held-out perplexity at a share of decoder-layer parameters.

Each configuration runs `onnxprune prune` (calibration data, --recover lstsq) under /usr/bin/time -v (wall time,
peak RSS of the child), then `onnxprune eval --metric perplexity` on the held-out windows. The share of
decoder-layer parameters removed is (params before - params after) / the parameters of the 30 decoder layers
(embeddings and LM head are never pruned here). The model and data come from tools/smollm2.py
(/work/cache/smollm2/). One JSON line per configuration is appended to --out.

    python tools/bench_depth.py --configs depth20,depth30,both20,width20 --out /work/cache/smollm2/depth.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

CONFIGS = {  # name -> prune options (besides --data, --recover lstsq)
    "dense": None,
    "width20": ["--ratio", "0.2"],
    "width30": ["--ratio", "0.3"],
    "depth20": ["--drop-blocks", "6"],   # 6 of 30 layers
    "depth30": ["--drop-blocks", "9"],   # 9 of 30 layers
    "both20": ["--drop-blocks", "3", "--ratio", "0.1"],
    "both30": ["--drop-blocks", "5", "--ratio", "0.15"],
}


def decoder_layer_params(path: Path) -> int:
    """Parameters of the decoder layers: all but the embedding table, the LM head and the final norm (the
    tensors of vocabulary size, and 1-D tensors outside layers.N)."""
    model = onnx.load(str(path), load_external_data=False)
    vocab = max(int(d) for t in model.graph.initializer for d in t.dims[:1]) if model.graph.initializer else 0
    total = 0
    for t in model.graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        if vocab in tuple(t.dims) or (len(t.dims) == 1 and "layers." not in t.name):
            continue
        total += n
    return total


def timed(cmd: list[str], log: Path) -> tuple[int, float, int]:
    start = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", log.read_text())
    return rc, wall, int(rss.group(1)) * 1024 if rss else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="/work/cache/smollm2/smollm2.onnx")
    ap.add_argument("--calib", default="/work/cache/smollm2/smollm2_calib_16k.npz")
    ap.add_argument("--heldout", default="/work/cache/smollm2/smollm2_heldout.npz")
    ap.add_argument("--workdir", default="/work/cache/smollm2/depth")
    ap.add_argument("--configs", default="depth20,depth30,both20,both30,width20,width30")
    ap.add_argument("--out", default="/work/cache/smollm2/depth.jsonl")
    ap.add_argument("--timeout", type=int, default=1500, help="seconds per prune")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    layers = decoder_layer_params(Path(args.model))
    py = [sys.executable, "-m", "onnxprune.cli"]
    for name in args.configs.split(","):
        options = CONFIGS[name]
        record: dict = {"config": name, "options": options, "decoder_layer_params": layers}
        model = Path(args.model)
        if options is not None:
            model = work / f"{name}.onnx"
            report = work / f"{name}.json"
            cmd = [*py, "prune", args.model, "--data", args.calib, "--recover", "lstsq", "--batch-size", "8",
                   *options, "-o", str(model), "--overwrite", "--json", str(report)]
            record["command"] = " ".join(cmd[2:])
            rc, wall, rss = timed(["timeout", str(args.timeout), *cmd], work / f"{name}.prune.log")
            record.update(prune_rc=rc, prune_seconds=round(wall, 1), prune_peak_rss=rss)
            if rc != 0:
                print(json.dumps(record), file=open(args.out, "a"))
                continue
            data = json.loads(report.read_text())
            stats = data["stats"]
            record.update(params_before=stats["params_before"], params_after=stats["params_after"],
                          removed_share=round((stats["params_before"] - stats["params_after"]) / layers, 4),
                          dropped=(data.get("depth") or {}).get("dropped"),
                          gqa_modes_used=data.get("gqa_modes_used"))
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "eval.json"
            rc, wall, rss = timed([*py, "eval", str(model), "--data", args.heldout, "--no-latency", "--metric",
                                   "perplexity", "--batch-size", "8", "--quiet", "--json", str(out)],
                                  work / f"{name}.eval.log")
            record.update(eval_rc=rc, eval_seconds=round(wall, 1))
            if rc == 0:
                result = json.loads(out.read_text())
                record["perplexity"] = _find(result, "perplexity")
        print(json.dumps(record), file=open(args.out, "a"))
        print(json.dumps(record), flush=True)


def _find(tree, key):
    if isinstance(tree, dict):
        if key in tree and isinstance(tree[key], (int, float)):
            return tree[key]
        for v in tree.values():
            found = _find(v, key)
            if found is not None:
                return found
    if isinstance(tree, list):
        for v in tree:
            found = _find(v, key)
            if found is not None:
                return found
    return None


if __name__ == "__main__":
    main()
