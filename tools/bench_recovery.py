"""Benchmark: held-out accuracy against MAC reduction, with and without retraining-free recovery.

For each digits model (the shipped `digits_cnn.onnx` and the residual `digits_resnet.onnx`) and each MAC
reduction, onnxprune prunes with a MAC budget (`target_macs = 1 / reduction`) using
  l1            L1 weight scores, no recovery
  activation    mean |activation| scores, no recovery
  l1+bias       L1, removed channels' means folded into the next layers' biases (FLAP)
  l1+lstsq      L1, every affected layer refit by ridge least squares on calibration data
  hybrid+lstsq  |W|*||X|| scores, least-squares refit
and Torch-Pruning (MagnitudePruner, L1, one-shot, no fine-tuning) prunes the same PyTorch weights with its
per-layer ratio bisected until its MACs (counted by onnxprune on the export) match the same reduction.
Calibration: models/digits_calib.npz (300 samples). Accuracy: models/digits_heldout.npz (450 samples).

    python tools/bench_recovery.py [--allocate uniform] [--plot docs/bench_recovery.png] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxprune.evaluate.data import load_data  # noqa: E402
from onnxprune.evaluate.metrics import accuracy
from onnxprune.graph.stats import count_macs  # noqa: E402
from onnxprune.io.model_io import load_model  # noqa: E402
from onnxprune.pipeline.prepare import prepare
from onnxprune.pipeline.prune import (
    Reuse,
    RunSettings,
    prune_model,  # noqa: E402
)
from onnxprune.pipeline.statistics import channel_stats  # noqa: E402
from onnxprune.recipe import Recipe
from onnxprune.runtime.session import run_batches  # noqa: E402

METHODS = {  # name: (criterion, recovery)
    "l1": ("l1", "none"),
    "activation": ("activation", "none"),
    "l1+bias": ("l1", "bias"),
    "l1+lstsq": ("l1", "lstsq"),
    "hybrid+lstsq": ("hybrid", "lstsq"),
}


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torch_models() -> dict:
    """The PyTorch modules behind the two ONNX files, with the shipped weights."""
    import torch

    resnet_tool = _load_tool("train_digits_resnet")
    resnet = resnet_tool.DigitsResNet()
    resnet.load_state_dict(torch.load(ROOT / "models" / "digits_resnet.pt", weights_only=True))
    models = {"digits_resnet": resnet.eval()}
    # the shipped CNN has no state_dict in git: its script retrains it deterministically
    cnn_tool = _load_tool("train_digits")
    torch.set_num_threads(1)
    models["digits_cnn"] = cnn_tool.train(*cnn_tool.make_splits()["train"], epochs=60)
    return models


def export_macs(module, tmp: Path) -> tuple[int, object]:
    import torch

    path = tmp / "tp.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    model = load_model(path)
    return count_macs(model), model


def torch_pruning_l1(module, reduction: float, macs_before: int, tmp: Path) -> tuple[float, object]:
    """Bisect Torch-Pruning's uniform ratio until the export's MACs reach `macs_before / reduction`."""
    import torch
    import torch_pruning as tp

    def pruned_at(ratio: float):
        m = copy.deepcopy(module)
        last = [x for x in m.modules() if isinstance(x, torch.nn.Linear)][-1]
        pruner = tp.pruner.MagnitudePruner(m, torch.zeros(1, 1, 8, 8), importance=tp.importance.MagnitudeImportance(p=1),
                                           pruning_ratio=ratio, ignored_layers=[last])
        pruner.step()
        return m.eval()

    lo, hi, best = 0.0, 0.95, None
    target = macs_before / reduction
    for _ in range(14):
        mid = (lo + hi) / 2
        macs, onnx_model = export_macs(pruned_at(mid), tmp)
        if macs <= target:
            hi, best = mid, (macs, onnx_model)
        else:
            lo = mid
    if best is None:
        best = export_macs(pruned_at(hi), tmp)
    return macs_before / best[0], best[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits_cnn,digits_resnet")
    parser.add_argument("--reductions", default="1.25,1.5,2,3")
    parser.add_argument("--allocate", default="uniform", choices=["uniform", "global"])
    parser.add_argument("--no-torch", action="store_true", help="Skip the Torch-Pruning rows.")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "bench_recovery.png")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    reductions = [float(r) for r in args.reductions.split(",")]
    names = args.models.split(",")
    modules = {} if args.no_torch else torch_models()
    results = {}
    for name in names:
        model = load_model(ROOT / "models" / f"{name}.onnx")
        calib = load_data(ROOT / "models" / "digits_calib.npz", model, batch_size=100)
        held = load_data(ROOT / "models" / "digits_heldout.npz", model, batch_size=450)

        def acc(m, ds=held) -> float:
            return 100 * accuracy(run_batches(m, ds), ds.labels, (1,))["top1"]

        prep = prepare(model)
        stats = channel_stats(prep, calib.feeds, source=calib.source)
        entry = {"baseline": acc(model), "baseline_calib": acc(model, calib), "rows": {}}
        for method, (criterion, recovery) in METHODS.items():
            row = []
            for red in reductions:
                t0 = time.perf_counter()
                r = prune_model(model, Recipe(criterion=criterion, recover=recovery, target_macs=1 / red, allocate=args.allocate), RunSettings(calibration=calib, reuse=Reuse(prepared=prep, stats=stats)))
                row.append({"target": red, "reduction": r.stats["macs_before"] / r.stats["macs_after"],
                            "heldout": acc(r.model), "calib": acc(r.model, calib),
                            "seconds": time.perf_counter() - t0})
            entry["rows"][method] = row
            print(name, method, " ".join(f"{c['reduction']:.2f}x:{c['heldout']:.2f}" for c in row), flush=True)
        if name in modules:
            row = []
            with tempfile.TemporaryDirectory() as tmp:
                ref_macs, ref_onnx = export_macs(modules[name], Path(tmp))
                torch_base = acc(ref_onnx)
                for red in reductions:
                    achieved, pruned = torch_pruning_l1(modules[name], red, ref_macs, Path(tmp))
                    row.append({"target": red, "reduction": achieved, "heldout": acc(pruned),
                                "calib": acc(pruned, calib)})
            entry["rows"]["torch-pruning l1"] = row
            entry["torch_baseline"] = torch_base
            print(name, "torch-pruning l1", " ".join(f"{c['reduction']:.2f}x:{c['heldout']:.2f}" for c in row),
                  f"(torch model baseline {torch_base:.2f})", flush=True)
        results[name] = entry
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print_markdown(results, reductions)
    plot(results, args.plot)


def print_markdown(results: dict, reductions: list[float]) -> None:
    for name, entry in results.items():
        print(f"\n**{name}** — unpruned held-out accuracy {entry['baseline']:.2f}% "
              f"(calibration {entry['baseline_calib']:.2f}%)\n")
        print("| method | " + " | ".join(f"{r:g}x fewer MACs" for r in reductions) + " |")
        print("|---|" + "---|" * len(reductions))
        for method, row in entry["rows"].items():
            cells = [f"{c['heldout']:.2f} ({c['calib']:.2f}) @{c['reduction']:.2f}x" for c in row]
            print(f"| {method} | " + " | ".join(cells) + " |")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, (name, entry) in zip(axes[0], results.items()):
        for method, row in entry["rows"].items():
            style = "--" if method.startswith("torch") else "-"
            ax.plot([c["reduction"] for c in row], [c["heldout"] for c in row], style, marker="o", label=method)
        ax.axhline(entry["baseline"], color="grey", lw=0.8, ls=":", label="unpruned")
        ax.set_xlabel("MAC reduction (x)")
        ax.set_ylabel("held-out top-1 accuracy (%)")
        ax.set_title(f"{name}: pruning without retraining (300 calibration samples)", fontsize=9)
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
