"""Attention heads in hand-built graphs: head split, activation MatMuls, merge, fused q/k/v, Gather."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxprune.graph.layout import Segment
from onnxprune.pipeline.plan import select
from onnxprune.pipeline.prune import prepare, prune_model
from onnxprune.testing import zero_channel_oracle
from tests.onnx_builders import build, init_shape

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
    oracle = zero_channel_oracle(m, fraction=0.5)
    assert oracle.pruned_channels == D
    assert oracle.max_rel_err < 1e-5
    onnx.checker.check_model(oracle.pruned, full_check=True)
    r = prune_model(m, ratio=0.5)
    assert init_shape(r.model, "wq") == (E, D) and init_shape(r.model, "wo") == (D, E)
    shapes = {t.name: onnx.numpy_helper.to_array(t) for t in r.model.graph.initializer}
    assert {tuple(v.tolist()) for k, v in shapes.items() if k.startswith("s_heads")} == {(1, S, 1, D)}
    assert {tuple(v.tolist()) for k, v in shapes.items() if k.startswith("s_merge")} == {(1, S, D)}


def test_head_count_minus_one_needs_no_edit():
    r = prune_model(attention(head_constant=-1), ratio=0.5)
    assert init_shape(r.model, "wv") == (E, D)


def test_fused_qkv_split_opens_three_spaces():
    m = attention(fused=True)
    groups = prepare(m).analysis.prunable
    assert len(groups) == 1 and groups[0].unit == D and len(groups[0].spaces) == 3
    oracle = zero_channel_oracle(m, fraction=0.5)
    assert oracle.max_rel_err < 1e-5
    r = prune_model(m, ratio=0.5)
    assert init_shape(r.model, "wqkv") == (E, 3 * D) and init_shape(r.model, "bqkv") == (3 * D,)


def test_select_keeps_whole_heads():
    class G:
        size, unit, blocks, tied = 12, 4, 1, False

    # head sums 0, 20, 12: keeping 6 channels rounds to 2 whole heads, the best two
    kept = select(G(), np.array([0, 0, 0, 0, 5, 5, 5, 5, 1, 1, 1, 9.0]), 6)
    assert kept.tolist() == list(range(4, 12))


def test_divisor_segment_positions_and_merge():
    seg = Segment(0, 8, divisor=4)
    assert seg.size == 2 and seg.positions(np.array([1, 6])).ravel().tolist() == [0, 1]
    merged = seg.expanded(trailing=4, leading=1, axis_length=2)
    assert merged.divisor == 0 and merged.positions().ravel().tolist() == list(range(8))


def test_gather_on_other_axis_carries_channels():
    m = build([("MatMul", ["x", "w1"], ["h"]), ("Relu", ["h"], ["r"]),
               ("Gather", ["r", "idx"], ["g"], {"axis": 1}), ("MatMul", ["g", "w2"], ["y"])],
              {"x": [1, S, E]}, ["y"], {"w1": (E, 6), "idx": np.array(0, dtype=np.int64), "w2": (6, 3)})
    assert len(prepare(m).analysis.prunable) == 1
    assert zero_channel_oracle(m).max_rel_err < 1e-5


def test_fused_onnxruntime_ops_freeze_with_a_reason():
    """A com.microsoft FastGelu between two layers (what onnxruntime's transformer optimizer writes) freezes the
    neurons with a reason that says how to get a prunable model."""
    graph = onnx.parser.parse_graph("""
        g (float[2, 8] x) => (float[2, 8] y) <float[8, 16] w1, float[16, 8] w2> {
            h = MatMul(x, w1)
            a = com.microsoft.FastGelu(h)
            y = MatMul(a, w2)
        }""")
    rng = np.random.default_rng(0)
    graph.initializer.extend(onnx.numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
                             for n, s in (("w1", (8, 16)), ("w2", (16, 8))))
    graph.node[1].domain = "com.microsoft"
    graph.node[1].op_type = "FastGelu"
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17),
                                                         onnx.helper.make_opsetid("com.microsoft", 1)])
    group = next(g for g in prepare(model).analysis.groups if g.size == 16)
    assert not group.prunable
    assert "fused by onnxruntime's transformer optimizer; prune the unfused export" in group.reason


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
    r = prune_model(m, ratio=0.0, head_ratio=0.5)
    assert init_shape(r.model, "wq") == (E, D)


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
        oracle = zero_channel_oracle(m, fraction=0.5)
        assert oracle.pruned_channels == D and oracle.max_rel_err < 1e-5
        r = prune_model(m, ratio=0.5)
        assert init_shape(r.model, "w_in") == (E, 3 * D) and init_shape(r.model, "w_out") == (E, D)


def test_class_token_concat_slices_the_token_constant():
    """Concat along the token axis with a constant token (through Expand, as ViT's class token): the token's
    features are sliced with the channels, and the zero-channel oracle holds."""
    m = build([("MatMul", ["x", "w1"], ["h"]), ("Expand", ["cls", "shape"], ["c"]),
               ("Concat", ["c", "h"], ["t"], {"axis": 1}), ("Relu", ["t"], ["r"]), ("MatMul", ["r", "w2"], ["y"])],
              {"x": [1, S, E]}, ["y"], {"w1": (E, 6), "cls": (1, 1, 6), "shape": np.array([1, 1, 1]), "w2": (6, 3)})
    assert len(prepare(m).analysis.prunable) == 1
    oracle = zero_channel_oracle(m, fraction=0.5)
    assert oracle.pruned_channels == 3 and oracle.max_rel_err < 1e-5
    assert init_shape(prune_model(m, ratio=0.5).model, "cls") == (1, 1, 3)


def test_hybrid_scores_heads_by_the_error_a_refit_leaves():
    """With calibration data, heads are scored by what a least-squares refit of the output projection cannot
    bring back once they are gone: the first head removed scores its refit error, checked here against a
    direct least-squares fit on the same activations."""
    from onnxprune.pipeline.activations import Probe, channel_stats
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
    assert not prepare(m).analysis.prunable
    (group,) = prepare(m, prune_hidden=True).analysis.prunable
    assert group.size == 6
    r = prune_model(m, ratio=0.5, prune_hidden=True)
    assert HIDDEN_WARNING in r.notes and init_shape(r.model, "gamma") == (3,) and init_shape(r.model, "w2") == (3, 3)


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
        assert zero_channel_oracle(m, fraction=0.5).max_rel_err < 1e-5
        r = prune_model(m, ratio=0.5)
        weights = [t for t in r.model.graph.initializer if len(t.dims) == 2]
        assert sorted(tuple(t.dims) for t in weights) == sorted([(E, 3), (3, E)])
        assert r.stats["params_after"] < r.stats["params_before"]
