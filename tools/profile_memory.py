"""Where the memory goes: peak RSS of one `onnxprune prune` run, step by step, for any checkout of onnxprune.

The prune runs in a child process (PYTHONPATH = --code, so an old commit can be measured beside the current
one) with a thread that samples the process's resident set every 10 ms together with the main thread's stack.
Each sample is charged to a *step*: the innermost onnxprune function on the stack, followed by the library it
is inside at that moment (onnx, onnxruntime, numpy, ...) when there is one. No onnxprune function is named
here, so the same tool reads code of any age. The overall peak is the kernel's (getrusage), which also sees
spikes shorter than a sample.

    python tools/profile_memory.py MODEL [--code DIR] [--top 15] -- [prune options, e.g. --ratio 0.3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, os, resource, sys, threading, time

out_json = sys.argv[1]
argv = sys.argv[2:]
main_thread = threading.get_ident()
page = os.sysconf("SC_PAGE_SIZE")
steps = {}
done = threading.Event()


def label(frame):
    lib = None
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.startswith("onnxprune"):
            name = module.removeprefix("onnxprune.") + ":" + frame.f_code.co_name
            return name + (f" > {lib}" if lib else "")
        top = module.split(".")[0]
        if top in ("onnx", "onnxruntime", "numpy", "onnx_ir"):
            lib = top
        frame = frame.f_back
    return "(outside onnxprune)"


def sample():
    start = time.perf_counter()
    while not done.is_set():
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * page
        frame = sys._current_frames().get(main_thread)
        step = steps.setdefault(label(frame), {"peak": 0, "samples": 0, "first": time.perf_counter() - start})
        step["peak"] = max(step["peak"], rss)
        step["samples"] += 1
        done.wait(0.01)


thread = threading.Thread(target=sample, daemon=True)
thread.start()
from onnxprune.cli import main

start = time.perf_counter()
try:
    rc = main(argv)
except BaseException as exc:  # MemoryError, SystemExit: the profile up to there is still the answer
    rc = f"{type(exc).__name__}: {exc}"
wall = time.perf_counter() - start
done.set()
thread.join()
with open(out_json, "w") as f:
    json.dump({"rc": rc, "wall_s": wall, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               "steps": steps}, f)
"""


def profile(model: Path, prune_args: list[str], code: Path) -> dict:
    with tempfile.TemporaryDirectory(dir=model.parent, prefix="profile-") as tmp:
        report = Path(tmp) / "profile.json"
        argv = ["prune", str(model), *prune_args, "-o", str(Path(tmp) / "pruned.onnx"), "--overwrite"]
        env = dict(os.environ, PYTHONPATH=str(code.resolve()))
        done = subprocess.run([sys.executable, "-c", _CHILD, str(report), *argv], env=env, cwd=str(code),
                              capture_output=True, text=True)
        if not report.exists():  # killed (OOM): nothing written
            return {"rc": done.returncode, "stderr": done.stderr[-2000:], "steps": {}}
        return json.loads(report.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--code", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--top", type=int, default=15, help="steps to list, the highest peaks first")
    parser.add_argument("--json", type=Path, help="also write the whole profile here")
    args, prune_args = parser.parse_known_args()
    prune_args = [a for a in prune_args if a != "--"]
    weights = sum(f.stat().st_size for f in args.model.parent.iterdir()
                  if f.is_file() and f.name.startswith(args.model.name))
    result = profile(args.model.resolve(), prune_args, args.code)
    result["weights"] = weights
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    steps = sorted(result["steps"].items(), key=lambda kv: -kv[1]["peak"])[:args.top]
    total = sum(s["samples"] for s in result["steps"].values()) or 1
    print(f"rc {result['rc']}  wall {result.get('wall_s', float('nan')):.1f} s  peak RSS "
          f"{result.get('peak', 0) / 2**30:.2f} GiB = {result.get('peak', 0) / weights:.2f}x the weights "
          f"({weights / 2**30:.2f} GiB on disk)")
    print(f"| step (innermost onnxprune function > library) | peak RSS GiB | x weights | share of time |")
    print("|---|---|---|---|")
    for name, s in steps:
        print(f"| `{name}` | {s['peak'] / 2**30:.2f} | {s['peak'] / weights:.2f} | {100 * s['samples'] / total:.0f} % |")


if __name__ == "__main__":
    main()
