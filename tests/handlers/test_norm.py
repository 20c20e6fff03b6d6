"""Normalisations (onnxprune/graph/handlers/norm.py): per-channel norms pass channels (BatchNormalization,
InstanceNormalization), LayerNormalization freezes the axis it normalises over, channel-mixing norms freeze.
Each asserts what was pruned, the zero-channel oracle, onnx.checker."""

from __future__ import annotations

from onnxprune.recipe import Recipe

import numpy as np
import pytest

from tests.onnx_builders import (
    build,
    check,
    check_frozen,
    checked,
    conv,
    init_shape,
    prepare,
    prune_model,
    run,
)

X = {"x": [1, 3, 8, 8]}
S, E = 4, 8


def test_instance_norm_prelu_and_broadcast_constants():
    m = build([("Conv", ["x", "w1"], ["c1"], conv(3, 8)),
               ("InstanceNormalization", ["c1", "s", "b"], ["n1"]),
               ("PRelu", ["n1", "slope"], ["p1"]),
               ("Mul", ["p1", "scale"], ["m1"]),
               ("Add", ["m1", "one"], ["a1"]),
               ("Conv", ["a1", "w2"], ["y"], conv(8, 4))],
              X, ["y"], {"w1": (8, 3, 3, 3), "s": (8,), "b": (8,), "slope": (8, 1, 1), "scale": (1, 8, 1, 1),
                         "one": np.ones((1,), np.float32), "w2": (4, 8, 3, 3)})
    _, r = check(m)
    assert init_shape(r.model, "slope") == (4, 1, 1)
    assert init_shape(r.model, "scale") == (1, 4, 1, 1)


def test_layernorm_over_channels_freezes_but_leading_axis_passes():
    m = build([("MatMul", ["v", "w1"], ["h"]),
               ("LayerNormalization", ["h", "g", "b"], ["n"], {"axis": -1}),
               ("MatMul", ["n", "w2"], ["y"])],
              {"v": [2, 5, 8]}, ["y"], {"w1": (8, 16), "g": (16,), "b": (16,), "w2": (16, 4)})
    check_frozen(m, "normalises over the channel axis")
    # the same op over an axis before the channels ([B, C, L] normalised over L) passes them
    lead = build([("Conv", ["x", "w1"], ["c1"], conv(3, 8)),
                  ("Reshape", ["c1", "shape"], ["f"]),
                  ("LayerNormalization", ["f", "g", "b"], ["n"], {"axis": -1}),
                  ("Reshape", ["n", "back"], ["r"]),
                  ("Conv", ["r", "w2"], ["y"], conv(8, 4))],
                 X, ["y"], {"w1": (8, 3, 3, 3), "shape": np.array([1, 8, 64]), "g": (64,), "b": (64,),
                            "back": np.array([1, 8, 8, 8]), "w2": (4, 8, 3, 3)})
    _, r = check(lead)
    assert init_shape(r.model, "w2") == (4, 4, 3, 3) and init_shape(r.model, "g") == (64,)


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
    check_frozen(m, reason)  # nothing pruned, outputs unchanged, checker passes



def test_prune_hidden_follows_a_decomposed_layernorm():
    """LayerNorm as exporters may decompose it (ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add): frozen
    by default; with prune_hidden its features prune like the fused op's, with the approximation note."""
    from onnxprune.pipeline.prune import HIDDEN_WARNING

    nodes = [("MatMul", ["x", "w1"], ["h"]), ("ReduceMean", ["h"], ["mu"], {"axes": [-1]}),
             ("Sub", ["h", "mu"], ["d"]), ("Pow", ["d", "two"], ["d2"]),
             ("ReduceMean", ["d2"], ["var"], {"axes": [-1]}),
             ("Add", ["var", "eps"], ["ve"]), ("Sqrt", ["ve"], ["sd"]), ("Div", ["d", "sd"], ["n"]),
             ("Mul", ["n", "gamma"], ["g"]), ("Add", ["g", "beta"], ["ln"]), ("MatMul", ["ln", "w2"], ["y"])]
    weights = {"w1": (E, 6), "two": np.array(2.0, np.float32), "eps": np.array(1e-5, np.float32),
               "gamma": (6,), "beta": (6,), "w2": (6, 3)}
    m = build(nodes, {"x": [1, S, E]}, ["y"], weights)
    check_frozen(m, "reduces over the channel axis")
    (group,) = prepare(m, prune_hidden=True).analysis.prunable
    assert group.size == 6
    r = prune_model(m, Recipe(ratio=0.5, prune_hidden=True))
    assert HIDDEN_WARNING in r.notes and init_shape(r.model, "gamma") == (3,) and init_shape(r.model, "w2") == (3, 3)
    # no zero-channel oracle: removing features changes the normalisation statistics (the approximation the
    # note is about); the rewrite still passes the checker and keeps the output shapes
    checked(r.model, m)
    feed = {"x": np.random.default_rng(0).standard_normal((1, S, E)).astype(np.float32)}
    assert run(r.model, feed)[0].shape == run(m, feed)[0].shape

