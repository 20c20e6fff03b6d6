"""int4 weight-only quantization of decoders (onnxruntime's MatMulNBits quantizer): quantize --mode int4 and
prune --quantize int4, on a pruned grouped-query decoder with a key/value cache; sizes and perplexity reported."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest

from onnxprune.cli import main
from onnxprune.evaluate.data import load_data
from onnxprune.evaluate.metrics import perplexity
from onnxprune.io.model_io import model_bytes
from onnxprune.pipeline.prune import prune_model
from onnxprune.quantize.quantize import quantize_model
from onnxprune.recipe import Recipe
from onnxprune.runtime.session import run_batches

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
V = 260


@pytest.fixture(scope="module")
def lm(tmp_path_factory, tiny_decoder):
    root = tmp_path_factory.mktemp("int4")
    # the shape of tools/train_llm.py's decoder (8 query heads of 16 sharing 2 k/v heads, SwiGLU of 384), 2 layers
    path = tiny_decoder(hidden=128, heads=8, kv_heads=2, layers=2, intermediate=384, vocab=V)
    rng = np.random.default_rng(0)
    np.savez(root / "held.npz", input_ids=rng.integers(0, V, (8, 16)).astype(np.int64),
             attention_mask=np.ones((8, 16), np.int64))
    return path, root / "held.npz"


def test_int4_of_a_pruned_decoder(lm, tmp_path):
    path, held = lm
    pruned = prune_model(onnx.load(str(path)), Recipe(ratio=0.3)).model
    result = quantize_model(pruned, "int4", block_size=32)
    weights = {t.name for t in result.model.graph.initializer}
    assert any(n.op_type == "MatMulNBits" for n in result.model.graph.node)
    assert not [n.name for n in result.model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert model_bytes(pruned) >= 3 * model_bytes(result.model), (model_bytes(pruned), model_bytes(result.model))
    data = load_data(held, pruned)
    float_ppl = perplexity(run_batches(pruned, data), data.feeds)["perplexity"]
    int4_ppl = perplexity(run_batches(result.model, data), data.feeds)["perplexity"]
    assert np.isfinite(int4_ppl) and abs(int4_ppl / float_ppl - 1) < 0.1  # random weights: close, not equal
    assert int4_ppl != float_ppl

    onnx.save(pruned, str(tmp_path / "pruned.onnx"))
    assert main(["quantize", str(tmp_path / "pruned.onnx"), "--mode", "int4", "--eval-data", str(held),
                 "--no-latency", "--json", str(tmp_path / "q.json")]) == 0
    report = json.loads((tmp_path / "q.json").read_text())
    assert report["size_bytes"]["before"] >= 3 * report["size_bytes"]["after"]
    evaluation = report["evaluation"]
    assert evaluation["candidate"]["perplexity"]["perplexity"] == pytest.approx(int4_ppl, rel=1e-5)
    assert evaluation["reference"]["perplexity"]["perplexity"] == pytest.approx(float_ppl, rel=1e-5)
    assert main(["quantize", str(tmp_path / "pruned.onnx"), "--mode", "int4", "--block-size", "24",
                 "-o", str(tmp_path / "x.onnx")]) == 2


def test_prune_then_int4_from_the_cli(lm, tmp_path):
    path, held = lm
    assert main(["prune", str(path), "--ratio", "0.3", "--quantize", "int4", "--data", str(held), "-o",
                 str(tmp_path / "p.onnx"), "--json", str(tmp_path / "p.json")]) == 0
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["quantize"]["mode"] == "int4"
    assert report["quantize"]["size_bytes"]["before"] >= 3 * report["quantize"]["size_bytes"]["after"]
    assert report["quality"]["calibration"]["metric"] == "perplexity"
    assert any(n.op_type == "MatMulNBits" for n in onnx.load(str(tmp_path / "p.onnx")).graph.node)
