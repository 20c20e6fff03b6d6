"""Distillation after pruning (issue 18): quality before and after `--finetune`, side by side in one run.

Each step is an onnxprune CLI command in a child process (wall time and peak RSS of the child from wait4):

  digits  the shipped digits CNN and ResNet at --target-macs 0.25 with --recover lstsq, calibration
          models/digits_calib.npz: held-out accuracy (models/digits_heldout.npz) of lstsq alone, then of
          `onnxprune finetune` on that model (block-wise, then block-wise + end-to-end).
  tvdigits  the same on torchvision's ResNet-18 trained on digits at 32x32 (tools/digits_torchvision.py builds
          it into /work/cache/digits_resnet18): held-out accuracy on the 450 held-out digits.
  effnet  the same on EfficientNet-Lite0 with its ImageNet weights (tools/efficientnet_lite0.py builds it into
          /work/cache/effnet_lite0), calibrated on 512 crops of real photographs; held-out: top-1 agreement
          with the original on 256 crops of other photographs.
  smollm2 SmolLM2-135M (tools/smollm2.py builds it into /work/cache/smollm2) at --ratio R with lstsq, then
          `finetune --finetune blockwise` and `finetune --finetune end-to-end` on the block-wise result:
          held-out perplexity of each (the finetune reports measure it on --eval-data).
  stdlib_llama  the same on the shipped tiny GQA decoder (models/stdlib_llama.onnx, stdlib windows).

    python tools/bench_finetune.py digits --steps 300 --lr 1e-3
    python tools/bench_finetune.py tvdigits --steps 300 --lr 1e-3
    python tools/bench_finetune.py effnet --steps 300 --lr 1e-4
    python tools/bench_finetune.py smollm2 --ratio 0.2 --steps 10 --limit 32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
SMOL = Path(os.environ.get("SMOLLM2_DIR", "/work/cache/smollm2"))


def child(args: list[str], timeout: float, log_path: Path | None = None) -> dict:
    """Run `python -m onnxprune.cli ARGS` in a child process: exit code, wall seconds, peak RSS (GiB, wait4).

    The child's output goes to `log_path` when given (to follow a long run), else to a temporary file."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.perf_counter()
    with (open(log_path, "w+") if log_path else tempfile.TemporaryFile(mode="w+")) as log:
        proc = subprocess.Popen([sys.executable, "-m", "onnxprune.cli", *args], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        tail = log.read().strip().splitlines()[-3:]
    return {"rc": proc.returncode, "wall_s": round(time.perf_counter() - start, 1),
            "peak_rss_gib": round(usage.ru_maxrss / (1 << 20), 2), "tail": tail}


EFFNET = Path(os.environ.get("EFFNET_LITE0_DIR", "/work/cache/effnet_lite0"))
TVDIGITS = Path(os.environ.get("DIGITS_RESNET18_DIR", "/work/cache/digits_resnet18"))


def classifiers(args) -> list[dict]:
    """lstsq alone, + block-wise, + block-wise and end-to-end at --target-macs (0.25): held-out top-1 (digits:
    accuracy on the held-out digits; effnet: agreement with the original on crops of held-out photographs)."""
    if args.what == "digits":
        entries = [(name, MODELS / f"{name}.onnx", MODELS / "digits_calib.npz", MODELS / "digits_heldout.npz")
                   for name in ("digits_cnn", "digits_resnet")]
    elif args.what == "tvdigits":  # tools/digits_torchvision.py
        entries = [("digits_resnet18", TVDIGITS / "digits_resnet18.onnx", TVDIGITS / "calib.npz",
                    TVDIGITS / "heldout.npz")]
    else:  # tools/efficientnet_lite0.py
        entries = [("efficientnet_lite0", EFFNET / "efficientnet_lite0.onnx", EFFNET / "calib.npz",
                    EFFNET / "heldout.npz")]
    rows = []
    work = Path(args.work)
    for name, model, calib, held in entries:
        pruned = work / f"{name}.lstsq.onnx"
        run = child(["prune", str(model), "--target-macs", str(args.target_macs), "--recover", "lstsq",
                     "--data", str(calib),
                     "--eval-data", str(held), "-o", str(pruned), "--overwrite", "--json", str(pruned) + ".json"],
                    args.timeout, Path(str(pruned) + ".log"))
        report = json.loads(Path(str(pruned) + ".json").read_text())
        quality = report["quality"]["evaluation"]
        rows.append({"model": name, "variant": "lstsq", "held_out": quality["after"], "dense": quality["before"],
                     "calibration": report["quality"]["calibration"]["after"],
                     "macs_kept": report["stats"]["macs_after"] / report["stats"]["macs_before"], **_run(run)})
        print(json.dumps(rows[-1]), flush=True)
        for mode in ("blockwise", "both"):
            out = work / f"{name}.{mode}.onnx"
            run = child(["finetune", str(pruned), "--teacher", str(model), "--data", str(calib),
                         "--finetune", mode, "--finetune-steps", str(args.steps), "--finetune-lr", str(args.lr),
                         "--finetune-batch-size", "32", "-o", str(out), "--overwrite", "--json", str(out) + ".json"],
                        args.timeout, Path(str(out) + ".log"))
            rows.append({"model": name, "variant": f"lstsq + {mode}", **_measured(out, held, args.timeout),
                         **_run(run), **_finetune(Path(str(out) + ".json"))})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _measured(model: Path, held: Path, timeout: float) -> dict:
    """Held-out top-1 of `model` on `held` (onnxprune eval)."""
    out = Path(str(model) + ".eval.json")
    child(["eval", str(model), "--data", str(held), "--no-latency", "--quiet", "--json", str(out)], timeout)
    data = json.loads(out.read_text())
    return {"held_out": _find(data, "top1") * 100}


def _find(data, key):
    if isinstance(data, dict):
        if key in data and isinstance(data[key], (int, float)):
            return data[key]
        for value in data.values():
            found = _find(value, key)
            if found is not None:
                return found
    if isinstance(data, list):
        for value in data:
            found = _find(value, key)
            if found is not None:
                return found
    return None


def _finetune(path: Path) -> dict:
    report = json.loads(path.read_text())["finetune"]
    q = report["quality"]
    return {"split_held_out": f"{q['held_out']['before']:.4g} -> {q['held_out']['after']:.4g}",
            "calibration": q["calibration"]["after"], "rolled_back": report["rolled_back"]}


def _run(run: dict) -> dict:
    return {"wall_s": run["wall_s"], "peak_rss_gib": run["peak_rss_gib"], "rc": run["rc"]}


def decoder(args) -> list[dict]:
    """A causal LM: lstsq alone, + block-wise, + end-to-end (on the block-wise result), held-out perplexity."""
    work = Path(args.work)
    if args.what == "smollm2":
        name, model, cal, held = "smollm2", SMOL / "smollm2.onnx", SMOL / args.calibration, SMOL / "smollm2_heldout.npz"
        train = SMOL / (args.train or args.calibration)
    else:
        name, model = "stdlib_llama", MODELS / "stdlib_llama.onnx"
        cal, held = MODELS / "stdlib_calib.npz", MODELS / "stdlib_heldout.npz"
        train = cal
    rows = []
    for ratio in args.ratio:
        tag = f"{name}_{ratio}" + "".join(args.prune_args.split()).replace("-", "_")
        pruned = work / f"{tag}_lstsq.onnx"
        if not pruned.exists():
            run = child(["prune", str(model), "--ratio", str(ratio), "--recover", "lstsq", "--data", str(cal),
                         *args.prune_args.split(), "--batch-size", "8", "-o", str(pruned),
                         "--json", str(pruned) + ".json"], args.timeout, Path(str(pruned) + ".log"))
            rows.append({"model": name, "ratio": ratio, "variant": "lstsq (prune)", **_run(run)})
            print(json.dumps(rows[-1]), flush=True)
        previous = pruned
        for mode in ("blockwise", "end-to-end"):
            out = work / f"{tag}_{mode}.onnx"
            steps = args.e2e_steps if mode == "end-to-end" and args.e2e_steps else args.steps
            lr = args.e2e_lr if mode == "end-to-end" and args.e2e_lr else args.lr
            budget = ["--memory-budget", "2G"] if name == "smollm2" else []
            run = child(["finetune", str(previous), "--teacher", str(model), "--data", str(train), "--limit",
                         str(args.limit), "--eval-data", str(held), *budget, "--batch-size", "4", "--finetune", mode,
                         "--finetune-steps", str(steps), "--finetune-lr", str(lr),
                         "--finetune-batch-size", "4", "-o", str(out), "--overwrite",
                         "--json", str(out) + ".json"], args.timeout, Path(str(out) + ".log"))
            row = {"model": name, "ratio": ratio, "variant": f"+ {mode}", **_run(run)}
            if run["rc"] == 0:
                report = json.loads(Path(str(out) + ".json").read_text())["finetune"]
                q = report["quality"]
                row.update(held_out_before=q["held_out"]["before"], held_out_after=q["held_out"]["after"],
                           calibration_before=q["calibration"]["before"], calibration_after=q["calibration"]["after"],
                           rolled_back=report["rolled_back"])
                previous = out
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["digits", "tvdigits", "effnet", "smollm2", "stdlib_llama"])
    parser.add_argument("--work", default="/work/cache/distill")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ratio", type=float, action="append")
    parser.add_argument("--target-macs", type=float, default=0.25, help="digits, tvdigits, effnet: MACs kept")
    parser.add_argument("--e2e-steps", type=int, default=None, help="end-to-end steps (default: --steps)")
    parser.add_argument("--e2e-lr", type=float, default=None, help="end-to-end learning rate (default: --lr)")
    parser.add_argument("--limit", type=int, default=32, help="smollm2: calibration windows trained on")
    parser.add_argument("--calibration", default="smollm2_calib_16k.npz")
    parser.add_argument("--train", default=None, help="smollm2: the windows finetune trains on (default: --calibration)")
    parser.add_argument("--prune-args", default="", help="more prune options, e.g. '--head-ratio 0'")
    parser.add_argument("--timeout", type=float, default=1500)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    rows = classifiers(args) if args.what in ("digits", "tvdigits", "effnet") else decoder(args)
    for row in rows:
        print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
