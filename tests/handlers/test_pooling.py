"""Pooling, Resize, Pad, reductions and ops along an axis (onnxprune/graph/handlers/pooling.py): spatial ops pass
channels, a Resize whose sizes cannot follow the channels freezes them. Each asserts what was pruned, the
zero-channel oracle, onnx.checker."""

from __future__ import annotations

import numpy as np

from tests.onnx_builders import build, check, check_frozen, conv, init_shape, prepare

X = {"x": [1, 3, 8, 8]}


def test_pooling_resize_pad_reduce():
    m = build([("Conv", ["x", "w1"], ["c1"], conv(3, 8)),
               ("MaxPool", ["c1"], ["p1"], {"kernel_shape": [2, 2], "strides": [2, 2]}),
               ("Resize", ["p1", "", "scales"], ["z1"], {"mode": "nearest"}),
               ("Pad", ["z1", "pads"], ["pd"]),
               ("AveragePool", ["pd"], ["ap"], {"kernel_shape": [3, 3]}),
               ("ReduceMean", ["ap"], ["rm"], {"axes": [2, 3], "keepdims": 0}),
               ("Gemm", ["rm", "fw", "fb"], ["y"], {"transB": 1})],
              X, ["y"], {"w1": (8, 3, 3, 3), "scales": np.array([1, 1, 2, 2], np.float32),
                         "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1]), "fw": (5, 8), "fb": (5,)})
    _, r = check(m)
    assert init_shape(r.model, "fw") == (5, 4)



def test_resize_sizes_from_an_unrelated_tensor_freeze():
    """A channel entry read from a tensor that does not lose the same channels cannot follow: frozen, with a
    reason, not a fault."""
    nodes = [("Conv", ["x", "w1"], ["c1"], {"kernel_shape": [1, 1]}),
             ("Shape", ["x"], ["sx"]),
             ("Resize", ["c1", "", "", "sx"], ["r"], {"mode": "nearest"}),
             ("Conv", ["r", "w2"], ["y"], {"kernel_shape": [1, 1]})]
    model = build(nodes, {"x": [1, 8, 4, 4]}, ["y"], {"w1": (8, 8, 1, 1), "w2": (4, 8, 1, 1)})
    prep = prepare(model)
    assert not prep.analysis.faults
    assert "the channel entry of its sizes is computed at run time" in prep.analysis.groups[0].reason
    check_frozen(model, "the channel entry of its sizes is computed at run time")

