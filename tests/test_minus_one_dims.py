"""Issue 19 item 5: `dim_value: -1` (paddle2onnx's convention for a dynamic dim) meets data and --input-shapes.

A paddle2onnx-style conv classifier whose input is [-1,3,48,192] prunes with calibration data (least-squares
recovery, and a plain ratio), with and without --input-shapes, and the result runs; data that contradicts a
truly fixed dim is a one-line error naming both shapes.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.cli import main
from onnxprune.evaluate.data import load_data


def paddle_style_classifier() -> onnx.ModelProto:
    """conv-relu-conv-relu-pool-flatten-gemm-softmax with the batch dim written dim_value -1, H and W -1 too."""
    rng = np.random.default_rng(0)
    weights = {"w1": rng.standard_normal((8, 3, 3, 3)) * 0.3, "b1": rng.standard_normal(8) * 0.1,
               "w2": rng.standard_normal((16, 8, 3, 3)) * 0.2, "b2": rng.standard_normal(16) * 0.1,
               "wf": rng.standard_normal((16, 4)) * 0.3, "bf": rng.standard_normal(4) * 0.1}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["g"]),
             helper.make_node("Softmax", ["g"], ["y"], axis=1)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, 48, 192])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 4])
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    graph = helper.make_graph(nodes, "paddle_cls", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    return model


@pytest.fixture(scope="module")
def paddle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("paddle")
    model, data = folder / "cls.onnx", folder / "calib.npz"
    onnx.save(paddle_style_classifier(), model)
    np.savez(data, x=np.random.default_rng(1).standard_normal((6, 3, 48, 192)).astype(np.float32))
    return model, data


def runs(path, batch: int = 3) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(2).standard_normal((batch, 3, 48, 192)).astype(np.float32)
    y = session.run(None, {"x": x})[0]
    assert y.shape == (batch, 4) and np.allclose(y.sum(axis=1), 1, atol=1e-5)
    return y


@pytest.mark.parametrize("extra", [["--recover", "lstsq"], [], ["--recover", "lstsq", "--input-shapes",
                                                                  "x:2x3x48x192"]],
                         ids=["lstsq", "plain", "lstsq-input-shapes"])
def test_minus_one_batch_prunes_with_data(paddle, tmp_path, extra):
    model, data = paddle
    out = tmp_path / "out.onnx"
    assert main(["prune", str(model), "-o", str(out), "--ratio", "0.3", "--data", str(data),
                 *extra]) == 0
    pruned = onnx.load(out)
    onnx.checker.check_model(pruned, full_check=True)
    conv1 = next(t for t in pruned.graph.initializer if t.name.startswith("w1"))
    assert conv1.dims[0] < 8  # something was pruned
    assert [d.dim_value for d in pruned.graph.input[0].type.tensor_type.shape.dim] == [-1, 3, 48, 192]
    runs(out)


def test_input_shapes_alone_meet_minus_one(paddle, tmp_path):
    model, _ = paddle
    out = tmp_path / "out.onnx"
    assert main(["prune", str(model), "-o", str(out), "--ratio", "0.3", "--input-shapes", "x:16x3x48x192",
                 ]) == 0
    runs(out)


def test_minus_one_is_dynamic_in_the_data_loader(paddle):
    model, data = paddle
    ds = load_data(str(data), onnx.load(model), batch_size=4)
    assert [f["x"].shape[0] for f in ds.feeds] == [4, 2]


def test_data_against_a_fixed_dim_names_both_shapes(paddle, tmp_path, cli_error):
    model, _ = paddle
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((2, 3, 32, 192), np.float32))
    err = cli_error(["prune", str(model), "-o", str(tmp_path / "o.onnx"), "--ratio", "0.3", "--data", str(bad)],
                    "[2,3,32,192]")
    assert "[?,3,48,192]" in err or "[-1,3,48,192]" in err
    err = cli_error(["prune", str(model), "-o", str(tmp_path / "o.onnx"), "--input-shapes", "x:2x3x32x192"],
                    "x:2x3x32x192")
    assert "48" in err
