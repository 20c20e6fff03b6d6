"""Attention heads in hand-built graphs (onnxprune/graph/handlers/attention.py and the head forms of reshape.py and
matmul.py): head split, activation MatMuls, merge, fused q/k/v, torch's packed in_proj, head ratios, hybrid
scores. Each prune asserts what was pruned, the zero-channel oracle, onnx.checker."""

from __future__ import annotations

from onnxprune.recipe import Recipe

import numpy as np
import onnx
import pytest

from tests.onnx_builders import build, check, checked, init_shape, prepare, prune_model

S, E, H, D = 4, 8, 2, 4


def attention(fused: bool = False, head_constant: int = H):
    """x [1, S, E] -> self-attention with H heads of D -> output projection -> y [1, S, E]."""
    split = {"s_heads": np.array([1, S, head_constant, D]), "s_merge": np.array([1, S, E])}
    if fused:
        proj = [("MatMul", ["x", "wqkv"], ["qkv0"]), ("Add", ["qkv0", "bqkv"], ["qkv"]),
                ("Split", ["qkv", "sizes"], ["q", "k", "v"], {"axis": 2})]
        weights = {"wqkv": (E, 3 * E), "bqkv": (3 * E,), "sizes": np.array([E, E, E])}
    else:
        proj = [("MatMul", ["x", f"w{n}"], [f"{n}0"]) for n in "qkv"]
        proj += [("Add", [f"{n}0", f"b{n}"], [n]) for n in "qkv"]
        weights = {f"{p}{n}": (E, E) if p == "w" else (E,) for n in "qkv" for p in "wb"}
    nodes = proj + [
        ("Reshape", ["q", "s_heads"], ["q4"]), ("Transpose", ["q4"], ["qt"], {"perm": [0, 2, 1, 3]}),
        ("Reshape", ["k", "s_heads"], ["k4"]), ("Transpose", ["k4"], ["kt"], {"perm": [0, 2, 3, 1]}),
        ("Reshape", ["v", "s_heads"], ["v4"]), ("Transpose", ["v4"], ["vt"], {"perm": [0, 2, 1, 3]}),
        ("MatMul", ["qt", "kt"], ["scores"]), ("Mul", ["scores", "scale"], ["scaled"]),
        ("Softmax", ["scaled"], ["p"], {"axis": -1}),
        ("MatMul", ["p", "vt"], ["ctx"]), ("Transpose", ["ctx"], ["ctx_t"], {"perm": [0, 2, 1, 3]}),
        ("Reshape", ["ctx_t", "s_merge"], ["merged"]),
        ("MatMul", ["merged", "wo"], ["y"]),
    ]
    weights |= split | {"scale": np.array(D ** -0.5, dtype=np.float32), "wo": (E, E)}
    return build(nodes, {"x": [1, S, E]}, ["y"], weights)


def test_heads_are_one_group_pruned_whole():
    m = attention()
    groups = prepare(m).analysis.prunable
    assert len(groups) == 1 and groups[0].unit == D and groups[0].size == E
    oracle, r = check(m, fraction=0.5)
    assert oracle.pruned_channels == D
    assert init_shape(r.model, "wq") == (E, D) and init_shape(r.model, "wo") == (D, E)
    shapes = {t.name: onnx.numpy_helper.to_array(t) for t in r.model.graph.initializer}
    assert {tuple(v.tolist()) for k, v in shapes.items() if k.startswith("s_heads")} == {(1, S, 1, D)}
    assert {tuple(v.tolist()) for k, v in shapes.items() if k.startswith("s_merge")} == {(1, S, D)}


def test_head_count_minus_one_needs_no_edit():
    m = attention(head_constant=-1)
    _, r = check(m, fraction=0.5)
    assert init_shape(r.model, "wv") == (E, D)
    shapes = {t.name: onnx.numpy_helper.to_array(t) for t in r.model.graph.initializer}
    assert {tuple(v.tolist()) for k, v in shapes.items() if k.startswith("s_heads")} == {(1, S, -1, D)}


def test_fused_qkv_split_opens_three_spaces():
    m = attention(fused=True)
    groups = prepare(m).analysis.prunable
    assert len(groups) == 1 and groups[0].unit == D and len(groups[0].spaces) == 3
    oracle, r = check(m, fraction=0.5)
    assert oracle.pruned_channels == D  # one head, in each of q, k and v
    assert init_shape(r.model, "wqkv") == (E, 3 * D) and init_shape(r.model, "bqkv") == (3 * D,)


def test_head_ratio_removes_whole_heads_rounded_down():
    """--head-ratio: head groups lose that share of their heads (rounded down), neuron groups keep `ratio`."""
    from onnxprune.pipeline.plan import plan_global, plan_uniform

    m = attention()
    prep = prepare(m)
    (group,) = prep.analysis.prunable
    scores = {group.spaces[0]: np.arange(E, dtype=float)}
    assert len(plan_uniform(prep.analysis, scores, 0.5, head_ratio=0.0).kept) == 0
    # 2 heads at 0.6: floor(1.2) = 1 head goes, whatever `ratio` says
    for planner in (plan_uniform, plan_global):
        plan = planner(prep.analysis, scores, 0.0, head_ratio=0.6)
        assert plan.kept[group.spaces[0]].tolist() == list(range(D, E))
    r = prune_model(m, Recipe(ratio=0.0, head_ratio=0.5))
    assert init_shape(r.model, "wq") == (E, D)
    checked(r.model, m)


