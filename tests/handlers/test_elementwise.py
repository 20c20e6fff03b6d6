"""Element-wise ops (onnxprune/graph/handlers/elementwise.py): unary ops pass channels, broadcasting binary ops
merge the groups they join (residual Add, Where), Gather on another axis carries them, a graph output freezes
them. Each asserts what was pruned, the zero-channel oracle, onnx.checker."""

from __future__ import annotations

import numpy as np

from tests.onnx_builders import build, check, check_frozen, conv, init_shape, prepare

X = {"x": [1, 3, 8, 8]}
S, E = 4, 8


def test_residual_add_merges_groups():
    m = build([("Conv", ["x", "w1"], ["c1"], conv(3, 8)),
               ("Relu", ["c1"], ["r1"]),
               ("Conv", ["r1", "w2"], ["c2"], conv(8, 8)),
               ("Add", ["c2", "r1"], ["a"]),
               ("Conv", ["a", "w3"], ["y"], conv(8, 4))],
              X, ["y"], {"w1": (8, 3, 3, 3), "w2": (8, 8, 3, 3), "w3": (4, 8, 3, 3)})
    prep = prepare(m)
    assert len(prep.analysis.prunable) == 1 and len(prep.analysis.prunable[0].sources) == 2
    _, r = check(m)
    assert init_shape(r.model, "w1") == (4, 3, 3, 3) and init_shape(r.model, "w2") == (4, 4, 3, 3)
    assert init_shape(r.model, "w3") == (4, 4, 3, 3)


def test_where_and_broadcast_of_a_full_size_activation_freezes():
    m = build([("Conv", ["x", "w1"], ["c1"], conv(3, 8)),
               ("Conv", ["x", "w2"], ["c2"], conv(3, 8)),
               ("Greater", ["c1", "zero"], ["mask"]),
               ("Where", ["mask", "c1", "c2"], ["w"]),
               ("Conv", ["w", "w3"], ["y"], conv(8, 4))],
              X, ["y"], {"w1": (8, 3, 3, 3), "w2": (8, 3, 3, 3), "zero": np.zeros((1,), np.float32),
                         "w3": (4, 8, 3, 3)})
    groups = prepare(m).analysis.prunable
    assert len(groups) == 1 and len(groups[0].sources) == 2  # c1 and c2 must lose the same channels
    _, r = check(m)
    assert init_shape(r.model, "w1") == init_shape(r.model, "w2") == (4, 3, 3, 3)
    assert init_shape(r.model, "w3") == (4, 4, 3, 3)


def test_graph_output_freezes_its_channels():
    m = build([("Conv", ["x", "w1"], ["y"], conv(3, 8))], X, ["y"], {"w1": (8, 3, 3, 3)})
    check_frozen(m, "reaches graph output")



def test_gather_on_other_axis_carries_channels():
    m = build([("MatMul", ["x", "w1"], ["h"]), ("Relu", ["h"], ["r"]),
               ("Gather", ["r", "idx"], ["g"], {"axis": 1}), ("MatMul", ["g", "w2"], ["y"])],
              {"x": [1, S, E]}, ["y"], {"w1": (E, 6), "idx": np.array(0, dtype=np.int64), "w2": (6, 3)})
    assert len(prepare(m).analysis.prunable) == 1
    _, r = check(m)
    assert init_shape(r.model, "w1") == (E, 3) and init_shape(r.model, "w2") == (3, 3)

