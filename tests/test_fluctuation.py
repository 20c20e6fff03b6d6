"""FLAP's fluctuation criterion: Var(x_c) · ||W_c||² per input channel c of the layer reading it."""

from __future__ import annotations

import numpy as np

from onnxprune.pipeline.activations import Probe
from onnxprune.pipeline.prepare import prepare
from onnxprune.pipeline.prune import RunSettings, prune_model
from onnxprune.pipeline.score import score_groups
from onnxprune.pipeline.statistics import channel_stats
from onnxprune.recipe import Recipe
from tests.onnx_builders import build, init_shape


def test_fluctuation_is_variance_times_squared_weight_norm():
    m = build([("MatMul", ["x", "w1"], ["h"]), ("Relu", ["h"], ["r"]), ("MatMul", ["r", "w2"], ["y"])],
              {"x": [4, 6, 8]}, ["y"], {"w1": (8, 12), "w2": (12, 5)})
    prep = prepare(m)
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((4, 6, 8)).astype(np.float32) + 0.5} for _ in range(5)]
    (group,) = prep.analysis.prunable
    got = score_groups(prep.analysis, prep.view, "fluctuation", stats=channel_stats(prep, feeds))[group.spaces[0]]
    r = np.concatenate([Probe(prep.model, ["r"]).run(f)["r"].reshape(-1, 12) for f in feeds]).astype(np.float64)
    w2 = next(prep.view.array(t) for t in prep.view.initializers if t == "w2").astype(np.float64)
    want = r.var(axis=0) * (w2 ** 2).sum(axis=1)
    np.testing.assert_allclose(got, want / want.mean(), rtol=1e-6)
    result = prune_model(m, Recipe(ratio=0.5, criterion="fluctuation", recover="bias"), RunSettings(calibration=feeds))
    assert init_shape(result.model, "w2") == (6, 5)


def test_convolution_sums_in_float32_match_float64():
    """Channel sums of NCHW float32 activations (summed along the contiguous spatial axis in float32, then in
    float64) equal float64 sums, zeros counted exactly, on every channel axis position but the last."""
    from onnxprune.pipeline.activations import TensorStats
    from onnxprune.pipeline.statistics import _add_spatial_sums

    rng = np.random.default_rng(0)
    for shape, axis in (((5, 7, 33, 31), 1), ((3, 4, 9, 6, 5), 2), ((70, 3, 200), 1)):
        raw = np.maximum(rng.standard_normal(shape).astype(np.float32) * 3 + 0.5, 0)  # many exact zeros
        c = shape[axis]
        got = TensorStats(np.zeros(c), np.zeros(c), np.zeros(c), value_sum=np.zeros(c))
        _add_spatial_sums(got, raw, axis)
        _add_spatial_sums(got, raw, axis)  # accumulates
        x = np.moveaxis(raw.astype(np.float64), axis, -1).reshape(-1, c)
        np.testing.assert_allclose(got.abs_sum, 2 * np.abs(x).sum(0), rtol=1e-6)
        np.testing.assert_allclose(got.value_sum, 2 * x.sum(0), rtol=1e-6)
        np.testing.assert_allclose(got.sq_sum, 2 * (x * x).sum(0), rtol=1e-6)
        np.testing.assert_array_equal(got.zeros, 2 * (x == 0).sum(0))
