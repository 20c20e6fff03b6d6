"""Grouped-query attention: H_q query heads read H_kv key/value heads, g = H_q / H_kv per k/v head.

The forms: transformers' repeat_kv (Unsqueeze + Expand + Reshape), torch's sdpa with enable_gqa (dynamo; opset 18
decomposes it, opset 23 writes ONNX's Attention), ONNX Attention with q_num_heads / kv_num_heads, and
com.microsoft GroupQueryAttention (packed or separate q/k/v). Each: the zero-channel oracle in both modes (whole KV
groups; query heads evenly inside every group), which must hold exactly while the zeroing itself moves the outputs,
plus the counts and shapes pruning leaves.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.pipeline.prepare import prepare
from onnxprune.pipeline.prune import prune_model
from onnxprune.testing import zero_channel_oracle
from onnxprune.runtime.session import run
from onnxprune.recipe import Recipe
from onnxprune.pipeline.prune import RunSettings
from tests.onnx_builders import build, init_shape

S, E = 5, 16
MODES = ("kv-groups", "query-heads")


def check_oracle(model, feed, mode, fraction=0.5, **options):
    """The oracle holds (< 1e-5) and the zeroed channels mattered (the zeroed model differs from the original by
    far more than the tolerance); returns the oracle's result."""
    oracle = zero_channel_oracle(model, feed=feed, fraction=fraction, gqa_mode=mode, **options)
    assert oracle.pruned_channels > 0
    assert oracle.max_rel_err < 1e-5, oracle.max_rel_err
    moved = max(float(np.abs(a - b).max() / np.abs(a).max())
                for a, b in zip(run(model, feed), run(oracle.zeroed, feed)))
    assert moved > 1e-2, moved
    return oracle


def repeat_kv(heads=4, kv_heads=2, head=4, expand_shape_constant=True):
    """x [1, S, E] -> q/k/v projections -> heads -> k and v repeated for their query heads (repeat_kv) ->
    attention -> output projection."""
    g = heads // kv_heads
    nodes = [("MatMul", ["x", "wq"], ["q"]), ("MatMul", ["x", "wk"], ["k"]), ("MatMul", ["x", "wv"], ["v"])]
    for n, h in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
        nodes += [("Reshape", [n, f"s_{'q' if n == 'q' else 'kv'}"], [f"{n}4"]),
                  ("Transpose", [f"{n}4"], [f"{n}t"], {"perm": [0, 2, 1, 3]})]
    for n in "kv":
        nodes += [("Unsqueeze", [f"{n}t", "ax2"], [f"{n}u"]), ("Expand", [f"{n}u", "s_expand"], [f"{n}e"]),
                  ("Reshape", [f"{n}e", "s_rep"], [f"{n}r"])]
    nodes += [("Transpose", ["kr"], ["kT"], {"perm": [0, 1, 3, 2]}), ("MatMul", ["qt", "kT"], ["scores"]),
              ("Mul", ["scores", "scale"], ["scaled"]), ("Softmax", ["scaled"], ["p"], {"axis": -1}),
              ("MatMul", ["p", "vr"], ["ctx"]), ("Transpose", ["ctx"], ["ctx_t"], {"perm": [0, 2, 1, 3]}),
              ("Reshape", ["ctx_t", "s_merge"], ["merged"]), ("MatMul", ["merged", "wo"], ["y"])]
    weights = {"wq": (E, heads * head), "wk": (E, kv_heads * head), "wv": (E, kv_heads * head),
               "wo": (heads * head, E), "s_q": np.array([1, S, heads, head]), "s_kv": np.array([1, S, kv_heads, head]),
               "ax2": np.array([2]), "s_expand": np.array([1, kv_heads, g, S, head]),
               "s_rep": np.array([1, heads, S, head]), "s_merge": np.array([1, S, heads * head]),
               "scale": np.array(head ** -0.5, np.float32)}
    return build(nodes, {"x": [1, S, E]}, ["y"], weights)


def x_feed(batch=1):
    return {"x": np.random.default_rng(1).standard_normal((batch, S, E)).astype(np.float32)}


