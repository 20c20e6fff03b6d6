"""Benchmark: how much does eval's latency loop add over a bare `session.run` loop?

Both loops run the same onnxruntime session (one intra-op thread, so all the work happens in this process's
calling thread) on the same feed, alternated in ABBA order for many rounds in one process, so drift (other
load, CPU frequency) hits both alike. Each round times `measure_latency(...)` as a whole (its per-run clock
reads, progress chunking and statistics included) and `for _ in range(n): session.run(None, feed)`.

Figures, per batch size, as eval-loop / bare-loop ratios (the issue's bar: at most 1.05):
  * CPU time (process_time) of the best round of each: insensitive to being descheduled on a shared
    machine, which wall time on 2 busy cores is not;
  * wall time of the best round of each (timeit's reasoning: noise only ever slows a loop down);
  * the median of the per-round wall-time ratios (each pair of loops ran back to back, under the same load).
A last row times a one-element Identity model, whose run costs next to nothing: the difference between the
loops there is the eval loop's own cost per run, which divided by a model's latency gives its overhead.

    python tools/bench_eval.py [--model models/digits_cnn.onnx] [--data models/digits_heldout.npz]
                               [--batch-sizes 1,32] [--runs 200] [--rounds 40] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import onnx

from onnxprune.evaluate.data import load_data
from onnxprune.evaluate.latency import measure_latency
from onnxprune.io.model_io import load_model
from onnxprune.report import cpu_model, environment, print_table
from onnxprune.runtime.session import open_session

ROOT = Path(__file__).resolve().parents[1]


def bare_loop(session, feed, runs: int) -> tuple[float, float, float]:
    """(wall, CPU) seconds per run of the plainest loop there is, and its wall mean again for symmetry."""
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(runs):
        session.run(None, feed)
    wall, cpu = (time.perf_counter() - w0) / runs, (time.process_time() - c0) / runs
    return wall, cpu, wall


def eval_loop(session, feed, runs: int, show_progress: bool) -> tuple[float, float, float]:
    """(wall, CPU) seconds per run of measure_latency, and the mean latency it reports."""
    w0, c0 = time.perf_counter(), time.process_time()
    result = measure_latency(session, feed, warmup=0, runs=runs, show_progress=show_progress)
    wall, cpu = (time.perf_counter() - w0) / runs, (time.process_time() - c0) / runs
    return wall, cpu, result["results"][0]["mean_ms"] / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "digits_cnn.onnx")
    parser.add_argument("--data", type=Path, default=ROOT / "models" / "digits_heldout.npz")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--runs", type=int, default=200, help="runs per loop per round")
    parser.add_argument("--rounds", type=int, default=40, help="alternations of the two loops")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--progress", action="store_true", help="eval's loop with its progress bar (a terminal only)")
    args = parser.parse_args()

    model = load_model(args.model)
    session = open_session(str(args.model), "cpu", threads=args.threads)
    cases = [(args.model.name, size, session, load_data(args.data, model, batch_size=size).feeds[0])
             for size in (int(s) for s in args.batch_sizes.split(","))]
    # a one-element Identity model: session.run costs next to nothing, so the difference between the two
    # loops is the eval loop's own cost per run, in microseconds, whatever model it times
    identity = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]> g (float[1] x) => (float[1] y) { y = Identity(x) }')
    cases.append(("Identity", 1, open_session(identity, "cpu", threads=args.threads),
                  {"x": np.zeros(1, np.float32)}))
    rows = []
    for name, size, session, feed in cases:
        for _ in range(200):  # warm caches and onnxruntime's allocator before either loop is timed
            session.run(None, feed)
        rounds: dict[str, list[tuple[float, float, float]]] = {"bare": [], "eval": []}
        for i in range(args.rounds):
            # ABBA order: whichever loop runs second in a round does not always get the warmer caches
            for which in (("bare", "eval") if i % 2 == 0 else ("eval", "bare")):
                rounds[which].append(bare_loop(session, feed, args.runs) if which == "bare"
                                     else eval_loop(session, feed, args.runs, args.progress))
        bare, ev = rounds["bare"], rounds["eval"]
        best = {k: [min(r[j] for r in v) for j in range(3)] for k, v in rounds.items()}
        rows.append({
            "model": name, "batch": size,
            "bare wall us": 1e6 * best["bare"][0], "eval wall us": 1e6 * best["eval"][0],
            "eval reports us": 1e6 * best["eval"][2],
            "CPU ratio": best["eval"][1] / best["bare"][1],
            "wall ratio": best["eval"][0] / best["bare"][0],
            "wall ratio, median": statistics.median(e[0] / b[0] for e, b in zip(ev, bare)),
            "extra CPU us/run": 1e6 * (best["eval"][1] - best["bare"][1]),
        })
    env = environment()
    print_table(rows, title=f"eval latency loop vs bare session.run ({args.rounds} rounds x {args.runs} runs "
                            f"per loop, {args.threads} onnxruntime thread(s))")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"machine: {cpu_model()}, {env['machine']['cpu_count']} cores, load average {load}; versions: "
          + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    print("ratios: eval loop / bare loop, best round of each (CPU = process_time); 'wall ratio, median': median of\n"
          "per-round ratios; 'eval reports': the mean latency eval itself reports; Identity: a float[1] Identity model")
    worst = max(r["CPU ratio"] for r in rows[:-1])
    print(f"worst CPU-time ratio {worst:.4f} -> {'within' if worst <= 1.05 else 'OVER'} the 1.05 bar")


if __name__ == "__main__":
    main()
