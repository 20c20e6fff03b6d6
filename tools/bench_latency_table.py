"""Latency tables measured by two code versions side by side: time to build, and how far their ratios differ.

Each table is built in a child process with PYTHONPATH set to one checkout (into a cache folder of its own, so
neither reads the other's table); the versions alternate per model. For each group and probed count the two
measured latency ratios are compared: the mean and largest absolute difference, beside each table's own noise.

    git worktree add /tmp/before <commit>
    python tools/bench_latency_table.py --before /tmp/before --models mobilenet_v2,efficientnet_b0 --batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(name: str, batch: int, cache: str) -> dict:
    import onnxprune  # first, from PYTHONPATH's checkout: bench_latency puts this checkout on sys.path
    from onnxprune.io.model_io import load_model
    from onnxprune.latency.measure import LatencySettings, latency_feed
    from onnxprune.latency.table import build_table
    from onnxprune.pipeline.prepare import prepare

    sys.path.append(str(ROOT / "tools"))
    from bench_latency import dataset_for, model_path

    model = load_model(model_path(name))
    prep = prepare(model)
    data, _ = dataset_for(name, model, 8)
    feed = latency_feed(prep.model, batch, None, list(data.feeds)[:1])
    start = time.perf_counter()
    table = build_table(prep, model, feed, LatencySettings(batch=batch, threads=1), cache)
    return {"code": str(Path(onnxprune.__file__).parent.parent), "seconds": time.perf_counter() - start, "base_ms": table.base_ms, "noise": table.noise,
            "curves": {str(r): dict(zip(map(str, c.counts), c.ratios)) for r, c in table.curves.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="checkout of the older code (e.g. a git worktree)")
    parser.add_argument("--after", default=str(ROOT))
    parser.add_argument("--models", default="mobilenet_v2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "BATCH", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.child[2])))
        return
    if not args.before:
        parser.error("--before CHECKOUT is required")
    rows = []
    for name in args.models.split(","):
        got = {}
        for code, checkout in (("before", args.before), ("after", args.after)):
            with tempfile.TemporaryDirectory() as cache:
                env = dict(os.environ, PYTHONPATH=str(Path(checkout).resolve()))
                out = subprocess.run([sys.executable, __file__, "--child", name, str(args.batch), cache], env=env,
                                     capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(f"{code} ({checkout}) failed on {name}:\n{out.stderr[-2000:]}")
                got[code] = json.loads(out.stdout.strip().splitlines()[-1])
                if Path(got[code]["code"]).resolve() != Path(checkout).resolve():
                    raise SystemExit(f"{code}: the child ran the code in {got[code]['code']}, not {checkout}")
        diffs = [abs(r - got["after"]["curves"].get(root, {}).get(k, float("nan")))
                 for root, curve in got["before"]["curves"].items() for k, r in curve.items()]
        diffs = [d for d in diffs if d == d]
        row = {"model": name, "batch": args.batch, "probes": len(diffs),
               "before_s": got["before"]["seconds"], "after_s": got["after"]["seconds"],
               "before_noise": got["before"]["noise"], "after_noise": got["after"]["noise"],
               "mean_abs_diff": sum(diffs) / max(len(diffs), 1), "max_abs_diff": max(diffs, default=0.0)}
        rows.append(row)
        print(f"{name} batch {args.batch}: table {row['before_s']:.0f} s -> {row['after_s']:.0f} s "
              f"({row['before_s'] / row['after_s']:.1f}x); {row['probes']} probes, ratio difference mean "
              f"{row['mean_abs_diff']:.3f} max {row['max_abs_diff']:.3f}; noise {row['before_noise']:.3f} / "
              f"{row['after_noise']:.3f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
