"""Issue 12, dynamic and odd input dims: --input-shapes, else the data's shapes, else 1 where it works.

Validation feeds and MAC counts use the same shapes; a non-batch dim that cannot be guessed is a one-line error
that names the input and the option.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from onnxprune.cli import main
from onnxprune.errors import InputError
from onnxprune.pipeline.prune import RunSettings, prune_model
from onnxprune.recipe import Recipe
from onnxprune.runtime.feeds import resolve_shapes, validation_feed
from tests.onnx_builders import build

# two unpadded 3x3 convs: a 1x1 (or 3x3) image cannot run, so H and W cannot be guessed
NODES = [("Conv", ["x", "w1"], ["c1"], {"kernel_shape": [3, 3]}), ("Relu", ["c1"], ["r"]),
         ("Conv", ["r", "w2"], ["c2"], {"kernel_shape": [3, 3]}), ("GlobalAveragePool", ["c2"], ["y"])]
WEIGHTS = {"w1": (8, 3, 3, 3), "w2": (4, 8, 3, 3)}


def macs(h, w):
    return 8 * 27 * (h - 2) * (w - 2) + 4 * 72 * (h - 4) * (w - 4)


@pytest.fixture()
def dynamic(tmp_path):
    path = tmp_path / "dynamic.onnx"
    onnx.save(build(NODES, {"x": ["N", 3, "H", "W"]}, ["y"], WEIGHTS), path)
    return path


def test_guess_that_cannot_run_names_the_input_and_the_option(dynamic, tmp_path, cli_error):
    out = tmp_path / "out.onnx"
    err = cli_error(["prune", str(dynamic), "-o", str(out)], "--input-shapes x:1x3xHxW")
    assert "input 'x' [N,3,H,W]" in err
    assert not out.exists()


def test_input_shapes_drive_validation_and_macs(dynamic, tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    assert main(["prune", str(dynamic), "-o", str(out), "--input-shapes", "x:1x3x16x20", "--json", str(report)]) == 0
    stats = json.loads(report.read_text())["stats"]
    assert stats["macs_before"] == macs(16, 20)
    assert stats["macs_after"] == 4 * 27 * 14 * 18 + 4 * 36 * 12 * 16
    # the interface stays dynamic: the shapes were for checking only
    dims = onnx.load(out).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", 3, "H", "W"]


def test_analyze_counts_macs_at_the_given_shapes(dynamic, tmp_path):
    report = tmp_path / "analysis.json"
    assert main(["analyze", str(dynamic), "--input-shapes", "1x3x10x10", "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["input_shapes"] == {"x": [1, 3, 10, 10]} and data["macs"] == macs(10, 10)


def test_shapes_from_the_data(dynamic, tmp_path):
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((6, 3, 12, 12)).astype(np.float32))
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    assert main(["prune", str(dynamic), "-o", str(out), "--data", str(data), "--criterion", "l1",
                 "--json", str(report)]) == 0
    assert json.loads(report.read_text())["stats"]["macs_before"] == macs(12, 12)
    model = onnx.load(dynamic)
    feed = validation_feed(model, data=[{"x": np.zeros((6, 3, 12, 12), np.float32)}])
    assert feed["x"].shape == (1, 3, 12, 12)


def test_sensitivity_and_quantize_take_input_shapes(dynamic, tmp_path):
    assert main(["sensitivity", str(dynamic), "--random", "4", "--input-shapes", "x:1x3x12x12",
                 "--ratios", "0.5"]) == 0
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(dynamic), "--mode", "static", "--random", "4", "--input-shapes",
                 "x:1x3x12x12", "-o", str(out), "--no-latency", "--quiet"]) == 0
    assert out.exists()


def test_batch_like_dims_default_to_one():
    model = build(NODES, {"x": [-1, 3, 8, 8]}, ["y"], WEIGHTS)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert resolve_shapes(model)[0] == {"x": (1, 3, 8, 8)}
    dims[0].Clear()  # missing
    assert resolve_shapes(model)[0] == {"x": (1, 3, 8, 8)}
    dims[0].dim_value = 0
    assert resolve_shapes(model)[0] == {"x": (1, 3, 8, 8)}
    res = prune_model(build(NODES, {"x": [-1, 3, 8, 8]}, ["y"], WEIGHTS), Recipe(ratio=0.5), RunSettings(input_shapes={"x": (2, 3, 8, 8)}))
    assert res.stats["macs_before"] == 2 * macs(8, 8)


def test_input_shapes_errors(dynamic):
    model = onnx.load(dynamic)
    with pytest.raises(InputError, match="contradicts"):
        resolve_shapes(model, {"x": (1, 4, 8, 8)})
    with pytest.raises(InputError, match="not a model input"):
        resolve_shapes(model, {"image": (1, 3, 8, 8)})
    with pytest.raises(InputError, match="3 dimensions"):
        resolve_shapes(model, {"x": (1, 3, 8)})
