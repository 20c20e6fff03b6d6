"""One small graph per handler. Each asserts what was pruned, the zero-channel oracle, and onnx.checker."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxprune.pipeline.prune import prepare, prune_model
from onnxprune.graph.stats import count_params
from onnxprune.testing import zero_channel_oracle
from onnxprune.pipeline.validate import run, sample_feed
from tests.onnx_builders import build, init_shape

X = {"x": [1, 3, 8, 8]}


def conv(i, o, k=3, **attrs):
    return {"kernel_shape": [k, k], "pads": [k // 2] * 4, **attrs}


def check(model, min_groups=1, tol=1e-5):
    """The three assertions every handler test makes, plus ratio 0 changes nothing."""
    oracle = zero_channel_oracle(model)
    assert oracle.groups >= min_groups
    assert oracle.max_rel_err < tol, f"zero-channel oracle: rel err {oracle.max_rel_err}"
    onnx.checker.check_model(oracle.pruned, full_check=True)
    result = prune_model(model, ratio=0.5)
    onnx.checker.check_model(result.model, full_check=True)
    assert result.stats["params_after"] < result.stats["params_before"]
    same = prune_model(model, ratio=0.0)
    feed = sample_feed(model)
    for a, b in zip(run(model, feed), run(same.model, feed)):
        np.testing.assert_array_equal(a, b)
    return result


def reasons(model):
    return [g.reason for g in prepare(model).analysis.groups if not g.prunable]


def test_conv_bn_relu_conv():
    m = build([("Conv", ["x", "w1", "b1"], ["c1"], conv(3, 8)),
               ("BatchNormalization", ["c1", "g", "be", "mu", "var"], ["n1"]),
               ("Relu", ["n1"], ["r1"]),
               ("Conv", ["r1", "w2"], ["y"], conv(8, 4))],
              X, ["y"], {"w1": (8, 3, 3, 3), "b1": (8,), "g": (8,), "be": (8,), "mu": (8,),
                         "var": np.abs(np.random.default_rng(1).standard_normal(8)).astype(np.float32) + 0.5,
                         "w2": (4, 8, 3, 3)})
    r = check(m)
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
    r = check(m)
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
    r = check(m, min_groups=2)
    assert init_shape(r.model, "gw") == (4, 2, 3, 3)
    kept = [k for k in r.plan.kept.values()]
    assert all(((k < 4).sum() == (k >= 4).sum()) for k in kept)  # two equal blocks each


def test_conv_transpose():
    m = build([("Conv", ["x", "w1"], ["c1"], conv(3, 8)),
               ("ConvTranspose", ["c1", "tw", "tb"], ["t1"], {"kernel_shape": [2, 2], "strides": [2, 2]}),
               ("Relu", ["t1"], ["r"]),
               ("Conv", ["r", "w3"], ["y"], conv(6, 4))],
              X, ["y"], {"w1": (8, 3, 3, 3), "tw": (8, 6, 2, 2), "tb": (6,), "w3": (4, 6, 3, 3)})
    r = check(m, min_groups=2)
    assert init_shape(r.model, "tw") == (4, 3, 2, 2)


def test_instance_norm_prelu_and_broadcast_constants():
    m = build([("Conv", ["x", "w1"], ["c1"], conv(3, 8)),
               ("InstanceNormalization", ["c1", "s", "b"], ["n1"]),
               ("PRelu", ["n1", "slope"], ["p1"]),
               ("Mul", ["p1", "scale"], ["m1"]),
               ("Add", ["m1", "one"], ["a1"]),
               ("Conv", ["a1", "w2"], ["y"], conv(8, 4))],
              X, ["y"], {"w1": (8, 3, 3, 3), "s": (8,), "b": (8,), "slope": (8, 1, 1), "scale": (1, 8, 1, 1),
                         "one": np.ones((1,), np.float32), "w2": (4, 8, 3, 3)})
    r = check(m)
    assert init_shape(r.model, "slope") == (4, 1, 1)
    assert init_shape(r.model, "scale") == (1, 4, 1, 1)


def test_residual_add_merges_groups():
    m = build([("Conv", ["x", "w1"], ["c1"], conv(3, 8)),
               ("Relu", ["c1"], ["r1"]),
               ("Conv", ["r1", "w2"], ["c2"], conv(8, 8)),
               ("Add", ["c2", "r1"], ["a"]),
               ("Conv", ["a", "w3"], ["y"], conv(8, 4))],
              X, ["y"], {"w1": (8, 3, 3, 3), "w2": (8, 8, 3, 3), "w3": (4, 8, 3, 3)})
    prep = prepare(m)
    assert len(prep.analysis.prunable) == 1 and len(prep.analysis.prunable[0].sources) == 2
    check(m)


def test_concat_split_slice():
    m = build([("Conv", ["x", "w1"], ["c1"], conv(3, 8)),
               ("Conv", ["x", "w2"], ["c2"], conv(3, 6)),
               ("Concat", ["c1", "c2", "x"], ["cat"], {"axis": 1}),
               ("Conv", ["cat", "w3"], ["y1"], conv(17, 4)),
               ("Split", ["cat", "sizes"], ["s1", "s2", "s3"], {"axis": 1}),
               ("Slice", ["cat", "st", "en", "ax"], ["sl"]),
               ("Conv", ["s2", "w4"], ["y2"], conv(6, 4)),
               ("Conv", ["sl", "w5"], ["y3"], conv(6, 4))],
              X, ["y1", "y2", "y3"],
              {"w1": (8, 3, 3, 3), "w2": (6, 3, 3, 3), "w3": (4, 17, 3, 3), "sizes": np.array([8, 6, 3]),
               "st": np.array([8]), "en": np.array([14]), "ax": np.array([1]), "w4": (4, 6, 3, 3),
               "w5": (4, 6, 3, 3)})
    r = check(m, min_groups=2)
    assert init_shape(r.model, "w3") == (4, 4 + 3 + 3, 3, 3)


def test_split_inside_a_group_freezes():
    m = build([("Conv", ["x", "w1"], ["c1"], conv(3, 8)),
               ("Conv", ["x", "w0"], ["c0"], conv(3, 4)),
               ("Concat", ["c1", "c0"], ["cat"], {"axis": 1}),
               ("Split", ["cat", "sizes"], ["s1", "s2"], {"axis": 1}),
               ("Add", ["s1", "s2"], ["a"]),
               ("Conv", ["a", "w2"], ["y"], conv(6, 4))],
              X, ["y"], {"w1": (8, 3, 3, 3), "w0": (4, 3, 3, 3), "sizes": np.array([6, 6]), "w2": (4, 6, 3, 3)})
    assert any("splits inside" in r for r in reasons(m))


def test_conv_output_cut_in_parts():
    """A conv whose output is split right away (YOLOv8's C2f: `conv(x).chunk(2, 1)`) opens one space per part:
    here the parts are added, so they lose the same channels, and the split sizes follow."""
    m = build([("Conv", ["x", "w1"], ["c1"], conv(3, 8)),
               ("Split", ["c1", "sizes"], ["s1", "s2"], {"axis": 1}),
               ("Add", ["s1", "s2"], ["a"]),
               ("Conv", ["a", "w2"], ["y"], conv(4, 4))],
              X, ["y"], {"w1": (8, 3, 3, 3), "sizes": np.array([4, 4]), "w2": (4, 4, 3, 3)})
    r = check(m)
    assert init_shape(r.model, "w1") == (4, 3, 3, 3) and init_shape(r.model, "w2") == (4, 2, 3, 3)


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
    r = check(m)
    assert init_shape(r.model, "fw") == (5, 4)


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
    r = check(m, min_groups=3)
    assert init_shape(r.model, "fw") == (6, 128)
    assert init_shape(r.model, "mw") == (128, 5)
    assert init_shape(r.model, "mw2") == (5, 3)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_chain(trans_b):
    w1 = (16, 8) if trans_b else (8, 16)
    w2 = (4, 16) if trans_b else (16, 4)
    m = build([("Gemm", ["v", "w1", "b1"], ["h"], {"transB": trans_b}),
               ("Tanh", ["h"], ["t"]),
               ("Gemm", ["t", "w2"], ["y"], {"transB": trans_b})],
              {"v": [2, 8]}, ["y"], {"w1": w1, "b1": (16,), "w2": w2})
    r = check(m)
    assert init_shape(r.model, "b1") == (8,)


def test_nhwc_transposes():
    m = build([("Transpose", ["xh"], ["xc"], {"perm": [0, 3, 1, 2]}),
               ("Conv", ["xc", "w1"], ["c1"], conv(3, 8)),
               ("Relu", ["c1"], ["r1"]),
               ("Transpose", ["r1"], ["rh"], {"perm": [0, 2, 3, 1]}),
               ("Reshape", ["rh", "shape"], ["flat"]),
               ("MatMul", ["flat", "mw"], ["y"])],
              {"xh": [1, 8, 8, 3]}, ["y"], {"w1": (8, 3, 3, 3), "shape": np.array([1, -1]), "mw": (512, 5)})
    r = check(m)
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
    r = check(m)
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
    assert any("splits the channel axis" in r for r in reasons(m))
    assert not prepare(m).analysis.prunable


@pytest.mark.parametrize("op,extra,reason", [
    ("Softmax", {"axis": 1}, "runs over the channel axis"),
    ("LpNormalization", {"axis": 1}, "mixes channels"),
    ("DepthToSpace", {"blocksize": 2}, "no handler for op DepthToSpace"),
])
def test_channel_mixing_and_unknown_ops_freeze(op, extra, reason):
    m = build([("Conv", ["x", "w1"], ["c1"], conv(3, 8)),
               (op, ["c1"], ["o"], extra),
               ("Relu", ["o"], ["y"])],
              X, ["y"], {"w1": (8, 3, 3, 3)})
    assert any(reason in r for r in reasons(m))
    r = prune_model(m, ratio=0.5)
    assert r.plan.total_pruned == 0


def test_layernorm_over_channels_freezes_but_leading_axis_passes():
    m = build([("MatMul", ["v", "w1"], ["h"]),
               ("LayerNormalization", ["h", "g", "b"], ["n"], {"axis": -1}),
               ("MatMul", ["n", "w2"], ["y"])],
              {"v": [2, 5, 8]}, ["y"], {"w1": (8, 16), "g": (16,), "b": (16,), "w2": (16, 4)})
    assert any("normalises over the channel axis" in r for r in reasons(m))


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
    assert prune_model(m, ratio=0.5).stats["params_after"] == count_params(m)


def test_graph_output_freezes_its_channels():
    m = build([("Conv", ["x", "w1"], ["y"], conv(3, 8))], X, ["y"], {"w1": (8, 3, 3, 3)})
    assert any("reaches graph output" in r for r in reasons(m))


def test_opset18_forms_split_num_outputs_reduce_axes_input_and_resize_sizes():
    m = build([("Conv", ["x", "w1"], ["c1"], conv(3, 8)),
               ("Conv", ["x", "w2"], ["c2"], conv(3, 8)),
               ("Concat", ["c1", "c2"], ["cat"], {"axis": 1}),
               ("Split", ["cat"], ["s1", "s2"], {"axis": 1, "num_outputs": 2}),
               ("Resize", ["s1", "", "", "sizes"], ["z1"], {"mode": "nearest"}),
               ("ReduceMean", ["z1", "axes"], ["rm"], {"keepdims": 1}),
               ("Clip", ["s2", "lo", "hi"], ["cl"]),
               ("Dropout", ["cl"], ["dr"]),
               ("Conv", ["dr", "w3"], ["y1"], conv(8, 4)),
               ("Conv", ["rm", "w4"], ["y2"], conv(8, 4, k=1))],
              X, ["y1", "y2"], {"w1": (8, 3, 3, 3), "w2": (8, 3, 3, 3), "sizes": np.array([1, 8, 16, 16]),
                                "axes": np.array([2, 3]), "lo": np.array(-1, np.float32),
                                "hi": np.array(1, np.float32), "w3": (4, 8, 3, 3), "w4": (4, 8, 1, 1)},
              opset=18)
    r = check(m, min_groups=2)
    assert init_shape(r.model, "w3") == (4, 4, 3, 3)
    assert init_shape(r.model, "w4") == (4, 4, 1, 1)


def test_concat_on_another_axis_merges_spaces():
    m = build([("Conv", ["x", "w1"], ["c1"], conv(3, 8)),
               ("Conv", ["x", "w2"], ["c2"], conv(3, 8)),
               ("Concat", ["c1", "c2"], ["cat"], {"axis": 2}),
               ("Relu", ["cat"], ["r"]),
               ("Conv", ["r", "w3"], ["y"], conv(8, 4))],
              X, ["y"], {"w1": (8, 3, 3, 3), "w2": (8, 3, 3, 3), "w3": (4, 8, 3, 3)})
    groups = prepare(m).analysis.prunable
    assert len(groups) == 1 and groups[0].size == 8 and len(groups[0].sources) == 2
    check(m)


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
    check(m)
