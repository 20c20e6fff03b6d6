"""Shape tensors after pruning (onnxprune/graph/handlers/shapes.py): a target shape's channel entry follows the
pruned channels when it is a constant, and freezes the group when it cannot be traced. Each asserts what was
pruned, the zero-channel oracle, onnx.checker."""

from __future__ import annotations

import numpy as np
import onnx

from tests.onnx_builders import build, check, check_frozen, prepare


def test_expand_to_a_constant_shape_follows_the_channels():
    """Found by tools/fuzz.py (seed 120): Expand passed channels but kept its constant target [1, C, H, W], so the
    pruned model failed the checker (contained by the bisection). The target's channel entry now follows."""
    nodes = [("Conv", ["x", "w1"], ["c1"], {"kernel_shape": [1, 1]}),
             ("ReduceMean", ["c1"], ["m"], {"axes": [3], "keepdims": 1}),
             ("Expand", ["m", "shape"], ["e"]),
             ("Add", ["c1", "e"], ["a"]),
             ("Conv", ["a", "w2"], ["y"], {"kernel_shape": [1, 1]})]
    model = build(nodes, {"x": [1, 3, 4, 4]}, ["y"], {"w1": (8, 3, 1, 1), "w2": (4, 8, 1, 1),
                                                       "shape": np.array([1, 8, 4, 4], np.int64)})
    _, res = check(model)
    assert res.stats["groups_pruned"] == 1
    shape = next(t for t in res.model.graph.initializer if t.name.startswith("shape"))
    assert onnx.numpy_helper.to_array(shape).tolist() == [1, 4, 4, 4]


def test_expand_with_an_untraceable_shape_freezes():
    nodes = [("Conv", ["x", "w1"], ["c1"], {"kernel_shape": [1, 1]}),
             ("ReduceMean", ["c1"], ["m"], {"axes": [3], "keepdims": 1}),
             ("Shape", ["z"], ["s"]),
             ("Expand", ["m", "s"], ["e"]),
             ("Add", ["c1", "e"], ["a"]),
             ("Conv", ["a", "w2"], ["y"], {"kernel_shape": [1, 1]})]
    model = build(nodes, {"x": [1, 3, 4, 4], "z": ["n", 8, 4, 4]}, ["y"], {"w1": (8, 3, 1, 1), "w2": (4, 8, 1, 1)})
    prep = prepare(model)
    assert not prep.analysis.faults and not prep.analysis.prunable
    assert "Expand" in prep.analysis.groups[0].reason
    check_frozen(model, "Expand")



def test_expand_to_a_shape_built_by_concat_rewrites_its_constant_piece():
    """TorchScript's form: the target is a Concat of 1-D pieces, constant ([1], [C]) or read at run time
    (Shape(x)[2:]). The constant channel piece follows the pruned channels; the run-time piece needs nothing."""
    nodes = [("Conv", ["x", "w1"], ["c1"], {"kernel_shape": [1, 1]}),
             ("ReduceMean", ["c1"], ["m"], {"axes": [3], "keepdims": 1}),
             ("Shape", ["x"], ["sx"]),
             ("Slice", ["sx", "two", "four"], ["hw"]),
             ("Concat", ["one", "channels", "hw"], ["target"], {"axis": 0}),
             ("Expand", ["m", "target"], ["e"]),
             ("Add", ["c1", "e"], ["a"]),
             ("Conv", ["a", "w2"], ["y"], {"kernel_shape": [1, 1]})]
    weights = {"w1": (8, 3, 1, 1), "w2": (4, 8, 1, 1), "one": np.array([1], np.int64),
               "channels": np.array([8], np.int64), "two": np.array([2], np.int64), "four": np.array([4], np.int64)}
    model = build(nodes, {"x": [1, 3, "h", "w"]}, ["y"], weights)  # symbolic: the Concat is not folded
    _, res = check(model)
    assert [n.op_type for n in res.model.graph.node if n.op_type == "Concat"] == ["Concat"]
    piece = next(t for t in res.model.graph.initializer if t.name.startswith("channels"))
    assert onnx.numpy_helper.to_array(piece).tolist() == [4]
