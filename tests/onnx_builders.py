"""Tiny ONNX graphs for per-handler tests, built with onnx.helper and seeded random weights, and the assertions every
handler test makes (`check`, `check_frozen`)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# tests/handlers/ import prepare, prune_model, run and sample_feed from here, so that a move of them in onnxprune
# changes one import
from onnxprune.pipeline.prepare import prepare
from onnxprune.pipeline.prune import prune_model
from onnxprune.recipe import Recipe
from onnxprune.pipeline.validate import check_as_original
from onnxprune.runtime.session import run
from onnxprune.runtime.feeds import sample_feed
from onnxprune.testing import zero_channel_oracle

__all__ = ["build", "check", "check_as_original", "check_frozen", "checked", "conv", "init_shape", "prepare",
           "prune_model", "run", "sample_feed", "zero_channel_oracle"]


def build(nodes, inputs: dict[str, list], outputs: list[str], weights: dict, opset: int = 17,
          seed: int = 0) -> onnx.ModelProto:
    """nodes: (op_type, [inputs], [outputs], {attrs}) tuples; weights: name -> shape or array."""
    rng = np.random.default_rng(seed)
    inits = []
    for name, spec in weights.items():
        arr = spec if isinstance(spec, np.ndarray) else rng.standard_normal(spec).astype(np.float32)
        if arr.dtype == np.float32 and arr.ndim > 0 and not isinstance(spec, np.ndarray):
            arr = arr * 0.5
        inits.append(numpy_helper.from_array(arr, name))
    graph_nodes = [helper.make_node(op, ins, outs, name=f"{op.lower()}_{i}", **(attrs[0] if attrs else {}))
                   for i, (op, ins, outs, *attrs) in enumerate(nodes)]
    graph = helper.make_graph(
        graph_nodes, "test",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def conv(cin: int, cout: int, k: int = 3, **attrs) -> dict:
    """Conv attributes: a k x k kernel with "same" padding (cin/cout only document the call site)."""
    return {"kernel_shape": [k, k], "pads": [k // 2] * 4, **attrs}


def init_shape(model: onnx.ModelProto, prefix: str) -> tuple:
    """Shape of the (possibly renamed) initializer feeding the input that was called `prefix`."""
    for t in model.graph.initializer:
        if t.name == prefix or t.name.startswith(prefix + "__pruned"):
            return tuple(t.dims)
    raise KeyError(prefix)


# ------------------------------------------------------------------------------ the handler-test assertions


def checked(candidate: onnx.ModelProto, original: onnx.ModelProto, checker: str = "full") -> None:
    """`full`: onnx.checker with full_check. `as_original`: onnxruntime contrib ops in the ONNX domain (which
    onnx.checker does not know) make the original fail the full check too; the candidate is then held to what
    the original passes (onnxprune's own validation rule, pipeline/validate.py check_as_original)."""
    if checker == "full":
        onnx.checker.check_model(candidate, full_check=True)
    else:
        check_as_original(candidate, original)


def check(model: onnx.ModelProto, min_groups: int = 1, tol: float = 1e-5, feed: dict | None = None,
          fraction: float = 0.3, ratio: float = 0.5, checker: str = "full", informative: bool = True, **options):
    """The three assertions every handler test makes (STYLE.md 8), plus ratio 0 changes nothing:
    - what was pruned: at least `min_groups` groups lose channels in the oracle, and `prune_model(ratio)` leaves
      fewer parameters (the test adds its own shape assertions on the returned result);
    - the zero-channel oracle holds within `tol`, and (`informative`) zeroing moved the outputs 100x beyond it,
      so that a wrong rewrite could not pass; nothing was contained (no faults);
    - the pruned models pass onnx.checker (full_check) or, with `checker="as_original"`, what the original passes.
    `options` go to `prepare` and the Recipe (prune_hidden, gqa_mode, keep_kv_cache). Returns (oracle,
    result of prune_model at `ratio`)."""
    oracle = zero_channel_oracle(model, fraction=fraction, feed=feed, **options)
    assert oracle.groups >= min_groups, f"{oracle.groups} groups pruned by the oracle, expected {min_groups}"
    assert oracle.pruned_channels > 0
    assert oracle.max_rel_err < tol, f"zero-channel oracle: rel err {oracle.max_rel_err}"
    assert not informative or oracle.informative(tol), f"zeroing moved the outputs by only {oracle.moved}"
    assert not oracle.faults, oracle.faults
    checked(oracle.pruned, model, checker)
    result = prune_model(model, Recipe(ratio=ratio, **options))
    assert not result.faults, result.faults
    checked(result.model, model, checker)
    assert result.stats["params_after"] < result.stats["params_before"]
    feed = feed if feed is not None else sample_feed(model)
    want = run(model, feed)
    assert [np.shape(a) for a in run(result.model, feed)] == [np.shape(a) for a in want]  # shapes preserved
    same = prune_model(model, Recipe(ratio=0.0, **options))
    for a, b in zip(want, run(same.model, feed)):
        np.testing.assert_array_equal(a, b)
    return oracle, result


def check_frozen(model: onnx.ModelProto, reason: str, feed: dict | None = None, checker: str = "full",
                 **options):
    """A group that must not be pruned: some frozen group names `reason`; and, where nothing else in the model
    is prunable, pruning at 0.5 removes nothing, the outputs are exactly the original's and the written model
    passes the checker. Returns the frozen groups' reasons."""
    prep = prepare(model, **options)
    reasons = [g.reason for g in prep.analysis.groups if not g.prunable]
    assert any(reason in r for r in reasons), reasons
    if not prep.analysis.prunable:
        result = prune_model(model, Recipe(ratio=0.5, **options))
        assert result.plan.total_pruned == 0 and result.stats["params_after"] == result.stats["params_before"]
        checked(result.model, model, checker)
        feed = feed if feed is not None else sample_feed(model)
        for a, b in zip(run(model, feed), run(result.model, feed)):
            np.testing.assert_array_equal(a, b)
    return reasons

