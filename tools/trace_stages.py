"""Memory after each stage of a staged statistics run: resident and anonymous memory of the process
(/proc/self/smaps_rollup) beside what the frontier holds in memory and has spilled, so memory the frontier does
not account for shows up stage by stage (Linux only).

    python tools/trace_stages.py MODEL DATA [--budget 2G] [--batch-size 8] [--stages 3] [--trim]
                                 [--keep maps|heap|arena] [--mmap-threshold BYTES]

`--trim` calls glibc's malloc_trim(0) after each stage (if the figures do not move, the memory is in use, not
free heap). `--keep` says how the frontier keeps a tensor: `maps` as onnxprune does (runtime.stages.kept_copy:
a copy in an anonymous map of its own), `heap` a numpy copy, `arena` onnxruntime's own array (borrowing the
shared arena: the code before kept_copy). `--mmap-threshold` fixes glibc's mmap threshold (mallopt) first.
docs/BENCHMARKS.md ("Calibration at real sizes") quotes it on SmolLM2 with 262k tokens.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def smaps() -> dict[str, int]:
    """MiB of the process's resident and anonymous memory."""
    out = {}
    for line in open("/proc/self/smaps_rollup"):
        key = line.split(":")[0]
        if key in ("Rss", "Anonymous"):
            out[key] = int(line.split()[1]) >> 10
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("--budget", default="2G")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--stages", type=int, default=3, help="stop after this many stages")
    parser.add_argument("--trim", action="store_true")
    parser.add_argument("--keep", choices=["maps", "heap", "arena"], default="maps")
    parser.add_argument("--mmap-threshold", type=int, help="glibc M_MMAP_THRESHOLD in bytes (mallopt)")
    args = parser.parse_args()
    if args.mmap_threshold is not None:
        ctypes.CDLL("libc.so.6").mallopt(-3, args.mmap_threshold)  # -3: M_MMAP_THRESHOLD

    from onnxprune.evaluate.data import load_data
    from onnxprune.io.model_io import load_model
    from onnxprune.pipeline.prepare import prepare
    from onnxprune.pipeline.statistics import channel_stats
    from onnxprune.runtime import stages

    model = load_model(args.model)
    prep = prepare(model, gqa_mode="auto", head_share=0.2)
    feeds = list(load_data(args.data, model, batch_size=args.batch_size).batches())
    real_step, done = stages.StagedRun.step, [0]

    class Enough(Exception):
        pass

    def step(self):
        yield from real_step(self)
        done[0] += 1
        if args.trim:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        memory = smaps()
        print(f"stage {done[0]}: RSS {memory['Rss']} MiB, anonymous {memory['Anonymous']} MiB, frontier in "
              f"memory {self.store.in_memory >> 20} MiB, spilled {self.store.spilled >> 20} MiB", flush=True)
        if done[0] >= args.stages:
            raise Enough

    stages.StagedRun.step = step
    if args.keep == "heap":
        stages.kept_copy = lambda value: value.copy()
    elif args.keep == "arena":
        stages.kept_copy = lambda value: value
    try:
        channel_stats(prep, feeds, memory_budget=stages.parse_bytes(args.budget), staged=True)
    except Enough:
        pass


if __name__ == "__main__":
    main()
