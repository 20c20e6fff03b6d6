"""Transpose, Squeeze, Unsqueeze, Flatten and Reshape (onnxprune/graph/handlers/reshape.py): channels followed
through layout changes into Gemm/MatMul, NHWC transposes, window partitions; a channel shuffle freezes. Each
asserts what was pruned, the zero-channel oracle, onnx.checker."""

from __future__ import annotations

import numpy as np
import onnx

from tests.onnx_builders import build, check, check_frozen, conv, init_shape, prepare

X = {"x": [1, 3, 8, 8]}


def test_flatten_reshape_into_gemm_and_matmul():
    m = build([("Conv", ["x", "w1"], ["c1"], conv(3, 4)),
               ("Relu", ["c1"], ["r"]),
               ("Flatten", ["r"], ["f"], {"axis": 1}),
               ("Gemm", ["f", "fw", "fb"], ["g1"], {"transB": 1}),
               ("Conv", ["x", "w2"], ["c2"], conv(3, 4)),
               ("Reshape", ["c2", "shape"], ["rs"]),
               ("MatMul", ["rs", "mw"], ["mm"]),
               ("Add", ["mm", "mb"], ["ab"]),
               ("Relu", ["ab"], ["h"]),
               ("MatMul", ["h", "mw2"], ["y2"]),
               ("Identity", ["g1"], ["y1"])],
              X, ["y1", "y2"], {"w1": (4, 3, 3, 3), "fw": (6, 256), "fb": (6,), "w2": (4, 3, 3, 3),
                                "shape": np.array([1, 256]), "mw": (256, 10), "mb": (10,), "mw2": (10, 3)})
    _, r = check(m, min_groups=3)
    assert init_shape(r.model, "fw") == (6, 128)
    assert init_shape(r.model, "mw") == (128, 5)
    assert init_shape(r.model, "mw2") == (5, 3)


def test_nhwc_transposes():
    m = build([("Transpose", ["xh"], ["xc"], {"perm": [0, 3, 1, 2]}),
               ("Conv", ["xc", "w1"], ["c1"], conv(3, 8)),
               ("Relu", ["c1"], ["r1"]),
               ("Transpose", ["r1"], ["rh"], {"perm": [0, 2, 3, 1]}),
               ("Reshape", ["rh", "shape"], ["flat"]),
               ("MatMul", ["flat", "mw"], ["y"])],
              {"xh": [1, 8, 8, 3]}, ["y"], {"w1": (8, 3, 3, 3), "shape": np.array([1, -1]), "mw": (512, 5)})
    _, r = check(m)
    assert init_shape(r.model, "mw") == (256, 5)


def test_squeeze_unsqueeze_and_se_block():
    m = build([("Conv", ["x", "w1"], ["c1"], conv(3, 8)),
               ("GlobalAveragePool", ["c1"], ["gap"]),
               ("Conv", ["gap", "se1", "sb1"], ["s1"], conv(8, 2, k=1)),
               ("Relu", ["s1"], ["s1r"]),
               ("Conv", ["s1r", "se2", "sb2"], ["s2"], conv(2, 8, k=1)),
               ("HardSigmoid", ["s2"], ["gate"]),
               ("Mul", ["c1", "gate"], ["scaled"]),
               ("GlobalMaxPool", ["scaled"], ["g2"]),
               ("Squeeze", ["g2", "sq"], ["v"]),
               ("Unsqueeze", ["v", "uq"], ["v2"]),
               ("MatMul", ["v2", "mw"], ["y"])],
              X, ["y"], {"w1": (8, 3, 3, 3), "se1": (2, 8, 1, 1), "sb1": (2,), "se2": (8, 2, 1, 1), "sb2": (8,),
                         "sq": np.array([2, 3]), "uq": np.array([1]), "mw": (8, 3)})
    _, r = check(m)
    assert init_shape(r.model, "se2") == (4, 1, 1, 1)  # the SE bottleneck (2) keeps 1
    assert init_shape(r.model, "mw") == (4, 3)


def test_channel_shuffle_freezes():
    m = build([("Conv", ["x", "w1"], ["c1"], conv(3, 8)),
               ("Reshape", ["c1", "s1"], ["r1"]),
               ("Transpose", ["r1"], ["t1"], {"perm": [0, 2, 1, 3, 4]}),
               ("Reshape", ["t1", "s2"], ["r2"]),
               ("Conv", ["r2", "w2"], ["y"], conv(8, 4))],
              X, ["y"], {"w1": (8, 3, 3, 3), "s1": np.array([1, 2, 4, 8, 8]), "s2": np.array([1, 8, 8, 8]),
                         "w2": (4, 8, 3, 3)})
    check_frozen(m, "splits the channel axis")
    assert not prepare(m).analysis.prunable



def test_window_partition_reshape_handcrafted():
    """The bare form: NHWC channels through a 6-D window partition and merge, symbolic batch."""
    c = 8
    nodes = [("Conv", ["x", "w1"], ["c1"], {"kernel_shape": [1, 1]}),
             ("Transpose", ["c1"], ["t1"], {"perm": [0, 2, 3, 1]}),           # [B, 8, 8, C]
             ("Reshape", ["t1", "s6"], ["r6"]),                                # [B, 2, 4, 2, 4, C]
             ("Transpose", ["r6"], ["p6"], {"perm": [0, 1, 3, 2, 4, 5]}),     # [B, 2, 2, 4, 4, C]
             ("Reshape", ["p6", "sw"], ["win"]),                               # [B*4, 16, C]
             ("Relu", ["win"], ["a"]),
             ("Reshape", ["a", "s6b"], ["m6"]),                                # [B, 2, 2, 4, 4, C]
             ("Transpose", ["m6"], ["q6"], {"perm": [0, 1, 3, 2, 4, 5]}),
             ("Reshape", ["q6", "s4"], ["t2"]),                                # [B, 8, 8, C]
             ("Transpose", ["t2"], ["c2"], {"perm": [0, 3, 1, 2]}),
             ("Conv", ["c2", "w2"], ["y"], {"kernel_shape": [1, 1]})]
    shapes = {"s6": [-1, 2, 4, 2, 4, c], "sw": [-1, 16, c], "s6b": [-1, 2, 2, 4, 4, c], "s4": [-1, 8, 8, c]}
    weights = {"w1": (c, 3, 1, 1), "w2": (4, c, 1, 1)} | {k: np.array(v, np.int64) for k, v in shapes.items()}
    model = build(nodes, {"x": ["batch", 3, 8, 8]}, ["y"], weights)
    assert [g.prunable for g in prepare(model).analysis.groups] == [True, False]
    _, res = check(model)
    assert [int(v) for t in res.model.graph.initializer if t.name.startswith("sw") for v in
            onnx.numpy_helper.to_array(t)] == [-1, 16, 4]