def packed_in_proj(head_count_constant: bool = True):
    """torch's nn.MultiheadAttention as exported: one [E, 3E] in_proj viewed as [S, B, 3, E], q/k/v picked by
    Gather after Unsqueeze/Transpose/Squeeze, heads folded into the batch ([S, B·H, D]), attention, then the
    output projection on [S·B, E]."""
    b = 2
    heads = H if head_count_constant else -1
    nodes = [
        ("MatMul", ["x", "w_in"], ["p0"]), ("Add", ["p0", "b_in"], ["p"]),
        ("Reshape", ["p", "s_parts"], ["p4"]), ("Unsqueeze", ["p4", "ax0"], ["p5"]),
        ("Transpose", ["p5"], ["pt"], {"perm": [3, 1, 2, 0, 4]}), ("Squeeze", ["pt", "ax3"], ["qkv"]),
        ("Gather", ["qkv", "i0"], ["q"], {"axis": 0}), ("Gather", ["qkv", "i1"], ["k"], {"axis": 0}),
        ("Gather", ["qkv", "i2"], ["v"], {"axis": 0}),
    ]
    for n in "qkv":
        nodes += [("Reshape", [n, "s_fold"], [f"{n}f"]), ("Transpose", [f"{n}f"], [f"{n}t"], {"perm": [1, 0, 2]}),
                  ("Reshape", [f"{n}t", "s_heads"], [f"{n}4"])]
    nodes += [
        ("Transpose", ["k4"], ["kT"], {"perm": [0, 1, 3, 2]}), ("MatMul", ["q4", "kT"], ["scores"]),
        ("Softmax", ["scores"], ["att"], {"axis": -1}), ("MatMul", ["att", "v4"], ["ctx"]),
        ("Transpose", ["ctx"], ["ctx_t"], {"perm": [2, 0, 1, 3]}), ("Reshape", ["ctx_t", "s_merge"], ["flat"]),
        ("Gemm", ["flat", "w_out", "b_out"], ["o"], {"transB": 1}), ("Reshape", ["o", "s_back"], ["y"]),
    ]
    weights = {"w_in": (E, 3 * E), "b_in": (3 * E,), "w_out": (E, E), "b_out": (E,),
               "s_parts": np.array([S, b, 3, E]), "ax0": np.array([0]), "ax3": np.array([3]),
               "i0": np.array(0), "i1": np.array(1), "i2": np.array(2), "s_fold": np.array([S, b * H, D]),
               "s_heads": np.array([b, heads, S, D]), "s_merge": np.array([S * b, E]), "s_back": np.array([S, b, E])}
    return build(nodes, {"x": [S, b, E]}, ["y"], weights)


def test_packed_in_proj_heads_prune_whole():
    for constant in (True, False):
        m = packed_in_proj(constant)
        groups = prepare(m).analysis.prunable
        assert len(groups) == 1 and groups[0].unit == D and len(groups[0].spaces) == 3
        oracle, r = check(m, fraction=0.5)
        assert oracle.pruned_channels == D
        assert init_shape(r.model, "w_in") == (E, 3 * D) and init_shape(r.model, "w_out") == (E, D)


def test_hybrid_scores_heads_by_the_error_a_refit_leaves():
    """With calibration data, heads are scored by what a least-squares refit of the output projection cannot
    bring back once they are gone: the first head removed scores its refit error, checked here against a
    direct least-squares fit on the same activations."""
    from onnxprune.pipeline.activations import Probe
    from onnxprune.pipeline.statistics import channel_stats
    from onnxprune.pipeline.score import score_groups

    m = attention()
    prep = prepare(m)
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, S, E)).astype(np.float32)} for _ in range(8)]
    stats = channel_stats(prep, feeds)
    (group,) = prep.analysis.prunable
    per_head = score_groups(prep.analysis, prep.view, "hybrid", stats=stats)[group.spaces[0]].reshape(H, D).sum(1)
    x = np.concatenate([Probe(prep.model, ["merged"]).run(f)["merged"].reshape(-1, E) for f in feeds]).astype(float)
    w = onnx.numpy_helper.to_array(next(t for t in prep.model.graph.initializer if t.name == "wo")).astype(float)

    def refit_error(h):
        gone, kept = slice(h * D, (h + 1) * D), np.r_[0:h * D, (h + 1) * D:E]
        target = x[:, gone] @ w[gone]
        design = np.hstack([x[:, kept], np.ones((len(x), 1))])
        coef = np.linalg.lstsq(design, target, rcond=None)[0]
        return float(np.sum((target - design @ coef) ** 2))

    errors = [refit_error(h) for h in range(H)]
    first = int(np.argmin(per_head))
    assert first == int(np.argmin(errors))
    # the other (last) head scores the error of removing both: all the output's variance
    y = x @ w
    everything = float(np.sum((y - y.mean(axis=0)) ** 2))
    # scores are normalised to mean 1 per reader: compare the ratio
    assert per_head[1 - first] / per_head[first] == pytest.approx(everything / errors[first], rel=0.02)


