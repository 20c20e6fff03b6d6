"""Unstructured magnitude pruning: requested sparsity, same shapes, smaller compressed file, honest notes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from onnx import numpy_helper

from onnxprune.cli import main
from onnxprune.io.model_io import load_model
from onnxprune.pipeline.unstructured import prune_unstructured
from onnxprune.runtime.feeds import sample_feed
from onnxprune.runtime.session import run



@pytest.fixture(scope="module")
def cnn(digits):
    return digits.cnn()


@pytest.mark.parametrize("ratio", [0.3, 0.6, 0.9])
def test_ratio_reaches_the_requested_sparsity_per_layer(cnn, ratio):
    result = prune_unstructured(cnn, ratio=ratio)
    assert len(result.layers) == 6  # 4 Conv + 2 Gemm weights
    for layer in result.layers:
        assert layer["sparsity"] == pytest.approx(ratio, abs=1.0 / layer["size"] + 1e-9)
    assert result.stats["sparsity"] == pytest.approx(ratio, abs=0.01)
    before = {t.name: tuple(t.dims) for t in cnn.graph.initializer}
    after = {t.name: tuple(t.dims) for t in result.model.graph.initializer}
    assert before == after
    assert result.stats["gzip_after"] < result.stats["gzip_before"]
    feed = sample_feed(cnn)
    assert run(result.model, feed)[0].shape == run(cnn, feed)[0].shape


def test_threshold_zeroes_exactly_the_small_weights(cnn):
    result = prune_unstructured(cnn, threshold=0.05)
    inits = {t.name: numpy_helper.to_array(t) for t in cnn.graph.initializer}
    for layer in result.layers:
        assert layer["zeros"] == int((np.abs(inits[layer["tensor"]]) < 0.05).sum())
    biases = [t for t in result.model.graph.initializer if t.name.endswith("bias")]
    for t in biases:  # biases are left alone
        np.testing.assert_array_equal(numpy_helper.to_array(t), inits[t.name])


def test_cli_reports_sparsity_and_says_it_is_not_faster(tmp_path, capsys, digits):
    model = tmp_path / "digits.onnx"
    shutil.copy(digits.cnn_path, model)
    out, report = tmp_path / "sparse.onnx", tmp_path / "r.json"
    assert main(["prune", str(model), "--mode", "unstructured", "--ratio", "0.7", "-o", str(out),
                 "--json", str(report)]) == 0
    text = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "does not run this model faster" in text and "gzip" in text
    data = json.loads(report.read_text())
    assert data["stats"]["sparsity"] == pytest.approx(0.7, abs=0.01)
    assert load_model(out).graph.initializer[0].dims == load_model(model).graph.initializer[0].dims


@pytest.mark.parametrize("argv, needle", [
    (["--mode", "unstructured", "--ratio", "0.5", "--threshold", "0.1"], "one of --ratio and --threshold"),
    (["--mode", "unstructured", "--recover", "bias"], "--recover"),
    (["--threshold", "0.1"], "--mode unstructured"),
    (["--mode", "unstructured", "--threshold", "-1"], "--threshold"),
])
def test_bad_unstructured_options(cli_error, argv, needle, digits):
    cli_error(["prune", str(digits.cnn_path), "--dry-run", *argv], needle)
