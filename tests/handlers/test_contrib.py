"""onnxruntime's contrib ops as onnxruntime-genai writes them, and validation that is never stricter than the
original: SimplifiedLayerNormalization (in the ONNX domain, as onnxruntime registers it; onnx.checker knows no
such op), SkipSimplifiedLayerNormalization residual chains, RotaryEmbedding, MatMulNBits, fused onnxruntime ops
(onnxprune/graph/handlers/contrib.py, attention.py). Each asserts what was pruned, the zero-channel oracle and
onnx.checker (or, where the original itself fails onnx.checker, what the original passes)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import ValidationError
from onnxprune.recipe import Recipe
from tests.onnx_builders import (
    check,
    check_as_original,
    check_frozen,
    checked,
    prepare,
    prune_model,
    run,
)

E, F, S = 16, 32, 4


def model(nodes, weights, inputs, outputs, opset=17):
    graph = helper.make_graph(nodes, "contrib", inputs, outputs,
                              [numpy_helper.from_array(v, n) for n, v in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                   helper.make_opsetid("com.microsoft", 1)], ir_version=8)


def rand(*shape, seed=0):
    return (np.random.default_rng(seed + sum(shape)).standard_normal(shape) * 0.5).astype(np.float32)


def decoder_block(prune_hidden_table=False):
    """embedding -> SimplifiedLayerNormalization -> MLP (up, Relu, down) -> SkipSimplifiedLayerNormalization
    (residual) -> MLP -> SkipSimplifiedLayerNormalization -> lm head, as the model builder chains them."""
    nodes = [helper.make_node("Gather", ["table", "ids"], ["h0"], name="embed"),
             helper.make_node("SimplifiedLayerNormalization", ["h0", "g0"], ["n0"], name="norm0", axis=-1,
                              epsilon=1e-6),
             helper.make_node("MatMul", ["n0", "up0"], ["u0"], name="up0"),
             helper.make_node("Relu", ["u0"], ["r0"], name="relu0"),
             helper.make_node("MatMul", ["r0", "down0"], ["d0"], name="down0"),
             helper.make_node("SkipSimplifiedLayerNormalization", ["h0", "d0", "g1"], ["n1", "", "", "h1"],
                              name="norm1", domain="com.microsoft", epsilon=1e-6),
             helper.make_node("MatMul", ["n1", "up1"], ["u1"], name="up1"),
             helper.make_node("Relu", ["u1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "down1"], ["d1"], name="down1"),
             helper.make_node("SkipSimplifiedLayerNormalization", ["h1", "d1", "g2"], ["n2"], name="norm2",
                              domain="com.microsoft", epsilon=1e-6),
             helper.make_node("MatMul", ["n2", "head"], ["logits"], name="head")]
    weights = {"table": rand(50, E), "g0": rand(E) + 1, "g1": rand(E) + 1, "g2": rand(E) + 1, "up0": rand(E, F),
               "down0": rand(F, E), "up1": rand(E, F, seed=1), "down1": rand(F, E, seed=1), "head": rand(E, 50)}
    return model(nodes, weights, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
                 [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", 50])])


def ids_feed():
    return {"ids": np.random.default_rng(0).integers(0, 50, (2, S)).astype(np.int64)}


def test_simplified_norms_and_residual_chain():
    m = decoder_block()
    with pytest.raises(Exception, match="SimplifiedLayerNormalization"):
        onnx.checker.check_model(m)  # the original itself fails onnx.checker: the op is onnxruntime's
    groups = prepare(m).analysis.groups
    mlp = [g for g in groups if g.prunable]
    assert sorted(g.size for g in mlp) == [F, F]
    hidden = next(g for g in groups if g.size == E)
    assert not hidden.prunable and "residual stream through SkipSimplifiedLayerNormalization" in hidden.reason
    # validated as onnxruntime checks it: no refusal for the contrib op
    oracle, r = check(m, feed=ids_feed(), fraction=0.5, checker="as_original")
    assert oracle.pruned_channels == F
    moved = np.abs(run(oracle.zeroed, ids_feed())[0] - run(m, ids_feed())[0]).max()
    assert moved > 1e-2 * np.abs(run(m, ids_feed())[0]).max()
    assert sorted(t.dims[1] for t in r.model.graph.initializer if t.name.startswith("up")) == [F // 2, F // 2]


def test_prune_hidden_through_the_skip_norms():
    m = decoder_block()
    groups = prepare(m, prune_hidden=True).analysis.prunable
    hidden = next(g for g in groups if g.size == E)
    ops = {mem.op_type for mem in hidden.members}
    assert {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "Gather"} <= ops
    r = prune_model(m, Recipe(ratio=0.25, prune_hidden=True))
    assert run(r.model, ids_feed())[0].shape == (2, S, 50)
    shapes = {t.name.split("__")[0]: tuple(t.dims) for t in r.model.graph.initializer}
    assert shapes["g1"] == (12,) and shapes["table"] == (50, 12)
    # no zero-channel oracle: removing hidden features changes the RMS statistics (the prune_hidden approximation)
    checked(r.model, m, "as_original")


def test_validation_is_never_stricter_than_the_original():
    m = decoder_block()
    check_as_original(m, m)  # fails the full check, passes the structural one: accepted
    broken = onnx.ModelProto()
    broken.CopyFrom(m)
    broken.graph.node[2].input[1] = "missing"  # something the original does not do wrong
    with pytest.raises(ValidationError, match="structure"):
        check_as_original(broken, m)
    plain = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]), opset_imports=[helper.make_opsetid("", 17)])
    bad = onnx.ModelProto()
    bad.CopyFrom(plain)
    bad.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 3  # shape inference disagrees
    with pytest.raises(ValidationError, match="fails onnx.checker"):
        check_as_original(bad, plain)  # the original passes the full check, so the candidate must too


def rotary_model(heads=2, head=8):
    """q projection -> com.microsoft RotaryEmbedding on [batch, seq, heads·head] -> output projection."""
    positions = np.arange(16)[:, None] * (10000.0 ** (-np.arange(head // 2) / (head // 2)))[None, :]
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
             helper.make_node("RotaryEmbedding", ["q", "pos", "cos", "sin"], ["qr"], name="rotary",
                              domain="com.microsoft", num_heads=heads),
             helper.make_node("MatMul", ["qr", "wo"], ["y"], name="o_proj")]
    weights = {"wq": rand(E, heads * head), "wo": rand(heads * head, E), "pos": np.arange(S)[None].astype(np.int64),
               "cos": np.cos(positions).astype(np.float32), "sin": np.sin(positions).astype(np.float32)}
    return model(nodes, weights, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, S, E])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, S, E])])


def test_rotary_embedding_keeps_heads_whole():
    m = rotary_model()
    (group,) = prepare(m).analysis.prunable
    assert group.unit == 8  # rotation pairs features inside a head: whole heads only
    feed = {"x": rand(1, S, E, seed=5)}
    oracle, r = check(m, feed=feed, fraction=0.5)
    assert oracle.pruned_channels == 8
    assert np.abs(run(oracle.zeroed, feed)[0] - run(m, feed)[0]).max() > 1e-2
    node = next(n for n in r.model.graph.node if n.op_type == "RotaryEmbedding")
    assert {a.name: a.i for a in node.attribute}["num_heads"] == 1


def test_matmul_nbits_freezes_with_a_reason():
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMulNBits", ["r", "b", "scales"], ["y"], name="fc2", domain="com.microsoft",
                              K=F, N=E, bits=4, block_size=32)]
    weights = {"w1": rand(E, F), "b": np.zeros((E, 1, 16), np.uint8), "scales": np.ones(E, np.float32)}
    m = model(nodes, weights, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, E])],
              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, E])])
    (group,) = [g for g in prepare(m).analysis.groups if g.size == F]
    assert not group.prunable and "MatMulNBits" in group.reason and "quantize --mode int4" in group.reason
    check_frozen(m, "quantize --mode int4")


def test_fused_onnxruntime_ops_freeze_with_a_reason():
    """A com.microsoft FastGelu between two layers (what onnxruntime's transformer optimizer writes) freezes the
    neurons with a reason that says how to get a prunable model."""
    graph = onnx.parser.parse_graph("""
        g (float[2, 8] x) => (float[2, 8] y) <float[8, 16] w1, float[16, 8] w2> {
            h = MatMul(x, w1)
            a = com.microsoft.FastGelu(h)
            y = MatMul(a, w2)
        }""")
    rng = np.random.default_rng(0)
    graph.initializer.extend(onnx.numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
                             for n, s in (("w1", (8, 16)), ("w2", (16, 8))))
    graph.node[1].domain = "com.microsoft"
    graph.node[1].op_type = "FastGelu"
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17),
                                                         onnx.helper.make_opsetid("com.microsoft", 1)])
    group = next(g for g in prepare(model).analysis.groups if g.size == 16)
    assert not group.prunable
    assert "fused by onnxruntime's transformer optimizer; prune the unfused export" in group.reason
    check_frozen(model, "fused by onnxruntime's transformer optimizer")

