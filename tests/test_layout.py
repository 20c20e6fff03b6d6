"""Channel layouts (onnxprune/graph/layout.py): segments and the positions they map channels to."""

from __future__ import annotations

import numpy as np

from onnxprune.graph.layout import Segment


def test_divisor_segment_positions_and_merge():
    seg = Segment(0, 8, divisor=4)
    assert seg.size == 2 and seg.positions(np.array([1, 6])).ravel().tolist() == [0, 1]
    merged = seg.expanded(trailing=4, leading=1, axis_length=2)
    assert merged.divisor == 0 and merged.positions().ravel().tolist() == list(range(8))
