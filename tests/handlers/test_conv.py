"""Conv and ConvTranspose (onnxprune/graph/handlers/conv.py): plain, depthwise, grouped, transposed, an output cut
in parts, weights shared through Identity. Each asserts what was pruned, the zero-channel oracle, onnx.checker."""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.graph.stats import count_params
from onnxprune.recipe import Recipe
from tests.onnx_builders import (
    build,
    check,
    check_frozen,
    conv,
    init_shape,
    prepare,
    prune_model,
)

X = {"x": [1, 3, 8, 8]}


def test_conv_bn_relu_conv():
    m = build([("Conv", ["x", "w1", "b1"], ["c1"], conv(3, 8)),
               ("BatchNormalization", ["c1", "g", "be", "mu", "var"], ["n1"]),
               ("Relu", ["n1"], ["r1"]),
               ("Conv", ["r1", "w2"], ["y"], conv(8, 4))],
              X, ["y"], {"w1": (8, 3, 3, 3), "b1": (8,), "g": (8,), "be": (8,), "mu": (8,),
                         "var": np.abs(np.random.default_rng(1).standard_normal(8)).astype(np.float32) + 0.5,
                         "w2": (4, 8, 3, 3)})
    _, r = check(m)
    assert init_shape(r.model, "w1") == (4, 3, 3, 3)
    assert init_shape(r.model, "g") == (4,)
    assert init_shape(r.model, "w2") == (4, 4, 3, 3)


def test_depthwise_and_multiplier():
    m = build([("Conv", ["x", "w1"], ["c1"], conv(3, 8)),
               ("Conv", ["c1", "dw", "db"], ["d1"], conv(8, 8, group=8)),
               ("Conv", ["d1", "dw2"], ["d2"], conv(8, 16, group=8)),
               ("Conv", ["d2", "w3"], ["y"], conv(16, 4, k=1))],
              X, ["y"], {"w1": (8, 3, 3, 3), "dw": (8, 1, 3, 3), "db": (8,), "dw2": (16, 1, 3, 3),
                         "w3": (4, 16, 1, 1)})
    _, r = check(m)
    assert init_shape(r.model, "dw") == (4, 1, 3, 3)
    assert init_shape(r.model, "dw2") == (8, 1, 3, 3)
    assert init_shape(r.model, "w3") == (4, 8, 1, 1)
    groups = {n.name: n for n in r.model.graph.node}
    assert onnx.helper.get_attribute_value(groups["conv_1"].attribute[-1]) == 4


def test_grouped_conv_keeps_equal_groups():
    m = build([("Conv", ["x", "w1"], ["c1"], conv(3, 8)),
               ("Conv", ["c1", "gw"], ["c2"], conv(8, 8, group=2)),
               ("Relu", ["c2"], ["r"]),
               ("Conv", ["r", "w3"], ["y"], conv(8, 4))],
              X, ["y"], {"w1": (8, 3, 3, 3), "gw": (8, 4, 3, 3), "w3": (4, 8, 3, 3)})
    groups = prepare(m).analysis.prunable
    assert sorted((g.blocks, g.tied) for g in groups) == [(2, False), (2, True)]
    _, r = check(m, min_groups=2)
    assert init_shape(r.model, "gw") == (4, 2, 3, 3)
    kept = [k for k in r.plan.kept.values()]
    assert all(((k < 4).sum() == (k >= 4).sum()) for k in kept)  # two equal blocks each


def test_conv_transpose():
    m = build([("Conv", ["x", "w1"], ["c1"], conv(3, 8)),
               ("ConvTranspose", ["c1", "tw", "tb"], ["t1"], {"kernel_shape": [2, 2], "strides": [2, 2]}),
               ("Relu", ["t1"], ["r"]),
               ("Conv", ["r", "w3"], ["y"], conv(6, 4))],
              X, ["y"], {"w1": (8, 3, 3, 3), "tw": (8, 6, 2, 2), "tb": (6,), "w3": (4, 6, 3, 3)})
    _, r = check(m, min_groups=2)
    assert init_shape(r.model, "tw") == (4, 3, 2, 2)


def test_conv_output_cut_in_parts():
    """A conv whose output is split right away (YOLOv8's C2f: `conv(x).chunk(2, 1)`) opens one space per part:
    here the parts are added, so they lose the same channels, and the split sizes follow."""
    m = build([("Conv", ["x", "w1"], ["c1"], conv(3, 8)),
               ("Split", ["c1", "sizes"], ["s1", "s2"], {"axis": 1}),
               ("Add", ["s1", "s2"], ["a"]),
               ("Conv", ["a", "w2"], ["y"], conv(4, 4))],
              X, ["y"], {"w1": (8, 3, 3, 3), "sizes": np.array([4, 4]), "w2": (4, 4, 3, 3)})
    _, r = check(m)
    assert init_shape(r.model, "w1") == (4, 3, 3, 3) and init_shape(r.model, "w2") == (4, 2, 3, 3)


def test_identity_before_shared_initializer():
    """TorchScript puts Identity nodes in front of a weight that several layers share: the layers lose the same
    channels so that the weight stays one tensor, and here, where one of them reaches a graph output, none do."""
    m = build([("Identity", ["w"], ["w_a"]),
               ("Identity", ["w"], ["w_b"]),
               ("Conv", ["x", "w_a"], ["c1"], conv(3, 8)),
               ("Relu", ["c1"], ["r1"]),
               ("Conv", ["x", "w_b"], ["c2"], conv(3, 8)),
               ("Conv", ["r1", "w2"], ["y1"], conv(8, 4)),
               ("Sigmoid", ["c2"], ["y2"])],
              X, ["y1", "y2"], {"w": (8, 3, 3, 3), "w2": (4, 8, 3, 3)})
    (group,) = [g for g in prepare(m).analysis.groups if g.size == 8]
    assert not group.prunable and "reaches graph output y2" in group.reason
    assert prune_model(m, Recipe(ratio=0.5)).stats["params_after"] == count_params(m)
    check_frozen(m, "reaches graph output y2")  # nothing pruned, outputs unchanged, checker passes


