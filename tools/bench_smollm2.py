"""Baselines on a real pretrained decoder, SmolLM2-135M (tools/smollm2.py builds it): onnxprune and onnxsim 0.8.1.

Every variant runs in its own child process (peak RSS from wait4, wall time, an RSS cap enforced by a watchdog
that kills the child past --mem-cap) and writes a pruned model; held-out perplexity is then measured by
`onnxprune eval` on the same held-out windows for every variant (and the dense model), so the ratios compare like
with like. Parameters removed are counted on the ONNX graphs: "decoder-layer" parameters are the weights of the
MatMuls inside the 30 decoder layers (every MatMul weight but the LM head's; the RMSNorm scales, 0.03 % of them,
are left out), "all" is the model's 134,515,008 parameters (tied embedding counted once).

onnxsim runs in its own virtual environment (--onnxsim-python; `python -m venv /work/cache/onnxsim-venv &&
/work/cache/onnxsim-venv/bin/pip install onnxsim==0.8.1 onnxruntime`), never beside onnxprune: this same file is
its child's script, so the child imports only numpy, onnx and onnxsim. onnxsim's `sparsity` is its own unit: the
fraction of channels of every matched chain (Wanda) or of matched residual sub-blocks (depth).

    python tools/bench_smollm2.py --json bench.json --markdown                    # every variant
    python tools/bench_smollm2.py --only onnxprune-0.2 --only onnxsim-wanda-ft-0.2 --cal-windows 16

Add a variant: append to VARIANTS (tool "onnxprune": CLI arguments after the model; tool "onnxsim": a method
of `onnxsim_child` and its sparsity).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

DATA = Path(os.environ.get("SMOLLM2_DIR", "/work/cache/smollm2"))
ALL_PARAMS = 134_515_008  # SmolLM2-135M, tied embedding once
VARIANTS = [
    {"name": "onnxprune-0.2", "tool": "onnxprune", "args": ["--ratio", "0.2", "--recover", "lstsq"]},
    {"name": "onnxprune-0.3", "tool": "onnxprune", "args": ["--ratio", "0.3", "--recover", "lstsq"]},
    # the same with a 2 GiB calibration budget (the machine is shared: the default budget's runs met the OOM killer)
    {"name": "onnxprune-0.2-budget2G", "tool": "onnxprune",
     "args": ["--ratio", "0.2", "--recover", "lstsq", "--memory-budget", "2G"]},
    {"name": "onnxprune-0.3-budget2G", "tool": "onnxprune",
     "args": ["--ratio", "0.3", "--recover", "lstsq", "--memory-budget", "2G"]},
    {"name": "onnxsim-wanda-ft-0.2", "tool": "onnxsim", "method": "wanda-finetune", "sparsity": 0.2},
    {"name": "onnxsim-wanda-ft-0.3", "tool": "onnxsim", "method": "wanda-finetune", "sparsity": 0.3},
    {"name": "onnxsim-wanda-0.2", "tool": "onnxsim", "method": "wanda", "sparsity": 0.2},
    {"name": "onnxsim-wanda-0.3", "tool": "onnxsim", "method": "wanda", "sparsity": 0.3},
    {"name": "onnxsim-blocks-0.2", "tool": "onnxsim", "method": "blocks", "sparsity": 0.2},
    {"name": "onnxsim-blocks-0.3", "tool": "onnxsim", "method": "blocks", "sparsity": 0.3},
    {"name": "onnxsim-blocks-fused-0.2", "tool": "onnxsim", "method": "blocks-fused", "sparsity": 0.2},
    {"name": "onnxsim-blocks-fused-0.3", "tool": "onnxsim", "method": "blocks-fused", "sparsity": 0.3},
]


def onnxsim_child(method: str, sparsity: float, model_path: str, cal_path: str, out_path: str, batch: int) -> None:
    """Runs in onnxsim's venv: its retraining-free pipelines, as its API documents them."""
    import onnx
    import onnxsim

    cal = np.load(cal_path)
    batches = [{k: cal[k][i:i + batch] for k in ("input_ids", "attention_mask")}
               for i in range(0, len(cal["input_ids"]), batch)]
    model = onnx.load(model_path)
    if method == "wanda":
        pruned = onnxsim.apply_structured_wanda_pruning(model, calibration_data=batches, sparsity=sparsity)
    elif method == "wanda-finetune":
        # Wanda-structured (|W| x ||X||) channel removal, then the ridge refit of every surviving MatMul
        pruned = onnxsim.apply_structured_wanda_pruning(model, calibration_data=batches, sparsity=sparsity)
        print(f"wanda done at {time.perf_counter():.0f} s", flush=True)
        pruned = onnxsim.apply_pruning_finetune(model, pruned, calibration_data=batches)
    elif method == "blocks":
        pruned = onnxsim.apply_transformer_block_pruning(model, calibration_data=batches, sparsity=sparsity)
    elif method == "blocks-fused":
        # its block matcher wants an RMSNorm node, and the TorchScript export decomposes RMSNorm (Pow, ReduceMean,
        # Add, Sqrt, Div, Mul): fuse those into opset 23 RMSNormalization first (with onnxruntime's contrib
        # SimplifiedLayerNormalization it still drops nothing: onnx shape inference does not know that op)
        model = fuse_rms_norm(model_path)
        pruned = onnxsim.apply_transformer_block_pruning(model, calibration_data=batches, sparsity=sparsity)
    else:
        raise SystemExit(f"unknown onnxsim method {method!r}")
    onnx.save(pruned, out_path)


