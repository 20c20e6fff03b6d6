"""onnxprune beside its peers on one zoo, in one run (issue 12).

Tools: onnxprune (`prune_model(ratio=0.5)`, uniform L1), onnxsim 0.8.1's `onnxsim.pruning`
(`apply_structured_pruning(sparsity=0.5)`, then `apply_attention_head_pruning(sparsity=0.5)` on what that
returns, since transformers have heads), and Torch-Pruning (`MetaPruner` + L1 magnitude, `pruning_ratio=0.5`,
the classifier ignored) on the torchvision models, exported after pruning. Zoo: the torchvision zoo
(TorchScript exports of tools/zoo.py), the shipped digits CNNs, the NHWC graphs and the timm / transformers /
YOLOv8 models of tools/zoo_libs.py.

Per model and tool: whether the tool returns a model that the full onnx.checker accepts and onnxruntime runs with
the original's output shapes (batch 2), the parameters and MACs kept, and the time the tool took. The oracle
applies to the ONNX tools alike: 30% of the channels of every group onnxprune finds are made dead (their
producers' weights and biases and their readers' weights zeroed) and each tool prunes that model at a ratio
of 0.3; a tool that removes exactly dead channels and rewires correctly leaves the outputs as they were (the
relative error is float rounding), one that removes live channels or miswires shows a large error.

    python tools/bench_peers.py [--markdown] [--names resnet18 timm/resnet18 ...] [--no-torch-pruning]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnxprune.recipe import Recipe

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as `python tools/bench_peers.py`: the checkout's root, for `tools.*` and onnxprune
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TORCHVISION = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "densenet121",
               "shufflenet_v2", "squeezenet", "googlenet", "resnext50", "regnet_y_400mf", "vgg11", "convnext_tiny")


def zoo_cases(names=None):
    """(name, family, loader, input array) for every zoo model."""
    from tests import zoo_models
    from tools import zoo, zoo_libs

    cases = []
    for name in TORCHVISION:
        cases.append((name, "torchvision", lambda n=name: onnx.load(zoo.export(n, "torchscript")),
                      zoo.example_input(name, batch=2)))
    for path in sorted((ROOT / "models").glob("*.onnx")):
        x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
        cases.append((path.stem, "shipped", lambda p=path: onnx.load(p), x))
    for name, build in zoo_models.NHWC_MODELS.items():
        cases.append((name, "nhwc", build, zoo_models.nhwc_input()))
    for name, spec in zoo_libs.LIBS.items():
        cases.append((name, spec.library, lambda n=name: onnx.load(zoo_libs.export(n)),
                      zoo_libs.example_input(name, batch=2)))
    return [c for c in cases if names is None or c[0] in names]


def runs_like(model, original, x) -> bool:
    from onnxprune.runtime.session import run

    name = original.graph.input[0].name
    try:
        onnx.checker.check_model(model, full_check=True)
        got, want = run(model, {name: x}), run(original, {name: x})
    except Exception:  # noqa: BLE001 - a model that fails here is what the column counts
        return False
    return [np.shape(g) for g in got] == [np.shape(w) for w in want]


def dead_channel_model(model):
    """The model with 30% of every prunable group's channels dead, and those channels by group root."""
    from onnxprune.pipeline.plan import plan_uniform
    from onnxprune.pipeline.prepare import prepare
    from onnxprune.testing import zero_channels

    prep = prepare(model)
    rng = np.random.default_rng(0)
    plan = plan_uniform(prep.analysis, {g.spaces[0]: rng.random(g.size) for g in prep.analysis.prunable}, 0.3)
    removed = {r: np.setdiff1d(np.arange(plan.sizes[r]), k) for r, k in plan.kept.items()}
    dead = zero_channels(prep, removed)
    inits = {t.name: t for t in dead.graph.initializer}
    arrays = {}
    for m in prep.analysis.context.members:
        if m.role != "out":
            continue
        for seg in m.layout.segments:
            chans = removed.get(prep.analysis.find(seg.space))
            if chans is None or not len(chans):
                continue
            arr = arrays.setdefault(m.tensor, numpy_helper.to_array(inits[m.tensor]).copy())
            index = [slice(None)] * arr.ndim
            index[m.axis] = seg.positions(np.asarray(chans)).ravel()
            arr[tuple(index)] = 0
    for name, arr in arrays.items():
        inits[name].CopyFrom(numpy_helper.from_array(arr, name))
    return dead, removed


def rel_err(a_list, b_list) -> float:
    worst = 0.0
    for a, b in zip(a_list, b_list):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.shape != b.shape:
            return float("inf")
        scale = float(np.max(np.abs(a))) if a.size else 0.0
        err = float(np.max(np.abs(a - b))) if a.size else 0.0
        worst = max(worst, err / scale if scale else err)
    return worst


def run_onnxprune(model, ratio):
    from onnxprune.pipeline.prune import prune_model

    return prune_model(model, Recipe(ratio=ratio)).model


def run_onnxsim(model, ratio):
    import onnxsim.pruning as pruning

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = pruning.apply_structured_pruning(copy, sparsity=ratio)
        try:
            out = pruning.apply_attention_head_pruning(out, sparsity=ratio)
        except Exception:  # noqa: BLE001 - a model without attention blocks
            pass
    return out


TOOLS = {"onnxprune": run_onnxprune, "onnxsim": run_onnxsim}


