"""Budgets: keep a given fraction of the MACs or parameters, with a different ratio per group.

A plan's MACs and parameters are estimated without rewriting the model: a Conv, Gemm or MatMul costs in
proportion to the product of its weight's dimensions (the spatial size of its output does not change), and a
constant shrinks by the kept fraction of each axis sliced with a group. So trying a plan costs microseconds.

Channels are removed in one global order, and the number removed is bisected until the budget is met:
  * `global`: channels ranked by their score divided by the mean score of their group (as `--global`);
  * `sensitivity`: each group's next channel costs the accuracy drop that its sensitivity curve predicts at
    the group's new ratio, per MAC (or parameter) it saves; cheap channels go first.
Groups never lose more than `max_group_ratio` of their channels and keep at least one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from onnxprune.errors import InputError
from onnxprune.graph.stats import node_macs, numel
from onnxprune.pipeline.plan import Plan, select

METRICS = ("macs", "params")
PRIORITIES = ("global", "sensitivity", "uniform")


class CostModel:
    """MACs and parameters of the pruned model for any plan, from the members' kept fractions."""

    def __init__(self, prep):
        self.prep = prep
        self.macs = node_macs(prep.view)
        self.params = {t.name: numel(t.dims) for t in prep.model.graph.initializer if t.data_type in (1, 10, 11, 16)}
        # (node, input index) and tensor -> {axis: member} of weight members, deduplicated per axis
        self._node_axes: dict[str, dict[int, object]] = {}
        self._tensor_axes: dict[str, dict[int, object]] = {}
        for m in prep.analysis.context.members:
            if m.input_index == 1:
                self._node_axes.setdefault(m.node, {}).setdefault(m.axis, m)
            self._tensor_axes.setdefault(m.tensor, {}).setdefault(m.axis, m)
        self.macs_before = sum(self.macs.values())
        self.params_before = sum(self.params.values())

    def _fraction(self, members: dict, plan: Plan) -> float:
        f = 1.0
        for m in members.values():
            if any(self.prep.analysis.find(s.space) in plan.kept for s in m.layout.segments):
                f *= len(m.layout.kept_positions(plan.kept, self.prep.analysis.find)) / m.layout.length
        return f

    def cost(self, plan: Plan, metric: str) -> float:
        """Kept fraction of MACs or parameters under `plan`."""
        if metric == "macs":
            kept = sum(v * self._fraction(self._node_axes.get(n, {}), plan) for n, v in self.macs.items())
            return kept / max(self.macs_before, 1)
        kept = sum(v * self._fraction(self._tensor_axes.get(t, {}), plan) for t, v in self.params.items())
        return kept / max(self.params_before, 1)


@dataclass
class BudgetResult:
    plan: Plan
    metric: str
    target: float
    estimate: float  # kept fraction the cost model predicts
    removed: int     # channels removed


def plan_from_counts(analysis, scores: dict[int, np.ndarray], removed: dict[int, int], round_to: int = 1) -> Plan:
    """A plan removing `removed[root]` channels (the lowest scored) from each group."""
    plan = Plan()
    for g in analysis.prunable:
        root = g.spaces[0]
        plan.sizes[root] = g.size
        keep = max(1, g.size - removed.get(root, 0))
        if round_to > 1 and g.size > round_to:
            keep = min(g.size, max(round_to, int(round(keep / round_to)) * round_to))
        kept = select(g, scores[root], keep)
        if len(kept) < g.size:
            plan.kept[root] = kept
    return plan


