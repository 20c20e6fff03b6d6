"""Peak memory and time of pruning a LLaMA-like decoder of over 3 GB of weights (external data), each run in a
child process, against the time to merely copy its files (the I/O floor).

The model is made once by tools/llama_export.py (random weights; 16 layers, hidden 2048, MLP 5504, 16 query
and 4 key/value heads, vocabulary 32000: 3.36 GB of float32) and cached under .cache/llama3g/. Runs:

  prune     `onnxprune prune model.onnx --ratio 0.3` (no data: l1 scores)
  data      `onnxprune prune model.onnx --ratio 0.3 --data calib.npz --recover lstsq` on `--tokens` (default 4
            sequences of 32 tokens; hybrid scores with 5,504-wide Gram matrices, least-squares refits)
  pass      one plain onnxruntime pass of the model over the same `--tokens`, a sequence per run (the floor any
            data-aware prune stands on: it runs the model about three times)
  onnx-ir   `onnx_ir.load` + `onnx_ir.save` of the same model (what a switch of representation would cost)
  graphsurgeon  `onnx_graphsurgeon.import_onnx(onnx.load(...))` (its documented way in)

Peak RSS is the child's maximum resident set (resource.getrusage of a fresh grandchild).

    python tools/bench_memory.py [--runs prune,data,pass,onnx-ir,graphsurgeon] [--tokens 32x512] [--code DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / ".cache" / "llama3g" / "model.onnx"

_MEASURE = """
import resource, subprocess, sys, time
start = time.perf_counter()
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - start
print(done.stderr[-1500:], file=sys.stderr)
print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, wall)
"""

_PASS = """
import sys, numpy as np, onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
ids = np.load(sys.argv[2])["input_ids"]
for row in ids:
    session.run(None, {"input_ids": row[None], "attention_mask": np.ones_like(row[None])})
"""

_ONNX_IR = """
import sys, onnx_ir as ir
model = ir.load(sys.argv[1])
ir.save(model, sys.argv[2], external_data=sys.argv[2].rsplit('/', 1)[-1] + '.data')
"""

_GRAPHSURGEON = """
import sys, onnx, onnx_graphsurgeon as gs
graph = gs.import_onnx(onnx.load(sys.argv[1]))
print(len(graph.nodes))
"""


def measure(cmd: list[str], env: dict | None = None) -> dict:
    # run from the checkout being measured: `python -m` puts the working directory first on sys.path
    cwd = env["PYTHONPATH"] if env else None
    done = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, env=env, cwd=cwd)
    rc, peak, wall = done.stdout.strip().splitlines()[-1].split()
    return {"rc": int(rc), "peak_rss_gib": int(peak) / 2**30, "wall_s": float(wall),
            "stderr": done.stderr.strip().splitlines()[-1:] if int(rc) else []}


def calibration(path: Path, tokens: str = "4x32") -> Path:
    """Random token ids, `tokens` = SEQUENCESxLENGTH."""
    import numpy as np

    sequences, length = (int(n) for n in tokens.lower().split("x"))
    ids = np.random.default_rng(0).integers(0, 32000, (sequences, length)).astype(np.int64)
    np.savez(path, input_ids=ids, attention_mask=np.ones_like(ids))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="prune,data,onnx-ir,graphsurgeon")
    parser.add_argument("--code", default=str(ROOT), help="checkout of onnxprune to run (PYTHONPATH)")
    parser.add_argument("--tokens", default="4x32", help="calibration of the data and pass runs: SEQUENCESxLENGTH")
    args = parser.parse_args()
    if not MODEL.exists():
        subprocess.run([sys.executable, str(ROOT / "tools" / "llama_export.py"), "-o", str(MODEL)], check=True)
    weights = sum(f.stat().st_size for f in MODEL.parent.iterdir() if f.name.startswith("model.onnx"))
    env = dict(os.environ, PYTHONPATH=str(Path(args.code).resolve()))
    rows = {"weights_gib": weights / 2**30}
    with tempfile.TemporaryDirectory(dir=MODEL.parent, prefix="bench-") as tmp:
        start = time.perf_counter()
        for f in MODEL.parent.iterdir():
            if f.name.startswith("model.onnx"):
                shutil.copyfile(f, Path(tmp) / f.name)
        os.sync()
        rows["copy_s"] = time.perf_counter() - start
        for f in Path(tmp).iterdir():
            f.unlink()
        out = Path(tmp) / "pruned.onnx"
        cli = [sys.executable, "-m", "onnxprune.cli", "prune", str(MODEL), "--ratio", "0.3", "-o", str(out),
               "--overwrite"]
        for run in args.runs.split(","):
            if run == "prune":
                rows[run] = measure(cli, env)
                rows[run]["output_gib"] = sum(f.stat().st_size for f in Path(tmp).iterdir()) / 2**30
            elif run == "data":
                rows[run] = measure(cli + ["--data", str(calibration(Path(tmp) / "calib.npz", args.tokens)),
                                           "--recover", "lstsq",
                                           "--json", str(Path(tmp) / "report.json")], env)
                if rows[run]["rc"] == 0:
                    report = json.loads((Path(tmp) / "report.json").read_text())
                    rows[run]["passes"] = report["stats"].get("passes")
            elif run == "pass":
                rows[run] = measure([sys.executable, "-c", _PASS, str(MODEL),
                                     str(calibration(Path(tmp) / "calib.npz", args.tokens))])
            elif run == "onnx-ir":
                rows[run] = measure([sys.executable, "-c", _ONNX_IR, str(MODEL), str(Path(tmp) / "ir.onnx")])
            elif run == "graphsurgeon":
                rows[run] = measure([sys.executable, "-c", _GRAPHSURGEON, str(MODEL)])
            else:
                raise SystemExit(f"unknown run {run}")
            r = rows[run]
            print(f"{run:13s} rc {r['rc']}  peak RSS {r['peak_rss_gib']:.2f} GiB "
                  f"({r['peak_rss_gib'] * 2**30 / weights:.2f}x the weights)  wall {r['wall_s']:.1f} s "
                  f"({r['wall_s'] / rows['copy_s']:.1f}x the copy)", flush=True)
            for f in Path(tmp).iterdir():
                if f.is_file() and f.suffix != ".npz":
                    f.unlink()
    rows["tokens"] = args.tokens
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
