"""The planner's channel selection (onnxprune/pipeline/plan.py)."""

from __future__ import annotations

import numpy as np

from onnxprune.pipeline.plan import select


def test_select_keeps_whole_heads():
    class G:
        size, unit, blocks, tied = 12, 4, 1, False

    # head sums 0, 20, 12: keeping 6 channels rounds to 2 whole heads, the best two
    kept = select(G(), np.array([0, 0, 0, 0, 5, 5, 5, 5, 1, 1, 1, 9.0]), 6)
    assert kept.tolist() == list(range(4, 12))


def test_coarse_query_head_steps_are_shared_out_over_the_layers():
    """gqa_mode auto with 3 query heads per KV group: a step is one head in every KV group (a third of a layer's
    heads). At ratio 0.2 the steps go to the layers where they cost least, until the layers together have lost
    20 % of their heads (to the nearest step), instead of none (rounding down) or a third of every layer."""
    from types import SimpleNamespace

    from onnxprune.pipeline.plan import plan_uniform

    unit, blocks, per_block, layers = 2, 3, 3, 10
    groups, scores = [], {}
    rng = np.random.default_rng(0)
    for i in range(layers):
        g = SimpleNamespace(size=unit * blocks * per_block, unit=unit, blocks=blocks, tied=False, spaces=[i],
                            gqa_mode="query-heads", gqa_auto=True)
        groups.append(g)
        s = rng.uniform(1.0, 2.0, g.size)
        s[0:unit] = 0.01 * (i + 1)  # one weak head per KV group, weaker in the earlier layers
        s[per_block * unit:per_block * unit + unit] = 0.01 * (i + 1)
        s[2 * per_block * unit:2 * per_block * unit + unit] = 0.01 * (i + 1)
        scores[i] = s
    plan = plan_uniform(SimpleNamespace(prunable=groups), scores, 0.2)
    removed = {root: plan.pruned(root) // unit for root in plan.kept}
    # 90 heads x 0.2 = 18 heads = 6 steps of 3, in the six layers whose weak heads are weakest
    assert removed == {i: 3 for i in range(6)}
    # without auto, each layer rounds 20 % of 3 heads down: nothing
    for g in groups:
        g.gqa_auto = False
    assert not plan_uniform(SimpleNamespace(prunable=groups), scores, 0.2).kept
