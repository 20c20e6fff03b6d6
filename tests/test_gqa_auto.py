"""Issue 19 item 3: heads prune on every grouped-query layout.

gqa_mode "auto" (the default) takes whole key/value groups when they can meet the ratio, else query heads evenly
inside the groups: multi-query attention (one KV head) and 3 KV groups at 20 % prune query heads, the report says
which mode was used, and an explicit --gqa-mode kv-groups still gives the model it gave before.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest

from onnxprune.cli import main
from onnxprune.pipeline.plan import plan_uniform
from onnxprune.pipeline.prepare import prepare
from onnxprune.pipeline.prune import prune_model
from onnxprune.runtime.session import run
from onnxprune.testing import zero_channels
from onnxprune.recipe import Recipe
from onnxprune.pipeline.prune import RunSettings
from tests.onnx_builders import init_shape
from tests.test_gqa import attention23, gqa_contrib, gqa_feed, repeat_kv, x_feed


def auto_oracle(model, ratio: float, feed=None):
    """Zero the query heads gqa_mode auto removes at `ratio` (random scores), prune exactly those: the outputs
    match the zeroed model's, and the zeroing moved them. Returns the pruned result and its head group."""
    prep = prepare(model, gqa_mode="auto", head_share=ratio)
    (group,) = [g for g in prep.analysis.prunable if g.kv_groups]
    rng = np.random.default_rng(0)
    plan = plan_uniform(prep.analysis, {g.spaces[0]: rng.random(g.size) for g in prep.analysis.prunable}, ratio)
    removed = {r: np.setdiff1d(np.arange(plan.sizes[r]), k) for r, k in plan.kept.items()}
    zeroed = zero_channels(prep, removed)
    result = prune_model(zeroed, Recipe(ratio=ratio), RunSettings(removed=removed))  # the recipe's default gqa_mode: auto
    feed = feed or x_feed()
    want, got, plain = run(zeroed, feed)[0], run(result.model, feed)[0], run(model, feed)[0]
    scale = float(np.abs(want).max())
    assert float(np.abs(want - got).max()) < 1e-5 * scale
    assert float(np.abs(want - plain).max()) > 1e-2 * scale
    onnx.checker.check_model(result.model, full_check=True)
    return result, group


def test_multi_query_attention_prunes_query_heads_at_20_percent():
    m = attention23(heads=4, kv_heads=1)
    result, group = auto_oracle(m, 0.2)
    assert (group.gqa_mode, group.kv_groups) == ("query-heads", 1)
    node = next(n for n in result.model.graph.node if n.op_type == "Attention")
    assert {a.name: a.i for a in node.attribute}["q_num_heads"] == 3  # 20 % of 4 heads: one goes
    assert init_shape(result.model, "wk") == (16, 4)  # the one k/v head stays
    assert any("gqa-mode auto pruned query heads" in n and "single KV head" in n for n in result.notes)


def test_multi_query_group_query_attention_contrib_op():
    """onnxruntime-genai's GroupQueryAttention with one KV head (packed q|k|v, rotary): a query head goes, the
    cache keeps its one head."""
    m = gqa_contrib(packed=True, heads=4, kv_heads=1, rotary=True)
    result, group = auto_oracle(m, 0.2, gqa_feed(kv_heads=1))
    assert group.gqa_mode == "query-heads" and result.interface == []
    node = next(n for n in result.model.graph.node if n.op_type == "GroupQueryAttention")
    assert {a.name: a.i for a in node.attribute}["num_heads"] == 3


def test_three_kv_groups_prune_query_heads_inside_every_group():
    m = repeat_kv(heads=9, kv_heads=3)
    result, group = auto_oracle(m, 0.2)
    assert (group.gqa_mode, group.kv_groups, group.blocks) == ("query-heads", 3, 3)
    # one of the 3 query heads of every KV group goes; the 3 k/v heads stay
    assert init_shape(result.model, "wq") == (16, 24) and init_shape(result.model, "wk") == (16, 12)
    kept = result.plan.kept[group.spaces[0]] // 4
    assert [len(set(kept[(kept >= 3 * b) & (kept < 3 * b + 3)].tolist())) for b in range(3)] == [2, 2, 2]
    assert any("3 KV groups cannot lose 20% of them whole" in n for n in result.notes)


def test_whole_groups_when_they_meet_the_ratio_and_explicit_modes_replay():
    m = repeat_kv(heads=8, kv_heads=4)
    auto = prune_model(m, Recipe(ratio=0.3))  # 4 groups at 30 %: one whole group goes, as kv-groups did
    explicit = prune_model(m, Recipe(ratio=0.3, gqa_mode="kv-groups"))
    assert init_shape(auto.model, "wk") == init_shape(explicit.model, "wk") == (16, 12)
    assert not any("gqa-mode auto" in n for n in auto.notes)
    # a recipe of before (kv-groups explicit) at 20 % of 3 groups: no head goes, as before
    three = repeat_kv(heads=9, kv_heads=3)
    before = prune_model(three, Recipe(ratio=0.2, gqa_mode="kv-groups"))
    assert init_shape(before.model, "wq") == (16, 36) and init_shape(before.model, "wk") == (16, 12)
    assert prune_model(three, Recipe(ratio=0.2, gqa_mode="query-heads")).plan.kept == {}  # floor, as before


def test_cli_reports_the_mode_and_sensitivity_sees_the_heads(tmp_path):
    path = tmp_path / "mqa.onnx"
    onnx.save(attention23(heads=4, kv_heads=1), path)
    report = tmp_path / "r.json"
    assert main(["prune", str(path), "--ratio", "0.2", "-o", str(tmp_path / "p.onnx"), "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["gqa_mode"] == "auto" and data["gqa_modes_used"] == ["query-heads"]
    assert any("gqa-mode auto" in n for n in data["notes"])
    sens = tmp_path / "s.json"
    assert main(["sensitivity", str(path), "--random", "4", "--input-shapes", "x:1x5x16", "--ratios", "0.25",
                 "--json", str(sens)]) == 0
    rows = json.loads(sens.read_text())["rows"]
    assert any(r["channels"] == 16 and r["sources"][0] == "proj_wq" for r in rows), rows


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_llama_decoder_with_three_kv_groups_prunes_heads_at_20_percent(tmp_path):
    """SmolLM2's layout (9 query heads sharing 3 k/v heads), exported by torch. (transformers' repeat_kv with one
    k/v head is indistinguishable from plain features, so multi-query attention is tested in the ONNX Attention
    and GroupQueryAttention forms above.)"""
    hidden, heads, kv_heads = 36, 9, 3
    from tools import export_transformers as et

    path = tmp_path / "lm.onnx"
    et.export(et.llama(hidden=hidden, heads=heads, kv_heads=kv_heads, layers=2), "llama", path, dynamo=False)
    report = tmp_path / "r.json"
    out = tmp_path / "p.onnx"
    assert main(["prune", str(path), "--ratio", "0.2", "-o", str(out), "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    head_rows = [g for g in data["groups"] if g.get("kv_groups")]
    assert len(head_rows) == 2 and all(g["gqa_mode"] == "query-heads" for g in head_rows)
    # 20 % of 18 heads is 3.6: one step of one head per KV group (3 heads) goes, in one of the two layers
    removed = sorted((g["channels"] - g["kept"]) // (hidden // heads) for g in head_rows)
    assert removed == [0, 3]
    ids = np.array([[3, 9, 27, 4, 1]], np.int64)
    hidden_states = run(onnx.load(out), {"input_ids": ids})[0]
    assert hidden_states.shape == (1, 5, hidden) and np.isfinite(hidden_states).all()