def removal_order(analysis, scores: dict[int, np.ndarray], cost: CostModel, metric: str, priority: str,
                  sensitivity: dict[int, tuple[list[float], list[float]]] | None = None,
                  max_group_ratio: float = 0.9) -> list[int]:
    """Group roots, one entry per channel, in the order channels are removed."""
    keys: list[tuple[float, int, int]] = []
    for g in analysis.prunable:
        root = g.spaces[0]
        limit = min(g.size - 1, int(math.floor(g.size * max_group_ratio)))
        if limit <= 0:
            continue
        if priority == "uniform":
            keys.extend(((j + 1) / g.size, root, j) for j in range(limit))
            continue
        s = np.sort(np.asarray(scores[root], dtype=np.float64))
        if priority == "global":
            normed = s / max(s.mean(), 1e-12)
            keys.extend((float(normed[j]), root, j) for j in range(limit))
            continue
        if sensitivity is None:
            raise InputError("sensitivity-based budgets need sensitivity curves")
        if root not in sensitivity:  # its pruned model could not be measured (a contained fault): it stays whole
            continue
        ratios, drops = sensitivity[root]
        one = Plan(kept={root: np.arange(g.size - 1)}, sizes={root: g.size})
        saved = max(1.0 - cost.cost(one, metric), 1e-9)  # saved by one channel of this group
        curve = np.maximum.accumulate(np.maximum(np.asarray(drops, dtype=np.float64), 0.0))
        prev = 0.0
        for j in range(limit):
            drop = float(np.interp((j + 1) / g.size, [0.0, *ratios], [0.0, *curve]))
            # marginal drop per unit of saving; a tiny score term orders groups that never lose accuracy
            keys.append(((drop - prev) / saved + 1e-6 * (j + 1) / g.size, root, j))
            prev = drop
    # only the count taken from each group matters: a group always loses its lowest-scored channels first
    keys.sort()
    return [root for _, root, _ in keys]


def plan_for_target(prep, scores: dict[int, np.ndarray], target: float, metric: str = "macs",
                    priority: str = "global", sensitivity=None, round_to: int = 1,
                    max_group_ratio: float = 0.9) -> BudgetResult:
    """The plan removing the fewest channels (in `removal_order`) whose kept fraction is <= `target`."""
    if metric not in METRICS:
        raise InputError(f"unknown budget metric {metric!r} (choose from {', '.join(METRICS)})")
    if not 0.0 < target <= 1.0:
        raise InputError(f"--target-{metric} is the fraction to keep, in (0, 1]; got {target}")
    if priority not in PRIORITIES:
        raise InputError(f"unknown budget priority {priority!r} (choose from {', '.join(PRIORITIES)})")
    analysis = prep.analysis
    cost = CostModel(prep)
    order = removal_order(analysis, scores, cost, metric, priority, sensitivity, max_group_ratio)

    def counts_at(k: int) -> dict[int, int]:
        counts: dict[int, int] = {}
        for root in order[:k]:
            counts[root] = counts.get(root, 0) + 1
        return counts

    def plan_at(k: int) -> Plan:
        return plan_from_counts(analysis, scores, counts_at(k), round_to)

    lo, hi = 0, len(order)
    if cost.cost(plan_at(hi), metric) > target:
        plan = plan_at(hi)
        return BudgetResult(plan, metric, target, cost.cost(plan, metric), plan.total_pruned)
    while lo < hi:  # smallest k meeting the budget; the cost falls as k grows
        mid = (lo + hi) // 2
        if cost.cost(plan_at(mid), metric) <= target:
            hi = mid
        else:
            lo = mid + 1
    plan = plan_at(lo)
    if lo > 0:
        # the channel at position lo may save much more than needed (a wide coupled group): the next channel of
        # some other group may meet the budget with less removed
        limits = {root: order.count(root) for root in set(order)}
        base = counts_at(lo - 1)
        best = cost.cost(plan, metric)
        for root, limit in limits.items():
            if base.get(root, 0) >= limit:
                continue
            trial = plan_from_counts(analysis, scores, {**base, root: base.get(root, 0) + 1}, round_to)
            c = cost.cost(trial, metric)
            if best < c <= target:
                plan, best = trial, c
    return BudgetResult(plan, metric, target, cost.cost(plan, metric), plan.total_pruned)