def measure(name, family, load, x):
    from onnxprune.graph.stats import count_macs, count_params
    from onnxprune.runtime.session import run

    original = load()
    row = {"model": name, "family": family}
    params, macs = count_params(original), count_macs(original)
    dead, removed = dead_channel_model(original)
    feed = {original.graph.input[0].name: x}
    dead_out = run(dead, feed)
    for tool, fn in TOOLS.items():
        t0 = time.perf_counter()
        try:
            pruned = fn(original, 0.5)
            error = None
        except Exception as exc:  # noqa: BLE001 - counted as a failure of the tool
            pruned, error = None, f"{type(exc).__name__}: {str(exc)[:80]}"
        row[f"{tool}_s"] = time.perf_counter() - t0
        ok = pruned is not None and runs_like(pruned, original, x)
        row[f"{tool}_ok"] = ok
        row[f"{tool}_error"] = error
        row[f"{tool}_params"] = count_params(pruned) / params if ok else None
        row[f"{tool}_macs"] = count_macs(pruned) / macs if ok else None
        try:
            row[f"{tool}_oracle"] = rel_err(dead_out, run(fn(dead, 0.3), feed)) if removed else None
        except Exception:  # noqa: BLE001
            row[f"{tool}_oracle"] = None
    return row


def torch_pruning_row(name):
    """Torch-Pruning on the torch model of a torchvision zoo entry, exported afterwards."""
    import torch
    import torch_pruning as tp

    from onnxprune.graph.stats import count_macs, count_params
    from tools import zoo

    model = zoo.build(name)
    x = torch.from_numpy(zoo.example_input(name))
    original = onnx.load(zoo.export(name, "torchscript"))
    t0 = time.perf_counter()
    try:
        classifier = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1:]
        pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=0.5, ignored_layers=classifier)
        pruner.step()
        seconds = time.perf_counter() - t0
        buf = io.BytesIO()
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model.eval(), x, buf, dynamo=False, opset_version=17, input_names=["input"],
                              output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
        pruned = onnx.load_from_string(buf.getvalue())
    except Exception as exc:  # noqa: BLE001
        return {"tp_ok": False, "tp_error": f"{type(exc).__name__}: {str(exc)[:80]}", "tp_s": time.perf_counter() - t0}
    ok = runs_like(pruned, original, zoo.example_input(name, batch=2))
    return {"tp_ok": ok, "tp_s": seconds, "tp_params": count_params(pruned) / count_params(original) if ok else None,
            "tp_macs": count_macs(pruned) / count_macs(original) if ok else None}


def fmt(value, spec=".3f"):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "ok" if value else "**fails**"
    return format(value, spec)


def markdown(rows, torch_pruning: bool) -> str:
    head = ["model", "family", "onnxprune runs", "params", "MACs", "oracle", "s", "onnxsim runs", "params", "MACs",
            "oracle", "s"]
    if torch_pruning:
        head += ["Torch-Pruning runs", "params", "MACs", "s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["family"]]
        for tool in ("onnxprune", "onnxsim"):
            cells += [fmt(r[f"{tool}_ok"]), fmt(r[f"{tool}_params"]), fmt(r[f"{tool}_macs"]),
                      fmt(r[f"{tool}_oracle"], ".1e"), fmt(r[f"{tool}_s"], ".2f")]
        if torch_pruning:
            if "tp_ok" in r:
                cells += [fmt(r["tp_ok"]), fmt(r.get("tp_params")), fmt(r.get("tp_macs")), fmt(r.get("tp_s"), ".2f")]
            else:
                cells += ["", "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def totals(rows, torch_pruning: bool) -> str:
    out = []
    n = len(rows)
    for tool in ("onnxprune", "onnxsim"):
        ok = [r for r in rows if r[f"{tool}_ok"]]
        changed = [r for r in ok if r[f"{tool}_params"] is not None and r[f"{tool}_params"] < 0.999]
        exact = [r for r in rows if r[f"{tool}_oracle"] is not None and r[f"{tool}_oracle"] <= 1e-4]
        mean_params = np.mean([r[f"{tool}_params"] for r in ok]) if ok else float("nan")
        out.append(f"- {tool}: {len(ok)} of {n} models run with the original's output shapes, {len(changed)} of them "
                   f"smaller; mean parameters kept {mean_params:.3f}; dead-channel oracle within 1e-4 on "
                   f"{len(exact)} of {n}; total time {sum(r[f'{tool}_s'] for r in rows):.1f} s")
    if torch_pruning:
        tp = [r for r in rows if "tp_ok" in r]
        ok = [r for r in tp if r["tp_ok"]]
        out.append(f"- Torch-Pruning: {len(ok)} of {len(tp)} torchvision models pruned and exported with the original's "
                   f"output shapes; mean parameters kept "
                   f"{np.mean([r['tp_params'] for r in ok]) if ok else float('nan'):.3f}; total time "
                   f"{sum(r['tp_s'] for r in tp):.1f} s")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", nargs="*", default=None)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--no-torch-pruning", action="store_true")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    rows = []
    t0 = time.perf_counter()
    for name, family, load, x in zoo_cases(args.names):
        row = measure(name, family, load, x)
        if family == "torchvision" and not args.no_torch_pruning:
            row.update(torch_pruning_row(name))
        rows.append(row)
        print(f"{name:28s} " + "  ".join(f"{t}: {'ok' if row[f'{t}_ok'] else 'FAIL'} "
                                          f"{fmt(row[f'{t}_params'])} {fmt(row[f'{t}_oracle'], '.1e')}"
                                          for t in TOOLS) + (f"  tp: {row.get('tp_ok')}" if "tp_ok" in row else ""),
              flush=True)
    import onnxruntime
    import onnxsim

    versions = (f"python {platform.python_version()}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, "
                f"onnxsim {onnxsim.__version__}, torch {torch.__version__}")
    print(f"\n{versions}; {platform.machine()}, {time.perf_counter() - t0:.0f} s in all\n")
    print(totals(rows, not args.no_torch_pruning))
    if args.markdown:
        print()
        print(markdown(rows, not args.no_torch_pruning))
    return 0


if __name__ == "__main__":
    sys.exit(main())
