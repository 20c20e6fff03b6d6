"""Channel importance: one score per channel of each group, from the group's members.

Each member (a weight sliced with the group) gives per-channel norms, normalised by their mean so that a
wide layer does not outvote a narrow one; a group's score is the mean over its members. Criteria are
registered by name; the CLI's `--criterion` choices come from this registry.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from onnxprune.graph.analysis import Analysis
from onnxprune.graph.groups import ChannelGroup, Member
from onnxprune.graph.ir import GraphView

Criterion = Callable[[ChannelGroup, GraphView, Callable[[int], int], np.random.Generator], np.ndarray]
CRITERIA: dict[str, Criterion] = {}


def criterion(name: str):
    def deco(fn: Criterion) -> Criterion:
        if name in CRITERIA:
            raise RuntimeError(f"criterion {name!r} is already registered")
        CRITERIA[name] = fn
        return fn
    return deco


def member_channel_norms(member: Member, view: GraphView, root: int, find, size: int, p: float = 1) -> np.ndarray:
    """Per-channel p-norm (to the p-th power summed) of the member's slices that belong to space `root`."""
    arr = view.array(member.tensor).astype(np.float64)
    flat = np.abs(np.moveaxis(arr, member.axis, 0).reshape(arr.shape[member.axis], -1)) ** p
    per_position = flat.sum(axis=1)
    total = np.zeros(size)
    for seg in member.layout.segments:
        if find(seg.space) == root:
            total += per_position[seg.positions()].sum(axis=1)
    return total


def _magnitude(group: ChannelGroup, view: GraphView, find, p: float, members=None) -> np.ndarray:
    root = find(group.spaces[0])
    members = [m for m in group.members if m.scored and m.role in ("in", "out")] if members is None else members
    if not members:
        members = [m for m in group.members if m.scored]
    if not members:
        return np.ones(group.size)
    scores = np.zeros(group.size)
    for m in members:
        norms = member_channel_norms(m, view, root, find, group.size, p) ** (1.0 / p)
        mean = norms.mean()
        scores += norms / mean if mean > 0 else norms
    return scores / len(members)


@criterion("l1")
def l1(group, view, find, rng):
    return _magnitude(group, view, find, 1)


@criterion("l2")
def l2(group, view, find, rng):
    return _magnitude(group, view, find, 2)


@criterion("bn-scale")
def bn_scale(group, view, find, rng):
    """|gamma| of the BatchNormalization layers in the group (Network Slimming); l1 where there are none."""
    bns = [m for m in group.members if m.op_type == "BatchNormalization" and m.input_index == 1]
    if not bns:
        return l1(group, view, find, rng)
    return _magnitude(group, view, find, 1, members=bns)


@criterion("random")
def random_scores(group, view, find, rng):
    return rng.random(group.size)


def score_groups(analysis: Analysis, view: GraphView, name: str = "l1", seed: int = 0) -> dict[int, np.ndarray]:
    if name not in CRITERIA:
        from onnxprune.errors import InputError

        raise InputError(f"unknown criterion {name!r} (choose from {', '.join(sorted(CRITERIA))})")
    rng = np.random.default_rng(seed)
    fn = CRITERIA[name]
    return {g.spaces[0]: fn(g, view, analysis.find, rng) for g in analysis.groups if g.prunable}
