"""The training bridge (issue 18) on every model we have: is the graph in torch equal to onnxruntime?

Cases: the torchvision zoo (tools/zoo.py, both exporters), timm / Hugging Face / YOLO (tools/zoo_libs.py),
transformers and decoders (tools/export_transformers.py: BERT, GPT-2, LLaMA with and without GQA, ViT, the KV-cache
LMs of both exporters, sdpa(enable_gqa) as ONNX Attention at opset 23), the onnxruntime-genai model builder's GQA
decoder (com.microsoft GroupQueryAttention, RotaryEmbedding-in-GQA, SkipSimplifiedLayerNormalization), the shipped
models, and the fuzzer's generated models (tools/fuzz.py). Each is run by onnxruntime and by `to_torch(model)` on
the same seeded input; it is *exact* when max |torch - ort| <= 1e-5 * max |ort| for every output.

`--peers` also converts each model with onnx2torch and onnx2pytorch (when installed) and applies the same test.

    python tools/bench_bridge.py                      # zoo + transformers + shipped models (cached exports)
    python tools/bench_bridge.py --fuzz 1000          # and 1000 fuzz seeds
    python tools/bench_bridge.py --peers --only zoo   # the converter comparison in docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tools"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

REL = 1e-5
CACHE = Path(__import__("zoo").DEFAULT_CACHE) / "bridge"


def _image_feed(model: onnx.ModelProto, batch: int = 2) -> dict:
    i = model.graph.input[0]
    dims = [d.dim_value for d in i.type.tensor_type.shape.dim]
    return {i.name: np.random.default_rng(0).standard_normal([batch] + dims[1:]).astype(np.float32)}


def _tokens_feed(model: onnx.ModelProto) -> dict:
    rng = np.random.default_rng(0)
    names = [i.name for i in model.graph.input]
    if names == ["pixel_values"]:
        return {"pixel_values": rng.standard_normal((2, 3, 32, 32)).astype(np.float32)}
    feed = {"input_ids": rng.integers(0, 100, (2, 7)).astype(np.int64)}
    if "attention_mask" in names:
        mask = np.ones((2, 7), np.int64)
        mask[1, 5:] = 0
        feed["attention_mask"] = mask
    return feed


def cache_feed(model: onnx.ModelProto, seq: int = 3, past: int = 4) -> dict:
    """input_ids, attention_mask (left padding in the second row) and random past key/values."""
    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(0, 100, (2, seq)).astype(np.int64),
            "attention_mask": np.ones((2, past + seq), np.int64)}
    feed["attention_mask"][1, :2] = 0
    for i in model.graph.input[2:]:
        dims = [d.dim_value for d in i.type.tensor_type.shape.dim]
        feed[i.name] = rng.standard_normal((2, dims[1], past, dims[3])).astype(np.float32)
    return feed


def _zoo_cases() -> dict[str, Callable]:
    import zoo
    import zoo_libs

    def tv(name, exporter):
        def load():
            m = onnx.load(zoo.export(name, exporter))
            return m, _image_feed(m)
        return load

    def lib(name):
        def load():
            m = onnx.load(zoo_libs.export(name))
            return m, {"input": zoo_libs.example_input(name, batch=2)}
        return load

    cases = {f"tv/{n}-{e}": tv(n, e) for n, e in zoo.cases()}
    cases |= {n: lib(n) for n in zoo_libs.LIBS}
    return cases


def _cached(name: str, make: Callable[[Path], None], feed: Callable[[onnx.ModelProto], dict]) -> Callable:
    """A case loader: the export `make(path)` runs once into the cache, then the model and its feed."""
    def load():
        path = CACHE / name
        if not path.exists():
            make(path)
        m = onnx.load(path)
        return m, feed(m)
    return load


def _transformer_cases() -> dict[str, Callable]:
    def et():  # imported when a case is exported (transformers and torch load slowly)
        import export_transformers

        return export_transformers

    def tf(kind, dynamo):
        def make(path):
            e = et()
            model = {"bert": e.bert, "gpt2": e.gpt2, "vit": e.vit, "vit_split": e.vit_split,
                     "llama": e.llama, "llama_gqa": lambda: e.llama(kv_heads=2)}[kind]()
            e.export(model, {"llama": "gpt2", "llama_gqa": "gpt2", "vit_split": "vit"}.get(kind, kind), path, dynamo)
        return _cached(f"{kind}_{'dyn' if dynamo else 'ts'}.onnx", make, _tokens_feed)

    def kv(dynamo):
        def make(path):
            e = et()
            e.export_cache(e.llama_lm(hidden=32, heads=4, kv_heads=2, layers=2), path, dynamo)
        return _cached(f"llama_cache_{'dyn' if dynamo else 'ts'}.onnx", make, cache_feed)

    def sdpa_gqa(opset):
        def make(path):
            e = et()
            e.export_attention(e.GQAttention(hidden=32, heads=4, kv_heads=2), path, opset)
        return _cached(f"sdpa_gqa_op{opset}.onnx", make,
                       lambda m: {"x": np.random.default_rng(0).standard_normal((2, 6, 32)).astype(np.float32)})

    cases = {}
    for kind in ("bert", "gpt2", "llama", "llama_gqa", "vit", "vit_split"):
        for dynamo in (False, True):
            cases[f"hf/{kind}-{'dynamo' if dynamo else 'torchscript'}"] = tf(kind, dynamo)
    cases["hf/llama_kv_cache-torchscript"] = kv(False)
    cases["hf/llama_kv_cache-dynamo"] = kv(True)
    cases["torch/sdpa_gqa-op18"] = sdpa_gqa(18)
    cases["torch/sdpa_gqa-op23-Attention"] = sdpa_gqa(23)
    cases["genai/llama_gqa_builder"] = genai_model
    return cases


def genai_model():
    """onnxruntime-genai's model builder output for a tiny random LLaMA (GQA 8 query / 2 kv heads), fp32 CPU."""
    import export_transformers as et
    import stdlib_text as st

    out = CACHE / "genai"
    if not (out / "model.onnx").exists():
        model = et.llama_lm(hidden=128, heads=8, kv_heads=2, layers=2, intermediate=96, vocab=st.VOCAB,
                            config={"bos_token_id": st.BOS, "eos_token_id": st.EOS, "pad_token_id": st.PAD})
        st.save_hf_folder(model, CACHE / "genai_hf")
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(CACHE / "genai_hf"),
                        "-o", str(out), "-p", "fp32", "-e", "cpu", "-c", str(CACHE / "genai_cache")], check=True,
                       capture_output=True)
    m = onnx.load(out / "model.onnx")
    rng = np.random.default_rng(0)
    past, seq = 4, 3
    feed = {"input_ids": rng.integers(0, 200, (1, seq)).astype(np.int64),
            "attention_mask": np.ones((1, past + seq), np.int64)}
    for i in m.graph.input:
        if i.name.startswith("past_key_values"):  # 2 kv heads of 128 / 8 features (the builder names the dims)
            feed[i.name] = rng.standard_normal((1, 2, past, 16)).astype(np.float32)
    return m, feed


