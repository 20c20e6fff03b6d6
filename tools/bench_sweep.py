"""How much a sweep saves over pruning and evaluating each recipe alone (issue 13).

The same 12 recipes of the shipped digits model (3 ratios x l1/hybrid x none/lstsq), measured on its
held-out split, timed in one process, best of `--repeats` interleaved rounds:
  shared      the candidate code (onnxprune.sweep.candidate.execute) after compute_shared: normalisation,
              analysis, activation statistics and scores once for all (its time included)
  alone       the same candidate code, each recipe doing all of its own work
  sweep       run_sweep as `onnxprune sweep` runs it: shared work, candidates, the original measured, records,
              models, JSON, CSV and the plot written
  commands    `onnxprune prune --recipe` then `onnxprune eval` per recipe, a process each, as by hand

    python tools/bench_sweep.py --repeats 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20, help="timed latency runs per candidate")
    parser.add_argument("--skip-commands", action="store_true")
    args = parser.parse_args()

    from onnxprune.evaluate.data import load_data
    from onnxprune.io.model_io import load_model
    from onnxprune.recipe import Recipe
    from onnxprune.sweep import Measure, run_sweep
    from onnxprune.sweep.candidate import SweepContext, compute_shared, execute
    from onnxprune.sweep.grid import Grid, expand

    model_path = MODELS / "digits_cnn.onnx"
    original = load_model(model_path)
    calib = load_data(MODELS / "digits_calib.npz", original)
    held = load_data(MODELS / "digits_heldout.npz", original)
    grid = Grid(lists={"ratio": [0.25, 0.5, 0.75], "criterion": ["l1", "hybrid"], "recover": ["none", "lstsq"]})
    recipes, _ = expand(Recipe(), grid, has_data=True)
    measure = Measure(warmup=2, runs=args.runs)
    times: dict[str, list[float]] = {"shared": [], "alone": [], "sweep": [], "commands": []}
    values: dict[str, list] = {}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            result = run_sweep(model_path, recipes, Path(tmp) / "out", calibration=calib, evaluation=held,
                               measure=measure)
            times["sweep"].append(time.perf_counter() - t)
            values["sweep"] = [c["metrics"]["value"] for c in result.candidates]
        for way in ("shared", "alone"):
            t = time.perf_counter()
            context = SweepContext(original.SerializeToString(), calib, held, None, measure)
            if way == "shared":
                context.shared = compute_shared(original, recipes, calib)
            values[way] = [execute(context, r)[0]["metrics"]["value"] for r in recipes]
            times[way].append(time.perf_counter() - t)
    if not args.skip_commands:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            found = []
            for i, recipe in enumerate(recipes):
                recipe_file, out, report = (Path(tmp) / f"{i}{s}" for s in (".json", ".onnx", ".eval.json"))
                recipe_file.write_text(json.dumps(recipe.to_dict()))
                cli = [sys.executable, "-m", "onnxprune.cli"]
                subprocess.run([*cli, "prune", str(model_path), "--recipe", str(recipe_file), "--data",
                                str(MODELS / "digits_calib.npz"), "-o", str(out)], check=True, capture_output=True)
                subprocess.run([*cli, "eval", str(out), "--data", str(MODELS / "digits_heldout.npz"), "--runs",
                                str(args.runs), "--warmup", "2", "--quiet", "--json", str(report)], check=True,
                               capture_output=True)
                found.append(100 * json.loads(report.read_text())["candidate"]["accuracy"]["top1"])
            times["commands"].append(time.perf_counter() - t)
            values["commands"] = found
    same = all(v == values["sweep"] for v in values.values())
    best = {k: min(v) for k, v in times.items() if v}
    print(f"{len(recipes)} recipes; held-out accuracies identical across the ways: {same}")
    print("| way | wall s (best) | all rounds | vs shared |")
    print("|---|---|---|---|")
    for key, value in best.items():
        rounds = ", ".join(f"{x:.1f}" for x in times[key])
        print(f"| {key} | {value:.1f} | {rounds} | {value / best['shared']:.2f}x |")
    if shutil.which("uptime"):
        print(subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
