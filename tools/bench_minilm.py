"""Prune all-MiniLM-L6-v2 (heads and MLP neurons) and measure sentence-embedding fidelity on held-out text.

Sentences are the first lines of docstrings of Python's standard library: modules whose name hashes even give
the calibration set, the others the evaluation set, so no sentence (nor module) is in both. Embeddings are the
mean of the last hidden state over the attention mask; fidelity is the mean cosine similarity between pruned
and original embeddings of each held-out sentence. Also reported: MACs of the linear layers per token (every
MatMul/Gemm with a constant weight), and onnxruntime CPU latency of both models on the same batches.

`--ratio` is the share of linear-layer MACs removed; `--allocate` says where from (see mlp_only_plan).

    python tools/export_minilm.py -o .cache/minilm.onnx
    python tools/bench_minilm.py .cache/minilm.onnx --ratio 0.3 --allocate mlp --criterion hybrid --recover lstsq
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import pkgutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnxprune.recipe import Recipe
from onnxprune.pipeline.prune import RunSettings

if __package__ in (None, ""):  # run as `python tools/bench_minilm.py`: the checkout's root, for `tools.*` and onnxprune
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SKIP = ("test", "idlelib", "tkinter", "turtle", "antigravity", "this", "lib2to3", "ensurepip", "pydoc_data",
        "__main__", "__phello__", "_")


def stdlib_sentences(max_per_module: int = 1000) -> dict[str, list[str]]:
    """First sentence of every public docstring (module attributes, methods of its classes), per stdlib module."""
    out: dict[str, list[str]] = {}
    names = sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names)
    for name in names:
        if name.startswith(SKIP):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - some stdlib modules do not import on every platform
            continue
        found = []
        objects = []
        for attr in sorted(dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            objects.append(obj)
            if inspect.isclass(obj) and getattr(obj, "__module__", None) == name:
                # the methods a class defines itself (not inherited: those repeat across classes)
                objects.extend(v for k, v in sorted(vars(obj).items()) if not k.startswith("_"))
        for obj in objects:
            doc = inspect.getdoc(obj) or ""
            line = " ".join(doc.strip().split("\n\n")[0].split())
            if 40 <= len(line) <= 300 and line not in found and not line.startswith(("Return", "str(", "int(")):
                found.append(line)
        if found:
            out[name] = found[:max_per_module]
    return out


def split_sentences() -> tuple[list[str], list[str]]:
    calib, held, seen = [], [], set()
    for name, lines in stdlib_sentences().items():
        fresh = [line for line in lines if line not in seen]  # re-exported objects repeat a docstring
        seen.update(fresh)
        (calib if int(hashlib.sha1(name.encode()).hexdigest(), 16) % 2 == 0 else held).extend(fresh)
    return calib, held


def feeds(tokenizer, sentences: list[str], batch: int = 16, max_len: int = 64) -> list[dict[str, np.ndarray]]:
    """Batches of `batch` sentences, shortest first, so that a batch pads to a similar length (half the work)."""
    length = {s: len(tokenizer(s, truncation=True, max_length=max_len)["input_ids"]) for s in sentences}
    sentences = sorted(sentences, key=lambda s: (length[s], s))
    out = []
    for i in range(0, len(sentences), batch):
        enc = tokenizer(sentences[i:i + batch], padding=True, truncation=True, max_length=max_len, return_tensors="np")
        out.append({"input_ids": enc["input_ids"].astype(np.int64),
                    "attention_mask": enc["attention_mask"].astype(np.int64)})
    return out


def embeddings(model: onnx.ModelProto, batches: list[dict[str, np.ndarray]]) -> np.ndarray:
    from onnxprune.runtime.session import internal_session

    sess = internal_session(model)
    embs = []
    for feed in batches:
        hidden = sess.run(None, feed)[0]
        mask = feed["attention_mask"][..., None].astype(np.float32)
        embs.append((hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9))
    return np.concatenate(embs)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def linear_macs_per_token(model: onnx.ModelProto) -> int:
    """Sum of K·N over MatMul/Gemm nodes with a 2-D constant weight: the MACs one token costs in them."""
    from onnxprune.graph.normalize import normalize

    m = normalize(model)
    inits = {t.name: tuple(t.dims) for t in m.graph.initializer}
    total = 0
    for node in m.graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(inits.get(node.input[1], ())) == 2:
            k, n = inits[node.input[1]]
            total += k * n
    return total


def latency(model: onnx.ModelProto, batches: list[dict[str, np.ndarray]], threads: int, repeats: int) -> float:
    """Median seconds to run all `batches` once."""
    from onnxprune.runtime.session import internal_session

    sess = internal_session(model, threads=threads)
    for feed in batches[:2]:
        sess.run(None, feed)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for feed in batches:
            sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def mlp_only_plan(model: onnx.ModelProto, ratio: float, criterion: str, calib) -> dict:
    """Channels to remove so that the MLPs alone lose `ratio` of all linear-layer MACs; heads are kept.

    An MLP neuron costs 2·hidden MACs per token (fc1 column, fc2 row); a head of D features 4·hidden·D (Q, K,
    V columns, output-projection rows). Every MLP loses the same share, ratio · (attention + MLP) / MLP of
    its neurons, chosen by `criterion`.
    """
    from onnxprune.pipeline.statistics import channel_stats
    from onnxprune.pipeline.plan import select
    from onnxprune.pipeline.prepare import prepare
    from onnxprune.pipeline.score import DATA_CRITERIA, score_groups

    prep = prepare(model)
    stats = channel_stats(prep, calib) if criterion in DATA_CRITERIA else None
    scores = score_groups(prep.analysis, prep.view, criterion, stats=stats)
    groups = prep.analysis.prunable
    attention = sum(2 * g.size for g in groups if g.unit > 1)  # 4·hidden·H·D vs 2·hidden per neuron
    mlp = sum(g.size for g in groups if g.unit == 1)
    share = min(0.9, ratio * (attention + mlp) / mlp)
    removed = {}
    for g in groups:
        if g.unit == 1:
            keep = g.size - int(round(g.size * share))
            removed[g.spaces[0]] = np.setdiff1d(np.arange(g.size), select(g, scores[g.spaces[0]], keep))
    return removed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--criterion", default="hybrid")
    parser.add_argument("--allocate", choices=["uniform", "mlp"], default="mlp",
                        help="uniform: every group loses `ratio` of its channels (heads rounded to whole heads); "
                             "mlp: heads stay, the MLP neurons alone remove `ratio` of the linear MACs")
    parser.add_argument("--recover", default="lstsq")
    parser.add_argument("--calib", type=int, default=1024, help="calibration sentences")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--npz", help="also write the calibration batch as an npz for `onnxprune prune --data`")
    parser.add_argument("--save", help="write the pruned model here")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--pruned", help="evaluate this model (pruned elsewhere, e.g. by `onnxprune prune`) "
                                         "instead of pruning here")
    args = parser.parse_args()

    from tools.export_minilm import load_tokenizer

    from onnxprune.pipeline.prune import prune_model

    tok = load_tokenizer()
    calib_s, held_s = split_sentences()
    rng = np.random.default_rng(0)
    calib_s = [calib_s[i] for i in sorted(rng.permutation(len(calib_s))[:args.calib])]
    assert not set(calib_s) & set(held_s)
    calib, held = feeds(tok, calib_s), feeds(tok, held_s)
    if args.npz:
        enc = tok(calib_s, padding="max_length", truncation=True, max_length=64, return_tensors="np")
        np.savez(args.npz, input_ids=enc["input_ids"].astype(np.int64),
                 attention_mask=enc["attention_mask"].astype(np.int64))

    model = onnx.load(args.model)
    if args.pruned:
        pruned, prune_s, kept = onnx.load(args.pruned), None, {}
        params = None
    else:
        t = time.perf_counter()
        removed = None
        if args.allocate == "mlp":
            removed = mlp_only_plan(model, args.ratio, args.criterion, calib)
        result = prune_model(model, Recipe(ratio=args.ratio, criterion=args.criterion, recover=args.recover), RunSettings(calibration=calib, removed=removed))
        prune_s = time.perf_counter() - t
        pruned, params = result.model, [result.stats["params_before"], result.stats["params_after"]]
        heads = [g for g in result.analysis.prunable if g.unit > 1]
        neurons = [g for g in result.analysis.prunable if g.unit == 1]
        kept_heads = sum(len(result.plan.kept.get(g.spaces[0], range(g.size))) // g.unit for g in heads)
        kept_neurons = sum(len(result.plan.kept.get(g.spaces[0], range(g.size))) for g in neurons)
        kept = {"heads_kept": f"{kept_heads}/{sum(g.size // g.unit for g in heads)}",
                "neurons_kept": f"{kept_neurons}/{sum(g.size for g in neurons)}"}

    ref, got = embeddings(model, held), embeddings(pruned, held)
    cos = cosine(ref, got)
    macs0, macs1 = linear_macs_per_token(model), linear_macs_per_token(pruned)
    lat0 = latency(model, held[:8], args.threads, args.repeats)
    lat1 = latency(pruned, held[:8], args.threads, args.repeats)
    figures = {
        "ratio": args.ratio, "allocate": args.allocate, "criterion": args.criterion, "recover": args.recover,
        "pruned": args.pruned, "calibration_sentences": len(calib_s), "heldout_sentences": len(held_s), **kept,
        "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "cosine_p05": float(np.quantile(cos, 0.05)),
        "linear_macs_per_token": [macs0, macs1], "linear_macs_reduction": 1 - macs1 / macs0,
        "params": params,
        "latency_s": [lat0, lat1], "latency_ratio": lat1 / lat0, "prune_seconds": prune_s, "threads": args.threads,
    }
    print(json.dumps(figures, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    if args.save:
        onnx.save(pruned, args.save)


if __name__ == "__main__":
    main()
