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