def _shipped_cases() -> dict[str, Callable]:
    def cnn(name):
        def load():
            m = onnx.load(ROOT / "models" / f"{name}.onnx")
            x = np.load(ROOT / "models" / "digits_heldout.npz")
            return m, {m.graph.input[0].name: x[x.files[0]][:16].astype(np.float32)}
        return load

    def llama():
        m = onnx.load(ROOT / "models" / "stdlib_llama.onnx")
        return m, cache_feed(m)

    return {"models/digits_cnn": cnn("digits_cnn"), "models/digits_resnet": cnn("digits_resnet"),
            "models/stdlib_llama": llama}


def cases(only: str | None = None) -> dict[str, Callable]:
    """name -> () -> (model, feed)."""
    groups = {"shipped": _shipped_cases, "zoo": _zoo_cases, "transformers": _transformer_cases}
    out = {}
    for key, make in groups.items():
        if only in (None, key):
            out |= make()
    return out


def ort_run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feed)


def rel_error(got: list[np.ndarray], ref: list[np.ndarray]) -> float:
    worst = 0.0
    for g, r in zip(got, ref):
        g, r = np.asarray(g), np.asarray(r)
        if g.shape != r.shape:
            return float("inf")
        if r.size == 0:
            continue
        if r.dtype.kind in "biu":
            worst = max(worst, 0.0 if np.array_equal(g, r) else float("inf"))
            continue
        r64 = r.astype(np.float64)
        worst = max(worst, float(np.abs(g.astype(np.float64) - r64).max()) / max(float(np.abs(r64).max()), 1e-6))
    return worst


