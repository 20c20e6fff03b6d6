"""Depth vs width pruning on SmolLM2-135M (issue 19): held-out perplexity at a share of decoder-layer parameters.

Each configuration prunes in a child process through the Python API (prune_model with calibration data and
--recover lstsq, as `onnxprune prune --data CAL --recover lstsq` does, without the CLI's quality table, whose
logits of every calibration window would be held in memory) under /usr/bin/time -v (wall time, peak RSS), then
measures held-out perplexity batch by batch in another child (the negative log-likelihood of every next token;
no logits kept beyond a batch). The share of decoder-layer parameters removed is (params before - params after)
/ the parameters of the decoder layers (embeddings and LM head are never pruned here). Model and data come from
tools/smollm2.py (/work/cache/smollm2/). One JSON line per configuration is appended to --out.

    python tools/bench_depth.py --configs dense,depth20,depth30 --out /work/cache/smollm2/depth.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx

CONFIGS = {  # name -> recipe fields (besides recover=lstsq)
    "dense": None,
    "width20": {"ratio": 0.2},
    "width30": {"ratio": 0.3},
    "depth20": {"drop_blocks": 6},   # 6 of 30 layers
    "depth30": {"drop_blocks": 9},   # 9 of 30 layers
    "both20": {"drop_blocks": 3, "ratio": 0.1},
    "both30": {"drop_blocks": 5, "ratio": 0.15},
}

PRUNE = """
import json, sys
from onnxprune.evaluate.data import load_data
from onnxprune.io.model_io import load_model, save_model
from onnxprune.pipeline.prune import prune_model
model, calib, out, fields = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
original = load_model(model)
data = load_data(calib, original, batch_size=8)
result = prune_model(original, recover="lstsq", calibration=data, **fields)
save_model(result.model, out)
json.dump({"stats": result.stats, "depth": result.depth, "notes": result.notes,
           "recipe": result.recipe.to_dict()}, open(out + ".json", "w"))
"""

PERPLEXITY = """
import json, sys
import numpy as np
from onnxprune.runtime.session import internal_session
from onnxprune.io.model_io import load_model
model, data = load_model(sys.argv[1]), np.load(sys.argv[2])
sess = internal_session(model, prepack=False)
ids, mask = data["input_ids"], data["attention_mask"]
nll, count = 0.0, 0
for i in range(0, len(ids), 8):
    logits = sess.run(["logits"], {"input_ids": ids[i:i + 8], "attention_mask": mask[i:i + 8]})[0]
    logits = logits[:, :-1].astype(np.float64)
    target = ids[i:i + 8, 1:]
    keep = mask[i:i + 8, 1:].astype(bool)
    top = logits.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]
    picked = np.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
    nll += float((logz - picked)[keep].sum())
    count += int(keep.sum())
print(json.dumps({"tokens": count, "nll": nll / count, "perplexity": float(np.exp(nll / count))}))
"""


def decoder_layer_params(path: Path) -> int:
    """Parameters of the decoder layers: all but the tensors of vocabulary size (embedding table, LM head) and
    the 1-D tensors outside layers.N (the final norm)."""
    model = onnx.load(str(path), load_external_data=False)
    vocab = max(int(d) for t in model.graph.initializer for d in t.dims[:1])
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer
               if vocab not in tuple(t.dims) and not (len(t.dims) == 1 and "layers." not in t.name))


def timed(cmd: list[str], log: Path) -> tuple[int, float, int, str]:
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=subprocess.PIPE, stderr=f, text=True,
                              check=False)
    wall = time.perf_counter() - start
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", log.read_text())
    return proc.returncode, wall, int(rss.group(1)) * 1024 if rss else 0, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="/work/cache/smollm2/smollm2.onnx")
    ap.add_argument("--calib", default="/work/cache/smollm2/smollm2_calib_16k.npz")
    ap.add_argument("--heldout", default="/work/cache/smollm2/smollm2_heldout.npz")
    ap.add_argument("--workdir", default="/work/cache/smollm2/depth")
    ap.add_argument("--configs", default="dense,depth20,depth30,both20,width20,both30,width30")
    ap.add_argument("--out", default="/work/cache/smollm2/depth.jsonl")
    ap.add_argument("--timeout", type=int, default=1500, help="seconds per prune")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    layers = decoder_layer_params(Path(args.model))
    for name in args.configs.split(","):
        fields = CONFIGS[name]
        record: dict = {"config": name, "recipe": fields, "decoder_layer_params": layers}
        model = Path(args.model)
        if fields is not None:
            model = work / f"{name}.onnx"
            rc, wall, rss, _ = timed(["timeout", str(args.timeout), sys.executable, "-c", PRUNE, args.model,
                                      args.calib, str(model), json.dumps(fields)], work / f"{name}.prune.log")
            record.update(prune_rc=rc, prune_seconds=round(wall, 1), prune_peak_rss=rss)
            if rc != 0:
                _append(args.out, record)
                continue
            report = json.loads(Path(str(model) + ".json").read_text())
            stats = report["stats"]
            record.update(params_before=stats["params_before"], params_after=stats["params_after"],
                          removed_share=round((stats["params_before"] - stats["params_after"]) / layers, 4),
                          dropped=(report.get("depth") or {}).get("dropped"), notes=report["notes"])
        rc, wall, rss, out = timed([sys.executable, "-c", PERPLEXITY, str(model), args.heldout],
                                   work / f"{name}.eval.log")
        record.update(eval_rc=rc, eval_seconds=round(wall, 1), eval_peak_rss=rss)
        if rc == 0:
            record.update(json.loads(out.strip().splitlines()[-1]))
        _append(args.out, record)


def _append(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
