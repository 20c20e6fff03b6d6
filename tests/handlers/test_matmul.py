"""Gemm and MatMul (onnxprune/graph/handlers/matmul.py): neuron chains with either weight layout, weights shared
by two layers stay one tensor. Each asserts what was pruned, the zero-channel oracle, onnx.checker."""

from __future__ import annotations

import pytest

from tests.onnx_builders import build, check, init_shape, prepare

S, E = 4, 8


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_chain(trans_b):
    w1 = (16, 8) if trans_b else (8, 16)
    w2 = (4, 16) if trans_b else (16, 4)
    m = build([("Gemm", ["v", "w1", "b1"], ["h"], {"transB": trans_b}),
               ("Tanh", ["h"], ["t"]),
               ("Gemm", ["t", "w2"], ["y"], {"transB": trans_b})],
              {"v": [2, 8]}, ["y"], {"w1": w1, "b1": (16,), "w2": w2})
    _, r = check(m)
    assert init_shape(r.model, "b1") == (8,)



def test_shared_weights_stay_shared():
    """Two layers applying the same weights (ALBERT's repeated layer), once read directly and once through the
    Identity nodes TorchScript writes: one group, and the pruned weights are still one tensor each."""
    for via_identity in (False, True):
        second = ["w1_alias", "w2_alias"] if via_identity else ["w1", "w2"]
        nodes = [("MatMul", ["x", "w1"], ["a"]), ("Relu", ["a"], ["ra"]), ("MatMul", ["ra", "w2"], ["h"]),
                 ("MatMul", ["h", second[0]], ["b"]), ("Relu", ["b"], ["rb"]), ("MatMul", ["rb", second[1]], ["y"])]
        if via_identity:
            nodes = [("Identity", ["w1"], ["w1_alias"]), ("Identity", ["w2"], ["w2_alias"])] + nodes
        m = build(nodes, {"x": [1, S, E]}, ["y"], {"w1": (E, 6), "w2": (6, E)})
        (group,) = prepare(m).analysis.prunable
        assert group.size == 6
        _, r = check(m, fraction=0.5)
        weights = [t for t in r.model.graph.initializer if len(t.dims) == 2]
        assert sorted(tuple(t.dims) for t in weights) == sorted([(E, 3), (3, E)])
        assert r.stats["params_after"] < r.stats["params_before"]

