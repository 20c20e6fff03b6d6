"""Models not from PyTorch (issue 2): NHWC graphs as TF exporters emit them, and a scikit-learn MLP.

Each is pruned at 0.5 (what was pruned: exact shapes) and held to the zero-channel oracle; see
tests/test_zoo.py for the tolerance.
"""

from __future__ import annotations

from onnxprune.recipe import Recipe

import functools

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests import zoo_models

ORACLE_TOL = 1e-5


def pruned_shapes(original: onnx.ModelProto, pruned: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Shapes of the pruned model's initializers, keyed by the name each had in the original.

    Found through the nodes (same name, same input slot), so this holds whatever the rewrite renames.
    """
    init_names = {t.name for t in original.graph.initializer}
    dims = {t.name: tuple(t.dims) for t in pruned.graph.initializer}
    by_node = {n.name: n for n in pruned.graph.node}
    out = {}
    for node in original.graph.node:
        for i, name in enumerate(node.input):
            if name in init_names and node.name in by_node:
                out[name] = dims[by_node[node.name].input[i]]
    return out


def pruned_array(original: onnx.ModelProto, pruned: onnx.ModelProto, name: str) -> np.ndarray:
    node, i = next((n, i) for n in original.graph.node for i, x in enumerate(n.input) if x == name)
    new_name = next(n for n in pruned.graph.node if n.name == node.name).input[i]
    return numpy_helper.to_array(next(t for t in pruned.graph.initializer if t.name == new_name))


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    from onnxprune.runtime.session import run as ort_run

    return ort_run(model, feed)


# Expected initializer shapes after uniform 0.5 pruning; untouched ones are not listed.
NHWC_EXPECTED = {
    "nhwc_gap_gemm": {
        "conv1.weight": (8, 3, 3, 3), "conv2.weight": (16, 8, 3, 3), "conv3.weight": (16, 16, 3, 3),
        "fc1.weight": (12, 16), "fc2.weight": (10, 12),
    },
    # channels cross Transpose (axis 1 <-> 3), a bias Add on the last axis and ReduceMean over H, W into
    # MatMul kernels stored [in, out]
    "nhwc_wrapped_matmul": {
        "conv1.weight": (8, 3, 3, 3), "block0.bias": (8,), "conv2.weight": (12, 8, 3, 3), "block1.bias": (12,),
        "dense1.kernel": (12, 10), "dense1.bias": (10,), "dense2.kernel": (10, 10),
    },
    # Keras Flatten of NHWC features: channel c of 12 is the comb c, c+12, c+24, ... of the 8*8*12 features
    "nhwc_transpose_back_flatten": {
        "conv1.weight": (4, 3, 3, 3), "conv2.weight": (6, 4, 3, 3), "dense.kernel": (8 * 8 * 6, 10),
        "flatten.shape": (2,),
    },
}


@pytest.mark.parametrize("name", list(zoo_models.NHWC_MODELS))
def test_nhwc_prune_half(name: str):
    from onnxprune.pipeline.prune import prune_model

    model = zoo_models.NHWC_MODELS[name]()
    x = zoo_models.nhwc_input()
    res = prune_model(model, Recipe(ratio=0.5))
    got = pruned_shapes(model, res.model)
    want = NHWC_EXPECTED[name]
    assert {k: got[k] for k in want} == want
    assert res.stats["macs_after"] < 0.5 * res.stats["macs_before"]
    # NHWC interface unchanged, and the TF-style boundary Transposes are still there
    assert run(res.model, {"input": x})[0].shape == run(model, {"input": x})[0].shape == (2, 10)
    assert res.model.graph.node[0].op_type == "Transpose"
    onnx.checker.check_model(res.model, full_check=True)


def test_nhwc_flatten_shape_constant_follows_the_pruned_channels():
    from onnxprune.pipeline.prune import prune_model

    model = zoo_models.nhwc_transpose_back_flatten()
    res = prune_model(model, Recipe(ratio=0.5))
    assert pruned_array(model, res.model, "flatten.shape").tolist() == [-1, 8 * 8 * 6]


@pytest.mark.parametrize("name", list(zoo_models.NHWC_MODELS))
def test_nhwc_zero_channel_oracle(name: str):
    from onnxprune.testing import zero_channel_oracle

    model = zoo_models.NHWC_MODELS[name]()
    r = zero_channel_oracle(model, seed=0, fraction=0.3, feed={"input": zoo_models.nhwc_input()})
    assert r.max_rel_err <= ORACLE_TOL, (r.max_rel_err, r.max_abs_err)
    assert r.groups == len(NHWC_PRUNABLE[name]) and r.pruned_channels > 0


# conv/dense output widths of the prunable groups (the classifier's output is frozen)
NHWC_PRUNABLE = {
    "nhwc_gap_gemm": [16, 32, 32, 24],
    "nhwc_wrapped_matmul": [16, 24, 20],
    "nhwc_transpose_back_flatten": [8, 12],
}


@pytest.mark.parametrize("name", list(zoo_models.NHWC_MODELS))
def test_nhwc_groups(name: str):
    from onnxprune.pipeline.prepare import prepare

    analysis = prepare(zoo_models.NHWC_MODELS[name]()).analysis
    assert sorted(g.size for g in analysis.prunable) == sorted(NHWC_PRUNABLE[name])
    frozen = [g for g in analysis.groups if not g.prunable]
    assert [g.size for g in frozen] == [10] and "graph output" in str(frozen[0].reason)


@functools.lru_cache(maxsize=1)
def _mlp():
    return zoo_models.sklearn_mlp()


def test_sklearn_mlp_export_ops():
    model, _, _, acc = _mlp()
    ops = {n.op_type for n in model.graph.node}
    assert {"MatMul", "Add", "Relu", "Softmax", "ArgMax"} <= ops and "ZipMap" not in ops
    assert [o.name for o in model.graph.output] == ["label", "probabilities"]
    assert acc > 0.9


def test_sklearn_mlp_prune_half():
    from onnxprune.pipeline.prune import prune_model

    model, x_test, y_test, _ = _mlp()
    res = prune_model(model, Recipe(ratio=0.5))
    got = pruned_shapes(model, res.model)
    # hidden layers 64 -> 32 and 32 -> 16; the 64 pixel inputs and 10 classes stay
    assert got["coefficient"] == (64, 32) and got["intercepts"] == (1, 32)
    assert got["coefficient1"] == (32, 16) and got["intercepts1"] == (1, 16)
    assert got["coefficient2"] == (16, 10) and got["intercepts2"] == (1, 10)
    label, proba = run(res.model, {"X": x_test})
    assert label.shape == (len(x_test),) and label.dtype == np.int64
    assert proba.shape == (len(x_test), 10)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)


def test_sklearn_mlp_light_pruning_keeps_accuracy():
    """L1 pruning of a quarter of the hidden units, without retraining, still classifies digits (0.98 -> 0.93)."""
    from onnxprune.pipeline.prune import prune_model

    model, x_test, y_test, acc = _mlp()
    label = run(prune_model(model, Recipe(ratio=0.25)).model, {"X": x_test})[0]
    assert (label == y_test).mean() > 0.8


def test_sklearn_mlp_zero_channel_oracle():
    from onnxprune.testing import zero_channel_oracle

    model, x_test, _, _ = _mlp()
    r = zero_channel_oracle(model, seed=0, fraction=0.3, feed={"X": x_test[:32]})
    assert r.max_rel_err <= ORACLE_TOL, (r.max_rel_err, r.max_abs_err)
    assert r.groups == 2 and r.pruned_channels == int(0.3 * 64) + int(0.3 * 32)