def fuse_rms_norm(model_path: str, standard: bool = True):
    """The model with each decomposed RMSNorm of the TorchScript export (x.pow(2).mean(-1) + eps, sqrt, 1 / that,
    x * that, a float-to-float Cast, weight * that) as one RMSNormalization node, opset 23 (`standard`), or
    onnxruntime's SimplifiedLayerNormalization; the same maths. onnxruntime's optimizer does not match the
    pattern (the Casts sit inside it)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(model_path)
    graph = model.graph
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"}
    constants |= {t.name: numpy_helper.to_array(t) for t in graph.initializer}

    def only_reader(node, op: str):
        nxt = readers.get(node.output[0], [])
        return nxt[0] if len(nxt) == 1 and nxt[0].op_type == op else None

    drop, fused = set(), []
    for pow_node in [n for n in graph.node if n.op_type == "Pow"]:
        chain, node = [pow_node], pow_node
        for op in ("ReduceMean", "Add", "Sqrt", "Div", "Mul", "Cast", "Mul"):
            node = only_reader(node, op)
            if node is None:
                break
            chain.append(node)
        if node is None or float(constants.get(pow_node.input[1], 0)) != 2.0:
            continue
        x, eps = pow_node.input[0], float(constants[chain[2].input[1]])
        weight = next(i for i in chain[-1].input if i in constants)
        if chain[5].input[0] != x or chain[4].input[0] not in constants:
            continue
        fused.append(helper.make_node("RMSNormalization" if standard else "SimplifiedLayerNormalization",
                                      [x, weight], [chain[-1].output[0]],
                                      name=chain[-1].name + "/rms", axis=-1, epsilon=eps,
                                      stash_type=1))
        drop.update(id(n) for n in chain)
    nodes = []
    for node in graph.node:
        if id(node) in drop:
            if node.op_type == "Mul" and any(node.output[0] == f.output[0] for f in fused):
                nodes.append(next(f for f in fused if f.output[0] == node.output[0]))
            continue
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    if standard:  # RMSNormalization is opset 23; the export's ReduceMeans (opset 17 axes attributes) all went
        assert not any(n.op_type.startswith("Reduce") for n in graph.node)
        for entry in model.opset_import:
            if entry.domain in ("", "ai.onnx"):
                entry.version = 23
    print(f"fused {len(fused)} RMSNorms into {fused[0].op_type if fused else None}", flush=True)
    return model


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_child(cmd: list[str], log: Path, timeout: float, mem_cap: float) -> dict:
    """Run `cmd`, output to `log`; peak RSS (wait4), wall time, and why it stopped (timeout, the RSS cap)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    stopped: list[str] = []

    def watch() -> None:
        while proc.returncode is None and not stopped:
            if _rss(proc.pid) > mem_cap:
                stopped.append(f"killed at the RSS cap ({mem_cap / 2**30:.1f} GiB)")
            elif time.perf_counter() - start > timeout:
                stopped.append(f"killed at the time limit ({timeout:.0f} s)")
            if stopped:
                os.killpg(proc.pid, signal.SIGKILL)
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    return {"rc": proc.returncode, "wall_s": round(wall, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
            "stopped": stopped[0] if stopped else None, "log": str(log)}


def matmul_weights(path: Path) -> dict:
    """Elements of the MatMul weight initializers: decoder layers apart from the LM head (the MatMul that writes
    the graph output `logits`)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    from onnx.external_data_helper import uses_external_data

    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    head, layers = 0, 0
    producers = {o: n for n in model.graph.node for o in n.output}
    head_node = producers.get(model.graph.output[0].name)
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        weight = sum(sizes.get(name, 0) for name in node.input[1:2])
        if node is head_node:
            head += weight
        else:
            layers += weight
    external = any(uses_external_data(t) for t in model.graph.initializer)
    return {"layer_weights": layers, "head_weights": head, "external_data": external}


def perplexity(model: Path, heldout: Path, log: Path, timeout: float, mem_cap: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "eval.json"
        run = run_child([sys.executable, "-m", "onnxprune.cli", "eval", str(model), "--data", str(heldout),
                         "--no-latency", "--metric", "perplexity", "--batch-size", "8", "--quiet", "--json",
                         str(report)], log, timeout, mem_cap)
        if run["rc"] != 0:
            return {"error": f"eval failed (rc {run['rc']}), see {log}"}
        return json.loads(report.read_text())["candidate"]["perplexity"]


def dense_perplexity(model: Path, heldout: Path, work: Path, timeout: float, mem_cap: float) -> dict:
    """The dense model's held-out perplexity, measured once per work folder (several runs can share it)."""
    cached = work / f"dense.{heldout.stem}.json"
    if cached.exists() and cached.stat().st_mtime > model.stat().st_mtime:
        return json.loads(cached.read_text())
    ppl = perplexity(model, heldout, work / "dense.eval.log", timeout, mem_cap)
    if "perplexity" in ppl:
        cached.write_text(json.dumps(ppl))
    return ppl


def variant_command(v: dict, args, model: Path, cal: Path, out: Path) -> list[str]:
    if v["tool"] == "onnxprune":
        return [sys.executable, "-m", "onnxprune.cli", "prune", str(model), "--data", str(cal), *v["args"],
                "-o", str(out), "--overwrite", "--json", str(out.with_suffix(".json"))]
    return [args.onnxsim_python, str(Path(__file__).resolve()), "--onnxsim-child", v["method"], str(v["sparsity"]),
            str(model), str(cal), str(out), str(args.batch)]


def versions(onnxsim_python: str) -> dict:
    import onnx
    import onnxruntime

    probe = "import onnxsim, onnxruntime; print(onnxsim.__version__, onnxruntime.__version__)"
    sim = subprocess.run([onnxsim_python, "-c", probe], capture_output=True, text=True, check=False).stdout.split()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"python": platform.python_version(), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "onnxsim": sim[0] if sim else None, "onnxsim_onnxruntime": sim[1] if len(sim) > 1 else None,
            "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE")
                                                                    * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def markdown(result: dict) -> str:
    dense = result["dense"]
    rows = [("| variant | calibration tokens | decoder-layer params removed | all params removed | held-out perplexity "
             "| ratio vs dense | peak RSS | wall time | note |"), "|---|---|---|---|---|---|---|---|---|",
            f"| dense | | 0 | 0 | {dense['perplexity']:.4f} | 1.000 | | | {dense['tokens']} predicted tokens |"]
    for r in result["variants"]:
        run = r["run"]
        if "perplexity" in r:
            ppl, ratio = f"{r['perplexity']:.4f}", f"{r['perplexity'] / dense['perplexity']:.3f}"
        else:
            ppl, ratio = "—", "—"
        removed = r.get("removed")
        layer = f"{removed['layer_fraction']:.1%}" if removed else "—"
        everything = f"{removed['all_fraction']:.1%}" if removed else "—"
        note = run["stopped"] or (("OOM-killed (kernel)" if run["rc"] == -9 else f"rc {run['rc']}") if run["rc"]
                                  else "") or r.get("error", "")
        rows.append(f"| {r['name']} | {r.get('calibration_tokens', '')} | {layer} | {everything} | {ppl} | {ratio} | {run['peak_rss_gib']:.2f} GiB "
                    f"| {run['wall_s']:.0f} s | {note} |")
    return "\n".join(rows)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--onnxsim-child":
        method, sparsity, model, cal, out, batch = sys.argv[2:8]
        onnxsim_child(method, float(sparsity), model, cal, out, int(batch))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--calibration", default="smollm2_calib_16k.npz")
    parser.add_argument("--heldout", default="smollm2_heldout.npz")
    parser.add_argument("--cal-windows", type=int, help="use the first N calibration windows only")
    parser.add_argument("--work", type=Path, help="folder for pruned models and logs (default DATA/bench)")
    parser.add_argument("--only", action="append", help="variant names to run (repeat); default all")
    parser.add_argument("--onnxsim-python", default="/work/cache/onnxsim-venv/bin/python")
    parser.add_argument("--batch", type=int, default=8, help="windows per onnxsim calibration batch")
    parser.add_argument("--timeout", type=float, default=2400, help="seconds per variant")
    parser.add_argument("--mem-cap", type=float, default=10, help="GiB of RSS per child before it is killed")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--merge", type=Path, nargs="+", help="only print the table of these --json results")
    args = parser.parse_args()
    if args.merge:
        parts = [json.loads(p.read_text()) for p in args.merge]
        rows = [{"calibration_tokens": int(np.prod(p["calibration_shape"]))} | v for p in parts for v in p["variants"]]
        print(markdown(parts[0] | {"variants": rows}))
        return
    work = args.work or args.data_dir / "bench"
    work.mkdir(parents=True, exist_ok=True)
    model, heldout = args.data_dir / "smollm2.onnx", args.data_dir / args.heldout
    cal = args.data_dir / args.calibration
    if args.cal_windows:
        data = np.load(cal)
        cal = work / f"calib_{args.cal_windows}.npz"
        np.savez(cal, **{k: data[k][:args.cal_windows] for k in data.files})
    cal_shape = list(np.load(cal)["input_ids"].shape)
    cap, limit = args.mem_cap * 2**30, args.timeout
    dense_weights = matmul_weights(model)
    result = {"model": str(model), "calibration": str(cal), "calibration_shape": cal_shape,
              "heldout": str(heldout), "versions": versions(args.onnxsim_python), "mem_cap_gib": args.mem_cap,
              "dense": dense_perplexity(model, heldout, work, limit, cap), "variants": []}
    print(f"dense: {result['dense']}", flush=True)
    for v in VARIANTS:
        if args.only and v["name"] not in args.only:
            continue
        out = work / f"{v['name']}.onnx"
        cmd = variant_command(v, args, model, cal, out)
        entry = {"name": v["name"], "calibration_tokens": int(np.prod(cal_shape)), "command": " ".join(cmd)}
        if out.exists():
            out.unlink()
        entry["run"] = run_child(cmd, work / f"{v['name']}.log", limit, cap)
        if entry["run"]["rc"] == 0 and out.exists():
            weights = matmul_weights(out)
            removed = dense_weights["layer_weights"] - weights["layer_weights"]
            entry["removed"] = {"layer_weights": removed,
                                "layer_fraction": removed / dense_weights["layer_weights"],
                                "all_fraction": (removed + dense_weights["head_weights"] - weights["head_weights"])
                                / ALL_PARAMS}
            ppl = perplexity(out, heldout, work / f"{v['name']}.eval.log", limit, cap)
            entry.update({"perplexity": ppl["perplexity"]} if "perplexity" in ppl else ppl)
        print(json.dumps(entry), flush=True)
        result["variants"].append(entry)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
    if args.markdown:
        print(markdown(result))


if __name__ == "__main__":
    main()
