"""Perplexity of causal LMs: eval --metric perplexity (and automatically for logits [batch, seq, vocab] with
input_ids), honouring the attention mask; key/value cache inputs fed empty; sensitivity and prune --max-drop
with a perplexity budget."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.cli import main
from onnxprune.evaluate.data import load_data
from onnxprune.evaluate.compare import evaluate
from onnxprune.evaluate.metrics import perplexity
from onnxprune.runtime.session import run_batches

V = 11


def bigram_lm() -> onnx.ModelProto:
    """input_ids [batch, seq] -> logits [batch, seq, V]: a row of a random table per token (a bigram model)."""
    table = np.random.default_rng(0).standard_normal((V, V)).astype(np.float32) * 2
    graph = helper.make_graph([helper.make_node("Gather", ["table", "input_ids"], ["logits"], name="lookup")], "lm",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
                               helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", V])],
                              [numpy_helper.from_array(table, "table")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def windows(n=12, seq=9, seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (n, seq)).astype(np.int64)
    mask = np.ones((n, seq), np.int64)
    for i, length in enumerate(rng.integers(2, seq + 1, n)):
        mask[i, length:] = 0  # right padding of varied length
        ids[i, length:] = 0
    return ids, mask


def numpy_perplexity(logits: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> float:
    """Independently: softmax probabilities of every real next token, their mean log."""
    p = np.exp(logits.astype(np.float64))
    p /= p.sum(axis=-1, keepdims=True)
    logs = []
    for b in range(len(ids)):
        for t in range(ids.shape[1] - 1):
            if mask[b, t] and mask[b, t + 1]:
                logs.append(np.log(p[b, t, ids[b, t + 1]]))
    return float(np.exp(-np.mean(logs)))


def test_perplexity_equals_numpy(tmp_path):
    m = bigram_lm()
    ids, mask = windows()
    np.savez(tmp_path / "tokens.npz", input_ids=ids, attention_mask=mask)
    data = load_data(tmp_path / "tokens.npz", m, batch_size=5)
    outputs = run_batches(m, data)
    logits = np.concatenate([o["logits"] for o in outputs])
    want = numpy_perplexity(logits, ids, mask)
    got = perplexity(outputs, data.feeds)
    assert got["perplexity"] == pytest.approx(want, rel=1e-9)
    assert got["tokens"] == int((mask[:, 1:] & mask[:, :-1]).sum())
    # padding is left out: the same windows with other tokens in the padded positions give the same value
    np.savez(tmp_path / "other.npz", input_ids=np.where(mask == 1, ids, 7), attention_mask=mask)
    other = load_data(tmp_path / "other.npz", m, batch_size=5)
    assert perplexity(run_batches(m, other), other.feeds)["perplexity"] == pytest.approx(want, rel=1e-9)
    # through the CLI: --metric perplexity and automatically (logits + input_ids, no labels), with a ratio gate
    path = tmp_path / "lm.onnx"
    onnx.save(m, str(path))
    for extra in (["--metric", "perplexity"], []):
        assert main(["eval", str(path), "--data", str(tmp_path / "tokens.npz"), "--no-latency",
                     "--json", str(tmp_path / "e.json"), *extra]) == 0
        report = json.loads((tmp_path / "e.json").read_text())
        assert report["candidate"]["perplexity"]["perplexity"] == pytest.approx(want, rel=1e-9)
    assert main(["eval", str(path), "--data", str(tmp_path / "tokens.npz"), "--no-latency", "--reference", str(path),
                 "--max-drop", "1.0"]) == 0


needs_torch = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")


@pytest.fixture(scope="module")
def cache_lm(tiny_decoder):
    """A small random LLaMA-like causal LM with grouped-query attention and explicit past/present cache."""
    return tiny_decoder(hidden=32, heads=4, kv_heads=2, layers=2, vocab=V)


@needs_torch
def test_cache_inputs_are_fed_empty_and_budgets_are_ratios(cache_lm, tmp_path):
    ids, mask = windows(n=24, seq=10)
    np.savez(tmp_path / "calib.npz", input_ids=ids[:12], attention_mask=mask[:12])
    np.savez(tmp_path / "held.npz", input_ids=ids[12:], attention_mask=mask[12:])
    m = onnx.load(str(cache_lm))
    data = load_data(tmp_path / "held.npz", m, batch_size=6)
    assert data.feeds[0]["past_key_values.0.key"].shape == (6, 2, 0, 8) and "fed empty" in data.source
    result = evaluate(m, data, latency=False)
    outputs = run_batches(m, data)
    logits = np.concatenate([o["logits"] for o in outputs])
    assert result["candidate"]["perplexity"]["perplexity"] == pytest.approx(
        numpy_perplexity(logits, ids[12:], mask[12:]), rel=1e-6)

    assert main(["sensitivity", str(cache_lm), "--data", str(tmp_path / "held.npz"), "--ratios", "0.5",
                 "--json", str(tmp_path / "s.json")]) == 0
    sens = json.loads((tmp_path / "s.json").read_text())
    assert sens["metric"] == "perplexity_kept" and sens["baseline"] == pytest.approx(100.0)
    assert len(sens["rows"]) == 4 and any(abs(row["drops"][0]) > 0.1 for row in sens["rows"])

    out = tmp_path / "p.onnx"
    assert main(["prune", str(cache_lm), "--data", str(tmp_path / "calib.npz"), "--eval-data",
                 str(tmp_path / "held.npz"), "--max-drop", "1.3", "--recover", "lstsq", "-o", str(out),
                 "--json", str(tmp_path / "p.json")]) == 0
    report = json.loads((tmp_path / "p.json").read_text())
    ok = [s for s in report["search"] if s["ok"]]
    assert ok and all(s["perplexity_ratio"] <= 1.3 + 1e-9 for s in ok)
    assert all(s["perplexity_ratio"] > 1.3 for s in report["search"] if not s["ok"])
    quality = report["quality"]["evaluation"]
    assert quality["metric"] == "perplexity" and quality["after"] <= 1.3 * quality["before"] * (1 + 1e-6)
    assert main(["prune", str(cache_lm), "--data", str(tmp_path / "calib.npz"), "--eval-data",
                 str(tmp_path / "held.npz"), "--max-drop", "0.5", "-o", str(tmp_path / "q.onnx")]) == 2


def test_shipped_decoder(stdlib_llama):
    """models/stdlib_llama.onnx (tools/train_llm.py): 4 layers of 8 query heads in 2 KV groups, and the held-out
    perplexity docs/BENCHMARKS.md reports."""
    from onnxprune.pipeline.prepare import prepare

    m = stdlib_llama.model()
    heads = [g for g in prepare(m).analysis.prunable if g.kv_groups]
    assert [(g.size // g.head_dim, g.kv_groups) for g in heads] == [(8, 2)] * 4
    held = load_data(stdlib_llama.heldout_path, m, batch_size=64)
    assert perplexity(run_batches(m, held), held.feeds)["perplexity"] == pytest.approx(5.7150, abs=5e-4)