def ours(model, feed):
    from onnxprune.train import to_torch

    module = to_torch(model)
    out = module.run(feed)
    return [out[o.name] for o in model.graph.output]


def onnx2torch_run(model, feed):
    import torch
    from onnx2torch import convert

    module = convert(model).eval()
    with torch.no_grad():
        out = module(*[torch.from_numpy(feed[i.name]) for i in model.graph.input if i.name in feed])
    out = out if isinstance(out, (tuple, list)) else [out]
    return [o.numpy() for o in out]


def onnx2pytorch_run(model, feed):
    import torch
    from onnx2pytorch import ConvertModel

    module = ConvertModel(model, experimental=True).eval()
    with torch.no_grad():
        out = module(*[torch.from_numpy(feed[i.name]) for i in model.graph.input if i.name in feed])
    out = out if isinstance(out, (tuple, list)) else [out]
    return [o.numpy() for o in out]


ENGINES = {"onnxprune": ours, "onnx2torch": onnx2torch_run, "onnx2pytorch": onnx2pytorch_run}


def check(engine: Callable, model, feed, ref) -> tuple[str, str]:
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            err = rel_error(engine(model, feed), ref)
    except Exception as exc:  # noqa: BLE001 - a converter's failure is a result here
        return "fails", f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    return ("exact" if err <= REL else "differs"), f"{err:.1e}"


