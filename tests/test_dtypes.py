"""Issue 12, every float dtype: float16, bfloat16 and float64 models prune, validate and report.

Weights and activations in one dtype (a Conv-BN-ReLU-Conv-Flatten-MatMul-Gemm chain), mixed float16 models with
float32 inputs and outputs (onnxconverter-common's keep_io_types), and the dtype of every constant a rewrite
writes. onnxruntime's CPU provider has no bfloat16 kernels and no float64 Conv: those models run on onnx's
reference evaluator (runtime.session falls back to it).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.pipeline.prune import RunSettings, prune_model
from onnxprune.recipe import Recipe
from onnxprune.runtime.feeds import sample_feed
from onnxprune.runtime.session import run
from onnxprune.testing import zero_channel_oracle

FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
# (onnx type, numpy type, opset: bfloat16 Conv needs 22, oracle tolerance: rounding of the dtype)
DTYPES = {
    "float16": (TensorProto.FLOAT16, np.float16, 17, 3e-3),
    "bfloat16": (TensorProto.BFLOAT16, ml_dtypes.bfloat16, 22, 3e-2),
    "float64": (TensorProto.DOUBLE, np.float64, 17, 1e-12),
}


def chain(elem, npdt, opset, seed=0):
    rng = np.random.default_rng(seed)

    def w(name, shape, scale=0.5):
        return numpy_helper.from_array((scale * rng.standard_normal(shape)).astype(np.float32).astype(npdt), name)

    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1] * 4, name="conv1"),
             helper.make_node("BatchNormalization", ["c1", "g", "be", "mu", "var"], ["n1"], name="bn"),
             helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], kernel_shape=[3, 3], pads=[1] * 4, name="conv2"),
             helper.make_node("Flatten", ["c2"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "w3"], ["m"], name="fc1"),
             helper.make_node("Add", ["m", "b3"], ["a"], name="bias"),
             helper.make_node("Relu", ["a"], ["r3"], name="relu3"),
             helper.make_node("Gemm", ["r3", "w4"], ["y"], transB=1, name="fc2")]
    var = numpy_helper.from_array((np.abs(rng.standard_normal(8)) + 0.5).astype(npdt), "var")
    inits = [w("w1", (8, 3, 3, 3)), w("b1", (8,)), w("g", (8,)), w("be", (8,)), w("mu", (8,), 0.1), var,
             w("w2", (6, 8, 3, 3), 0.3), w("w3", (6 * 16, 12), 0.2), w("b3", (12,)), w("w4", (5, 12))]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", elem, ["N", 3, 4, 4])],
                              [helper.make_tensor_value_info("y", elem, ["N", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def float_types(model):
    return {t.data_type for t in model.graph.initializer if t.data_type in FLOATS}


@pytest.mark.parametrize("name", list(DTYPES))
def test_one_dtype_throughout(name):
    elem, npdt, opset, tol = DTYPES[name]
    model = chain(elem, npdt, opset)
    r = zero_channel_oracle(model)
    assert not r.faults and r.groups == 3
    # zeroing moves the outputs by about 0.5 (relative): 100x bfloat16's rounding would be more than that
    assert r.max_rel_err <= tol and r.informative(tol, factor=10), (r.max_rel_err, r.moved)
    res = prune_model(model, Recipe(ratio=0.5))
    assert not res.faults and res.stats["groups_pruned"] == 3
    assert float_types(res.model) == {elem}
    assert res.stats["params_after"] < 0.5 * res.stats["params_before"]
    assert res.stats["macs_after"] < 0.5 * res.stats["macs_before"]
    feed = sample_feed(model)
    assert feed["x"].dtype == np.dtype(npdt)
    out = run(res.model, feed)[0]
    assert out.dtype == np.dtype(npdt) and out.shape == (1, 5)
    same = run(prune_model(model, Recipe(ratio=0.0)).model, feed)[0]
    np.testing.assert_array_equal(same.astype(np.float64), run(model, feed)[0].astype(np.float64))


@pytest.mark.parametrize("name", list(DTYPES))
def test_data_aware_scores_and_recovery(name):
    elem, npdt, opset, _ = DTYPES[name]
    model = chain(elem, npdt, opset)
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((8, 3, 4, 4)).astype(np.float32).astype(npdt)} for _ in range(3)]
    for criterion, recover in (("hybrid", "lstsq"), ("activation", "bias"), ("apoz", "none")):
        res = prune_model(model, Recipe(ratio=0.5, criterion=criterion, recover=recover), RunSettings(calibration=feeds))
        assert not res.faults and res.stats["groups_pruned"] == 3, (criterion, recover)
        assert float_types(res.model) == {elem}, (criterion, recover)
        assert run(res.model, feeds[0])[0].dtype == np.dtype(npdt)


@pytest.mark.parametrize("model_name", ["digits_cnn", "digits_resnet"])
def test_mixed_float16_with_float32_io(model_name, digits):
    pytest.importorskip("onnxconverter_common")
    from onnxconverter_common import float16

    shipped = getattr(digits, model_name.removeprefix("digits_"))()  # digits.cnn() or digits.resnet()
    model = float16.convert_float_to_float16(shipped, keep_io_types=True)
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert TensorProto.FLOAT16 in float_types(model)
    r = zero_channel_oracle(model)
    assert not r.faults and r.groups >= 3
    assert r.max_rel_err <= 3e-3 and r.informative(3e-3), (r.max_rel_err, r.moved)
    res = prune_model(model, Recipe(ratio=0.5))
    assert not res.faults and float_types(res.model) == float_types(model)
    feed = sample_feed(model)
    assert run(res.model, feed)[0].dtype == np.float32


def test_constants_written_by_rewrites_keep_their_dtype():
    """Slice bounds stored as int32 stay int32; a float32 value written over a float16 constant becomes
    float16 (RewriteContext.set_input_constant)."""
    from onnxprune.pipeline.plan import Plan
    from onnxprune.pipeline.prepare import prepare
    from onnxprune.pipeline.rewrite import RewriteContext

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[1, 1], name="conv1"),
             helper.make_node("Conv", ["x", "w0"], ["c0"], kernel_shape=[1, 1], name="conv0"),
             helper.make_node("Concat", ["c0", "c1"], ["cat"], axis=1, name="concat"),
             helper.make_node("Slice", ["cat", "st", "en", "ax"], ["s"], name="slice"),
             helper.make_node("Conv", ["s", "w2"], ["y"], kernel_shape=[1, 1], name="conv2")]
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "w0"),
             numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array([0], np.int32), "st"),
             numpy_helper.from_array(np.array([4], np.int32), "en"),
             numpy_helper.from_array(np.array([1], np.int32), "ax")]
    graph = helper.make_graph(nodes, "s", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model = onnx.shape_inference.infer_shapes(model)
    res = prune_model(model, Recipe(ratio=0.5))
    assert res.stats["groups_pruned"] == 1  # conv0's channels (conv1's are sliced away and read by nobody)
    bounds = {t.name.split("__")[0]: t.data_type for t in res.model.graph.initializer}
    assert bounds["st"] == bounds["en"] == TensorProto.INT32
    assert any(t.name.startswith("en__pruned") for t in res.model.graph.initializer)

    half = helper.make_model(helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["y"], name="mul")], "h",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2])],
        [numpy_helper.from_array(np.array([1, 2], np.float16), "k")]), opset_imports=[helper.make_opsetid("", 17)])
    prep = prepare(half)
    ctx = RewriteContext(onnx.ModelProto(), prep.view, prep.analysis, Plan())
    node = onnx.NodeProto()
    node.CopyFrom(half.graph.node[0])
    ctx.set_input_constant(node, 1, np.array([3.0, 4.0], np.float32))
    assert ctx.model.graph.initializer[0].data_type == TensorProto.FLOAT16