def constants(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_repeat_kv_couples_query_heads_with_their_kv_group():
    m = repeat_kv()
    (group,) = prepare(m).analysis.prunable
    assert (group.size, group.head_dim, group.kv_groups, group.unit) == (16, 4, 2, 8)  # a KV group: 2 heads of 4
    assert "4 heads of 4 in 2 KV groups (kv-groups)" in str(group)
    oracle = check_oracle(m, x_feed(), "kv-groups")
    assert oracle.pruned_channels == 8
    r = prune_model(m, Recipe(ratio=0.5))
    assert init_shape(r.model, "wq") == (E, 8) and init_shape(r.model, "wk") == (E, 4) \
        and init_shape(r.model, "wo") == (8, E)
    c = constants(r.model)
    assert {tuple(v) for k, v in c.items() if k.startswith("s_expand")} == {(1, 1, 2, S, 4)}
    assert {tuple(v) for k, v in c.items() if k.startswith("s_rep")} == {(1, 2, S, 4)}
    assert run(r.model, x_feed())[0].shape == (1, S, E)
    onnx.checker.check_model(r.model, full_check=True)


def test_query_heads_mode_prunes_evenly_inside_every_kv_group():
    m = repeat_kv(heads=8, kv_heads=2)
    groups = prepare(m, gqa_mode="query-heads").analysis.groups
    (queries,) = [g for g in groups if g.prunable]
    kv = next(g for g in groups if g.size == 8)
    assert (queries.blocks, queries.unit) == (2, 4) and "key/value heads stay" in kv.reason
    check_oracle(m, x_feed(), "query-heads")
    # 4 query heads per KV group, half of them go in each: 2 + 2 kept, k/v untouched, the repeat count 4 -> 2
    r = prune_model(m, Recipe(ratio=0.5, gqa_mode="query-heads"))
    kept = r.plan.kept[queries.spaces[0]] // 4
    assert sorted(set(kept.tolist())) and [int(np.sum((kept >= b * 4) & (kept < (b + 1) * 4))) // 4
                                           for b in range(2)] == [2, 2]
    assert init_shape(r.model, "wq") == (E, 16) and init_shape(r.model, "wk") == (E, 8)
    c = constants(r.model)
    assert {tuple(v) for k, v in c.items() if k.startswith("s_expand")} == {(1, 2, 2, S, 4)}
    assert {tuple(v) for k, v in c.items() if k.startswith("s_rep")} == {(1, 4, S, 4)}
    onnx.checker.check_model(r.model, full_check=True)


def test_head_ratio_counts_kv_groups():
    m = repeat_kv(heads=8, kv_heads=4)
    (group,) = prepare(m).analysis.prunable
    for head_ratio, kept in ((0.3, 3), (0.5, 2), (0.0, 4)):  # of 4 KV groups, floor(4 * ratio) go
        r = prune_model(m, Recipe(ratio=0.0, head_ratio=head_ratio))
        assert len(r.plan.kept.get(group.spaces[0], np.arange(group.size))) // group.unit == kept


def test_hybrid_scores_whole_kv_groups():
    """With calibration data, a KV group that carries nothing (its query heads' output rows zero) goes first."""
    m = repeat_kv(heads=4, kv_heads=2)
    for t in m.graph.initializer:
        if t.name == "wo":
            w = numpy_helper.to_array(t).copy()
            w[:8] *= 1e-3  # KV group 0: query heads 0 and 1
            t.CopyFrom(numpy_helper.from_array(w, "wo"))
    feeds = [x_feed() for _ in range(4)]
    r = prune_model(m, Recipe(ratio=0.5, criterion="hybrid"), RunSettings(calibration=feeds))
    (root,) = r.plan.kept
    assert r.plan.kept[root].tolist() == list(range(8, 16))


def attention23(heads=4, kv_heads=2, head=4, cache=False):
    """ONNX Attention (opset 23) on [1, S, heads·head] features, head counts in q_num_heads / kv_num_heads; with
    `cache`, past key/value graph inputs and present outputs."""
    rng = np.random.default_rng(0)
    w = {n: rng.standard_normal(s).astype(np.float32) * 0.5 for n, s in
         (("wq", (E, heads * head)), ("wk", (E, kv_heads * head)), ("wv", (E, kv_heads * head)),
          ("wo", (heads * head, E)))}
    ins = ["q", "k", "v", "", "past_key", "past_value"] if cache else ["q", "k", "v"]
    outs = ["a", "present_key", "present_value"] if cache else ["a"]
    nodes = [helper.make_node("MatMul", ["x", n], [n[1]], name=f"proj_{n}") for n in ("wq", "wk", "wv")]
    nodes += [helper.make_node("Attention", ins, outs, name="attention", q_num_heads=heads, kv_num_heads=kv_heads),
              helper.make_node("MatMul", ["a", "wo"], ["y"], name="o_proj")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq", E])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seq", E])]
    if cache:
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, kv_heads, "past", head])
                   for n in ("past_key", "past_value")]
        outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, kv_heads, "total", head])
                    for n in ("present_key", "present_value")]
    graph = helper.make_graph(nodes, "attention23", inputs, outputs,
                              [numpy_helper.from_array(v, n) for n, v in w.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)


@pytest.mark.parametrize("mode", MODES)
def test_onnx_attention_3d(mode):
    m = attention23()
    check_oracle(m, x_feed(), mode)
    r = prune_model(m, Recipe(ratio=0.5, gqa_mode=mode))
    node = next(n for n in r.model.graph.node if n.op_type == "Attention")
    heads = {a.name: a.i for a in node.attribute}
    assert (heads["q_num_heads"], heads["kv_num_heads"]) == ((2, 1) if mode == "kv-groups" else (2, 2))


@pytest.mark.parametrize("mode", MODES)
def test_onnx_attention_with_a_cache_follows_it(mode):
    """Past key/value inputs and present outputs are the KV cache: in kv-groups mode their head axis shrinks
    (the report lists them), in query-heads mode they keep their shape; keep_kv_cache freezes the heads."""
    m = attention23(cache=True)
    rng = np.random.default_rng(2)
    feed = x_feed() | {n: rng.standard_normal((1, 2, 3, 4)).astype(np.float32) for n in ("past_key", "past_value")}
    check_oracle(m, feed, mode)
    r = prune_model(m, Recipe(ratio=0.5, gqa_mode=mode))
    changed = {c["name"]: (c["before"], c["after"]) for c in r.interface}
    if mode == "kv-groups":
        assert changed == {"past_key": ([1, 2, "past", 4], [1, 1, "past", 4]),
                           "past_value": ([1, 2, "past", 4], [1, 1, "past", 4]),
                           "present_key": ([1, 2, "total", 4], [1, 1, "total", 4]),
                           "present_value": ([1, 2, "total", 4], [1, 1, "total", 4])}
    else:
        assert changed == {}
    kept = prepare(m, keep_kv_cache=True).analysis.groups
    assert not any(g.prunable for g in kept if g.kv_groups)
    assert any("keep_kv_cache" in g.reason for g in kept if g.kv_groups)
    # query heads still prune inside their groups when the cache is kept
    r = prune_model(m, Recipe(ratio=0.5, gqa_mode="query-heads", keep_kv_cache=True))
    assert r.interface == [] and r.stats["params_after"] < r.stats["params_before"]


def gqa_contrib(packed: bool, heads=4, kv_heads=2, head=16, rotary=False):
    """com.microsoft GroupQueryAttention as onnxruntime-genai writes it: q/k/v (or one packed q|k|v projection),
    past key/value graph inputs, seqlens_k and total_sequence_length from the attention mask."""
    rng = np.random.default_rng(0)
    hidden = E * 2
    w = {}
    if packed:
        w["wqkv"] = rng.standard_normal((hidden, (heads + 2 * kv_heads) * head)).astype(np.float32) * 0.3
    else:
        w |= {n: rng.standard_normal((hidden, h * head)).astype(np.float32) * 0.3
              for n, h in (("wq", heads), ("wk", kv_heads), ("wv", kv_heads))}
    w["wo"] = rng.standard_normal((heads * head, hidden)).astype(np.float32) * 0.3
    w["one"] = np.array([1], np.int64)
    w["one_scalar"] = np.array(1, np.int64)
    nodes = [helper.make_node("ReduceSum", ["attention_mask", "one"], ["mask_sum"], name="sum", keepdims=0),
             helper.make_node("Sub", ["mask_sum", "one"], ["seqlens"], name="sub"),
             helper.make_node("Cast", ["seqlens"], ["seqlens_k"], name="cast", to=TensorProto.INT32),
             helper.make_node("Shape", ["attention_mask"], ["mask_shape"], name="shape"),
             helper.make_node("Gather", ["mask_shape", "one_scalar"], ["total"], name="gather", axis=0),
             helper.make_node("Cast", ["total"], ["total_len"], name="cast_total", to=TensorProto.INT32)]
    if packed:
        nodes.append(helper.make_node("MatMul", ["x", "wqkv"], ["qkv"], name="qkv_proj"))
        qkv = ["qkv", "", ""]
    else:
        nodes += [helper.make_node("MatMul", ["x", n], [n[1]], name=f"{n[1]}_proj") for n in ("wq", "wk", "wv")]
        qkv = ["q", "k", "v"]
    extra = {}
    ins = qkv + ["past_key", "past_value", "seqlens_k", "total_len"]
    if rotary:
        positions = np.arange(64)[:, None] * (10000.0 ** (-np.arange(head // 2) / (head // 2)))[None, :]
        w["cos_cache"], w["sin_cache"] = np.cos(positions).astype(np.float32), np.sin(positions).astype(np.float32)
        ins += ["cos_cache", "sin_cache"]
        extra = {"do_rotary": 1}
    nodes += [helper.make_node("GroupQueryAttention", ins, ["a", "present_key", "present_value"], name="gqa",
                               domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads, **extra),
              helper.make_node("MatMul", ["a", "wo"], ["y"], name="o_proj")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", hidden]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])]
    inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", kv_heads, "past", head])
               for n in ("past_key", "past_value")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", hidden])]
    outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", kv_heads, "total", head])
                for n in ("present_key", "present_value")]
    graph = helper.make_graph(nodes, "gqa", inputs, outputs, [numpy_helper.from_array(v, n) for n, v in w.items()])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


def gqa_feed(past=3, seq=2, head=16, kv_heads=2):
    rng = np.random.default_rng(3)
    return {"x": rng.standard_normal((1, seq, 2 * E)).astype(np.float32),
            "attention_mask": np.ones((1, past + seq), np.int64),
            "past_key": rng.standard_normal((1, kv_heads, past, head)).astype(np.float32),
            "past_value": rng.standard_normal((1, kv_heads, past, head)).astype(np.float32)}


@pytest.mark.parametrize("packed", [False, True], ids=["separate", "packed"])
@pytest.mark.parametrize("mode", MODES)
def test_group_query_attention_contrib_op(packed, mode):
    m = gqa_contrib(packed, rotary=packed)
    groups = prepare(m, gqa_mode=mode).analysis.prunable
    assert len(groups) == 1 and groups[0].kv_groups == 2
    check_oracle(m, gqa_feed(), mode)
    r = prune_model(m, Recipe(ratio=0.5, gqa_mode=mode))
    node = next(n for n in r.model.graph.node if n.op_type == "GroupQueryAttention")
    heads = {a.name: a.i for a in node.attribute}
    assert (heads["num_heads"], heads["kv_num_heads"]) == ((2, 1) if mode == "kv-groups" else (2, 2))
    if packed:
        assert init_shape(r.model, "wqkv") == (2 * E, (2 + 2 * heads["kv_num_heads"]) * 16)
    assert bool(r.interface) == (mode == "kv-groups")


needs_torch = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs torch/transformers")


@needs_torch
@pytest.mark.parametrize("opset", [18, 23], ids=["decomposed", "attention-op"])
@pytest.mark.parametrize("mode", MODES)
def test_sdpa_enable_gqa(tmp_path, opset, mode):
    """torch's sdpa(enable_gqa=True), exported by dynamo (the TorchScript exporter refuses enable_gqa)."""
    from tools import export_transformers as et

    import torch

    block = et.GQAttention(hidden=32, heads=4, kv_heads=2)
    if opset == 18 and mode == "kv-groups":
        with pytest.raises(Exception, match="enable_gqa"):  # nothing to test with TorchScript: it refuses the form
            torch.onnx.export(block, (torch.randn(2, 5, 32),), str(tmp_path / "ts.onnx"), dynamo=False)
    path = et.export_attention(block, tmp_path / "gqa.onnx", opset)
    m = onnx.load(str(path))
    assert any(n.op_type == "Attention" for n in m.graph.node) == (opset == 23)
    groups = [g for g in prepare(m, gqa_mode=mode).analysis.prunable if g.kv_groups]
    assert len(groups) == 1
    feed = {"x": np.random.default_rng(0).standard_normal((2, 6, 32)).astype(np.float32)}
    check_oracle(m, feed, mode)


def test_multi_query_attention_needs_query_heads_mode():
    """One k/v head for all query heads (ONNX Attention with kv_num_heads 1): its one KV group cannot go, its
    query heads can. (In a plain repeat_kv graph a single k/v head is indistinguishable from plain features, so
    there it stays frozen.)"""
    m = attention23(heads=4, kv_heads=1)
    group = next(g for g in prepare(m).analysis.groups if g.kv_groups)
    assert not group.prunable and "multi-query attention" in group.reason
    check_oracle(m, x_feed(), "query-heads")
    r = prune_model(m, Recipe(ratio=0.5, gqa_mode="query-heads"))
    node = next(n for n in r.model.graph.node if n.op_type == "Attention")
    assert {a.name: a.i for a in node.attribute}["q_num_heads"] == 2