def fuzz_cases(count: int, start: int = 0):
    """(seed, model, feed, tolerance) for the fuzzer's valid cases that onnxruntime runs; float16 models (and
    float16 islands in float32 ones) agree to float16 rounding only: onnxruntime computes them in float16 (or
    drops the rounding of a Cast->op->Cast island), the bridge in float32 with the rounding the graph states."""
    import fuzz

    for seed in range(start, start + count):
        model, shapes, how = fuzz.make_case(seed)
        rng = np.random.default_rng(seed)
        feed = {i.name: rng.standard_normal(shapes[i.name]).astype(
            onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
            for i in model.graph.input if i.name in shapes}
        half = any(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for i in model.graph.input) or any(
            n.op_type == "Cast" and any(a.name == "to" and a.i in (10, 16) for a in n.attribute)
            for n in model.graph.node)
        yield seed, how, model, feed, (2e-2 if half else REL)


def run_fuzz(count: int) -> Counter:
    from onnxprune.errors import UnsupportedOpError

    stats = Counter()
    for seed, how, model, feed, tol in fuzz_cases(count):
        try:
            onnx.checker.check_model(model, full_check=True)
            ref = ort_run(model, feed)
        except Exception:  # noqa: BLE001 - invalid, or onnxruntime has no kernel: no reference to compare with
            stats["no onnxruntime reference"] += 1
            continue
        try:
            err = rel_error(ours(model, feed), ref)
            stats["exact" if err <= tol else "differs"] += 1
            if err > tol:
                print(f"  fuzz seed {seed} ({how}) differs: {err:.2e}")
        except UnsupportedOpError as exc:
            stats["unsupported op (one-line error)"] += 1
            print(f"  fuzz seed {seed}: {exc}")
        except Exception as exc:  # noqa: BLE001
            stats["crash"] += 1
            print(f"  fuzz seed {seed} ({how}) crashes: {type(exc).__name__}: {exc}")
    return stats


def decoder_check(path: str, windows: str | None = None) -> str:
    """A real decoder export (input_ids, attention_mask -> logits; SmolLM2 from tools/smollm2.py): two windows of
    64 tokens, the second left-padded by 5, against onnxruntime; then one backward pass."""
    import resource

    import torch

    from onnxprune.io.model_io import load_model
    from onnxprune.train import to_torch

    model = load_model(path)
    if windows:
        data = np.load(windows)
        ids, mask = data["input_ids"][:2, :64], data["attention_mask"][:2, :64].copy()
    else:
        ids, mask = np.random.default_rng(0).integers(0, 1000, (2, 64)).astype(np.int64), np.ones((2, 64), np.int64)
    mask[1, :5] = 0
    feed = {"input_ids": ids, "attention_mask": mask}
    ref = ort_run(model, feed)
    t = time.perf_counter()
    module = to_torch(model)
    build = time.perf_counter() - t
    got = module.run(feed)
    err = rel_error([got[o.name] for o in model.graph.output], ref)
    out = module({k: torch.from_numpy(v) for k, v in feed.items()})[model.graph.output[0].name]
    out.pow(2).mean().backward()
    grads = sum(p.grad is not None for p in module.params.values())
    return (f"{path}: relative error {err:.2e}; {len(module.nodes)} nodes, {len(module.params)} parameters "
            f"({sum(p.numel() for p in module.params.values()) / 1e6:.1f} M values), {grads} with a gradient; "
            f"{len(module.cut_points())} cut points; built in {build:.1f} s; peak RSS "
            f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["shipped", "zoo", "transformers", "none"], default=None)
    parser.add_argument("--peers", action="store_true", help="also onnx2torch and onnx2pytorch")
    parser.add_argument("--fuzz", type=int, default=0, help="fuzz seeds to check (0: none)")
    parser.add_argument("--decoder", default=None, help="also check a real decoder export (SmolLM2: tools/smollm2.py)")
    parser.add_argument("--windows", default=None, help="npz of input_ids / attention_mask for --decoder")
    parser.add_argument("--after", default=None, help="start after this case (to continue an interrupted run)")
    args = parser.parse_args(argv)
    engines = ["onnxprune"] + (["onnx2torch", "onnx2pytorch"] if args.peers else [])
    totals = {e: Counter() for e in engines}
    if args.only != "none":
        print("| model | " + " | ".join(engines) + " |")
        print("|---|" + "---|" * len(engines))
        names = list(cases(args.only).items())
        if args.after:
            names = names[[n for n, _ in names].index(args.after) + 1:]
        for name, load in names:
            try:
                with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                    warnings.simplefilter("ignore")
                    model, feed = load()
                ref = ort_run(model, feed)
            except Exception as exc:  # noqa: BLE001
                print(f"| {name} | not exported: {type(exc).__name__}: {str(exc)[:80]} |")
                continue
            cells = []
            for e in engines:
                t = time.perf_counter()
                verdict, detail = check(ENGINES[e], model, feed, ref)
                totals[e][verdict] += 1
                cells.append(f"{verdict} ({detail}, {time.perf_counter() - t:.1f}s)")
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
        for e in engines:
            print(f"{e}: {dict(totals[e])}")
    if args.decoder:
        print(decoder_check(args.decoder, args.windows))
    if args.fuzz:
        print(f"fuzz ({args.fuzz} seeds): {dict(run_fuzz(args.fuzz))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
