"""Concat, Split and Slice (onnxprune/graph/handlers/concat.py): channel index maps through concatenation and
its inverses, a split inside a group freezes, concat on another axis merges the groups, a class-token constant is
sliced with the channels. Each asserts what was pruned, the zero-channel oracle, onnx.checker."""

from __future__ import annotations

import numpy as np

from tests.onnx_builders import build, check, check_frozen, conv, init_shape, prepare

X = {"x": [1, 3, 8, 8]}
S, E = 4, 8


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
    _, r = check(m, min_groups=2)
    assert init_shape(r.model, "w3") == (4, 4 + 3 + 3, 3, 3)


def test_split_inside_a_group_freezes():
    m = build([("Conv", ["x", "w1"], ["c1"], conv(3, 8)),
               ("Conv", ["x", "w0"], ["c0"], conv(3, 4)),
               ("Concat", ["c1", "c0"], ["cat"], {"axis": 1}),
               ("Split", ["cat", "sizes"], ["s1", "s2"], {"axis": 1}),
               ("Add", ["s1", "s2"], ["a"]),
               ("Conv", ["a", "w2"], ["y"], conv(6, 4))],
              X, ["y"], {"w1": (8, 3, 3, 3), "w0": (4, 3, 3, 3), "sizes": np.array([6, 6]), "w2": (4, 6, 3, 3)})
    check_frozen(m, "splits inside")


def test_concat_on_another_axis_merges_spaces():
    m = build([("Conv", ["x", "w1"], ["c1"], conv(3, 8)),
               ("Conv", ["x", "w2"], ["c2"], conv(3, 8)),
               ("Concat", ["c1", "c2"], ["cat"], {"axis": 2}),
               ("Relu", ["cat"], ["r"]),
               ("Conv", ["r", "w3"], ["y"], conv(8, 4))],
              X, ["y"], {"w1": (8, 3, 3, 3), "w2": (8, 3, 3, 3), "w3": (4, 8, 3, 3)})
    groups = prepare(m).analysis.prunable
    assert len(groups) == 1 and groups[0].size == 8 and len(groups[0].sources) == 2
    _, r = check(m)
    assert init_shape(r.model, "w1") == init_shape(r.model, "w2") == (4, 3, 3, 3)
    assert init_shape(r.model, "w3") == (4, 4, 3, 3)


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
    _, r = check(m, min_groups=2)
    assert init_shape(r.model, "w3") == (4, 4, 3, 3)
    assert init_shape(r.model, "w4") == (4, 4, 1, 1)



def test_class_token_concat_slices_the_token_constant():
    """Concat along the token axis with a constant token (through Expand, as ViT's class token): the token's
    features are sliced with the channels, and the zero-channel oracle holds."""
    m = build([("MatMul", ["x", "w1"], ["h"]), ("Expand", ["cls", "shape"], ["c"]),
               ("Concat", ["c", "h"], ["t"], {"axis": 1}), ("Relu", ["t"], ["r"]), ("MatMul", ["r", "w2"], ["y"])],
              {"x": [1, S, E]}, ["y"], {"w1": (E, 6), "cls": (1, 1, 6), "shape": np.array([1, 1, 1]), "w2": (6, 3)})
    assert len(prepare(m).analysis.prunable) == 1
    oracle, r = check(m, fraction=0.5)
    assert oracle.pruned_channels == 3
    assert init_shape(r.model, "cls") == (1, 1, 3)



def _halves_by_shape():
    """YOLOv8's C2f split: a conv's output cut in halves at Shape(c)[1] / 2, computed in the graph."""
    return build([("Conv", ["x", "w1"], ["c1"], conv(3, 8)),
                  ("Shape", ["c1"], ["s"]),
                  ("Gather", ["s", "one"], ["d"], {"axis": 0}),
                  ("Div", ["d", "two"], ["h"]),
                  ("Unsqueeze", ["h", "ax"], ["hu"]),
                  ("Slice", ["c1", "zero", "hu", "ax1"], ["a"]),
                  ("Slice", ["c1", "hu", "big", "ax1"], ["b"]),
                  ("Conv", ["a", "w2"], ["y1"], conv(4, 6)),
                  ("Conv", ["b", "w3"], ["y2"], conv(4, 6)),
                  ("Conv", ["y1", "w4"], ["z1"], conv(6, 4)),
                  ("Conv", ["y2", "w5"], ["z2"], conv(6, 4))],
                 X, ["z1", "z2"],
                 {"w1": (8, 3, 3, 3), "one": np.array(1), "two": np.array(2), "ax": np.array([0]),
                  "zero": np.array([0]), "big": np.array([1 << 30]), "ax1": np.array([1]),
                  "w2": (6, 4, 3, 3), "w3": (6, 4, 3, 3), "w4": (4, 6, 3, 3), "w5": (4, 6, 3, 3)})


def test_slice_bounds_computed_from_shapes_stay_computed_unless_their_tensor_loses_channels():
    from onnxprune.pipeline.prune import RunSettings, prune_model
    from onnxprune.recipe import Recipe

    m = _halves_by_shape()
    check(m, min_groups=2)  # the oracle over every group, the halves' among them
    prep = prepare(m)
    slices = lambda model: [list(n.input) for n in model.graph.node if n.op_type == "Slice"]  # noqa: E731
    for group in prep.analysis.prunable:
        root = group.spaces[0]
        result = prune_model(m, Recipe(), RunSettings(removed={root: np.arange(2)}))
        shapes = {t.name for t in result.model.graph.initializer}
        if group.size == 6:  # a conv after the split: the halves' bounds keep being computed from the shape
            assert slices(result.model) == slices(m)
        else:  # the split conv's own channels: the bounds are pinned to the new halves, as constants
            assert slices(result.model) != slices(m)
            assert all(x in shapes for inputs in slices(result.model) for x in inputs[1:3])
