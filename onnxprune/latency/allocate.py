"""Allocation under a latency budget, and the closed loop that checks it by measurement.

Allocation is a multiple-choice knapsack: each group picks one kept count among those its latency table
measured (or stays whole); a count costs the importance of the channels it drops (the group's scores over
their mean, summed over the lowest-scored channels removed: the same normalisation as `--global`; with
`--allocate sensitivity`, the drop measured when the group alone loses that share) and saves
-log of its latency ratio, and the savings add up to -log of the plan's predicted ratio (table.py's
multiplicative model). Per group only options that no other beats (more saving for less loss) are kept, so a count that is no
faster than a larger one (a step of the measured curve not taken) is never chosen; the greedy takes the
cheapest importance per unit of saving until the budget is met (optimal for the relaxed problem), then a
local search moves single groups to cheaper counts while the budget holds.

The table's model is a prediction; the result is measured end to end against the original (interleaved, as
ratios). When it misses the target by more than the measurement noise (too slow, or faster than needed), the
budget handed to the allocation is corrected by the measured error (`next_budget`) and the plan made again, at
most `max_iterations` times; the best measured plan within the target is kept.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.latency import measure
from onnxprune.latency.measure import LatencySettings, parse_target
from onnxprune.latency.table import LatencyTable, between_counts, build_table
from onnxprune.pipeline.apply import apply_validated
from onnxprune.pipeline.plan import Plan, select

Option = tuple[int, float, float]  # (kept count, saving = -log ratio, importance lost)


def group_options(size: int, counts: list[int], ratios: list[float], scores: np.ndarray,
                  curve: tuple[list[float], list[float]] | None = None) -> list[Option]:
    """A group's options that no other beats (more saving for less loss), from the whole group (0, 0) up, in
    order of saving; a count no faster than a larger one is dropped here. `ratios` as the table resolves them
    (LatencyTable.resolved: savings within the noise are taken at their MAC fraction).

    The loss of removing channels is the importance they carry: their scores over the group's mean (as
    `--global` ranks), or, with a sensitivity `curve` (pruned ratios, measured drops in points), the drop
    measured when this group alone loses that share, interpolated and made non-decreasing; the scores then only
    order groups whose drop is nil."""
    lost = _losses(size, scores, curve)
    points = [(-math.log(max(r, 1e-9)), float(lost[size - k]), k) for k, r in zip(counts, ratios) if r < 1.0]
    frontier: list[Option] = []
    for saving, loss, k in sorted(points, key=lambda p: (-p[0], p[1])):
        if not frontier or loss < frontier[-1][2]:
            frontier.append((k, saving, loss))
    return [(size, 0.0, 0.0), *reversed(frontier)]


def refine_options(size: int, counts: list[int], ratios: list[float], scores: np.ndarray, between: list[int],
                   curve: tuple[list[float], list[float]] | None = None) -> list[Option]:
    """Options at the counts `between` the measured ones (table.between_counts), their ratio interpolated as
    the table predicts; only those faster than every measured count that keeps more channels. The greedy
    never steps onto them (it walks the measured options: the curve's steps are what the provider runs
    fast); the local search may, so a plan whose measured step saves more than the budget needs can give the
    surplus back, and the closed loop's measurement corrects an interpolation the provider does not follow."""
    measured = {k: r for k, r in zip(counts, ratios)}
    xs = np.asarray([*sorted(measured), size], dtype=np.float64)
    ys = np.asarray([measured[k] for k in sorted(measured)] + [1.0])
    lost = _losses(size, scores, curve)
    out: list[Option] = []
    for k in between:
        if k in measured or not 0 < k < size:
            continue
        r = float(np.interp(k, xs, ys))
        if r < min([1.0, *(v for c, v in measured.items() if c > k)]):
            out.append((k, -math.log(max(r, 1e-9)), float(lost[size - k])))
    return out


def _losses(size: int, scores: np.ndarray, curve) -> np.ndarray:
    """Importance lost by removing the j weakest channels, j = 0..size (see group_options)."""
    normed = np.sort(np.asarray(scores, dtype=np.float64))
    normed = normed / max(float(normed.mean()), 1e-12)
    lost = np.concatenate([[0.0], np.cumsum(normed)])
    if curve is not None:
        measured = np.maximum.accumulate(np.maximum(np.asarray(curve[1], dtype=np.float64), 0.0))
        share = np.arange(size + 1) / size
        lost = np.interp(share, [0.0, *curve[0]], [0.0, *measured]) + 1e-6 * lost / size
    return lost


def lower_hull(options: list[Option]) -> list[Option]:
    """The options on the lower convex hull of (saving, loss): those the greedy steps through."""
    hull: list[Option] = []
    for option in options:
        while len(hull) >= 2:  # drop the last point while it lies on or above the segment to the new one
            (_, s1, l1), (_, s2, l2) = hull[-2], hull[-1]
            if (l2 - l1) * (option[1] - s1) >= (option[2] - l1) * (s2 - s1):
                hull.pop()
            else:
                break
        hull.append(option)
    return hull


def allocate(options: dict[int, list[Option]], target_ratio: float,
             refine: dict[int, list[Option]] | None = None) -> dict[int, int]:
    """Kept count per group (only groups that lose channels) whose summed saving reaches -log(target_ratio)
    with little importance lost; the largest saving possible when the target cannot be reached.

    The greedy walks each group's convex hull, cheapest loss per saving first, until the budget is met; then a
    local search moves single groups to any of their options (hull or not: the hull skips counts a budget
    between two steps needs), and to the `refine` options (refine_options) of each group, while the budget
    holds and the loss falls."""
    need = -math.log(max(target_ratio, 1e-12))
    hulls = {root: lower_hull(opts) for root, opts in options.items()}
    at = {root: 0 for root in options}
    heap: list[tuple[float, int, int]] = []

    def push(root: int) -> None:
        hull, i = hulls[root], at[root]
        if i + 1 < len(hull):
            ds, dl = hull[i + 1][1] - hull[i][1], hull[i + 1][2] - hull[i][2]
            heapq.heappush(heap, (dl / max(ds, 1e-12), root, i))

    for root in options:
        push(root)
    saved = 0.0
    while saved < need - 1e-12 and heap:
        _, root, i = heapq.heappop(heap)
        if at[root] != i:
            continue
        saved += hulls[root][i + 1][1] - hulls[root][i][1]
        at[root] = i + 1
        push(root)
    chosen = {root: hulls[root][i] for root, i in at.items()}
    if saved < need - 1e-12:  # out of reach: everything the hulls allow
        return {root: o[0] for root, o in chosen.items() if o[1] > 0}
    moves = {root: [*opts, *(refine or {}).get(root, [])] for root, opts in options.items()}
    for _ in range(100 * len(options)):  # local search: the single move that loses least, while any helps
        best = None
        for root, current in chosen.items():
            for option in moves[root]:
                gain = current[2] - option[2]
                if gain > 1e-12 and saved - current[1] + option[1] >= need - 1e-12 and (best is None or gain > best[0]):
                    best = (gain, root, option)
        if best is None:
            break
        _, root, option = best
        saved += option[1] - chosen[root][1]
        chosen[root] = option
    return {root: o[0] for root, o in chosen.items() if o[1] > 0}


@dataclass
class LatencyResult:
    plan: Plan
    target: float | str        # as given: a fraction, or "12ms"
    target_ratio: float        # the target as a fraction of the original's latency
    base_ms: float             # the original model
    predicted: float           # the table's predicted ratio for the plan
    measured: float            # the measured ratio (end to end, against the original)
    noise: float               # relative spread of that measurement
    met: bool
    iterations: list[dict] = field(default_factory=list)
    table: LatencyTable | None = None
    importance: str = "scores"  # what a channel lost costs: "scores" or measured "sensitivity"

    def as_dict(self) -> dict:
        t = self.table
        return {"target": self.target, "target_ratio": self.target_ratio, "target_ms": self.target_ratio * self.base_ms,
                "base_ms": self.base_ms, "predicted_ratio": self.predicted, "predicted_ms": self.predicted * self.base_ms,
                "measured_ratio": self.measured, "measured_ms": self.measured * self.base_ms, "noise": self.noise,
                "met": self.met, "iterations": self.iterations, "importance": self.importance,
                "table": None if t is None else {"provider": t.provider, "batch": t.batch, "threads": t.threads,
                                                 "groups": len(t.curves), "cached": t.cached,
                                                 "seconds": round(t.seconds, 2), "noise": t.noise}}


def kept_plan(analysis, scores: dict[int, np.ndarray], counts: dict[int, int]) -> Plan:
    plan = Plan()
    for g in analysis.prunable:
        root = g.spaces[0]
        plan.sizes[root] = g.size
        if root in counts and counts[root] < g.size:
            plan.kept[root] = select(g, scores[root], counts[root])
    return plan


def next_budget(budget: float, predicted: float, measured: float, target: float, tight: float, loose: float,
                bracket: tuple[float, float] | None = None) -> float:
    """The budget for the next plan. Savings add up in log space, so the table's error is taken as a factor
    on the log saving: measured = predicted ** a, and the budget that should measure `target` is
    target ** (1 / a) (a plan's predicted ratio is close to its budget). Once a budget measured too fast
    (`tight`) and one too slow (`loose`) are known, with their measured ratios in `bracket`, the next budget
    interpolates between them on the measurements (log-linear, regula falsi), kept off their ends by a tenth
    of the gap, so it converges where the table's prediction is wrong. Strictly between `tight` and `loose`;
    their geometric mean when the estimate leaves them."""
    if bracket is not None and 0 < tight < loose and 0 < bracket[0] < target < bracket[1]:
        lt, ll = math.log(tight), math.log(loose)
        f = (math.log(target) - math.log(bracket[0])) / (math.log(bracket[1]) - math.log(bracket[0]))
        return math.exp(lt + min(max(f, 0.1), 0.9) * (ll - lt))
    if 0 < predicted < 1 and 0 < measured < 1 and 0 < target < 1:
        step = target ** (math.log(predicted) / math.log(measured))
    else:
        step = budget * target / max(measured, 1e-9)
    if tight < step < loose:
        return step
    return math.sqrt(max(tight, 1e-3) * loose)


def plan_for_latency(prep, model: onnx.ModelProto, scores: dict[int, np.ndarray], target: float | str,
                     settings: LatencySettings, feed: dict[str, np.ndarray], cache=None, max_iterations: int = 8,
                     show_progress: bool = False,
                     sensitivity: dict[int, tuple[list[float], list[float]]] | None = None) -> LatencyResult:
    """The plan keeping the most importance whose measured latency is within `target` (a fraction of the
    original's, or "12ms"), on `settings`' provider, batch and threads; importance is the scores, or the
    measured drops of `sensitivity` (group root -> (pruned ratios, drops), SensitivityResult.curves)."""
    measured_table = build_table(prep, model, feed, settings, cache, show_progress)
    table = measured_table.resolved()
    target_ratio = parse_target(target, table.base_ms)
    # with sensitivity, a group it could not measure (a contained fault) stays whole
    options = {root: group_options(c.size, c.counts, c.ratios, scores[root],
                                   sensitivity[root] if sensitivity is not None else None)
               for root, c in table.curves.items() if c.counts and (sensitivity is None or root in sensitivity)}
    groups = {g.spaces[0]: g for g in prep.analysis.prunable}
    refine = {root: refine_options(c.size, c.counts, c.ratios, scores[root], between_counts(groups[root], c.counts),
                                   sensitivity[root] if sensitivity is not None else None)
              for root, c in table.curves.items() if root in options and root in groups}
    internal = min(target_ratio, 1.0)
    tried: list[dict] = []
    best: tuple[Plan, float, float, float] | None = None  # plan, predicted, measured, noise
    fastest = None
    seen: set[tuple] = set()
    tight, loose = 0.0, 1.0  # budgets known to give plans faster than needed / slower than the target
    tight_m, loose_m = 0.0, math.inf  # what they measured
    for it in range(max_iterations):
        counts = allocate(options, internal, refine)
        for _ in range(20):  # a budget too close to the last to change the plan: move on in the same direction
            if tuple(sorted(counts.items())) not in seen or not tried:
                break
            internal = internal ** (1.25 if tried[-1]["measured_ratio"] > target_ratio else 0.8)
            counts = allocate(options, internal, refine)
        signature = tuple(sorted(counts.items()))
        if signature in seen:
            break
        seen.add(signature)
        plan = kept_plan(prep.analysis, scores, counts)
        predicted = table.predict({r: len(k) for r, k in plan.kept.items()})
        applied = apply_validated(prep, plan, model, None, check=False)
        pruned, plan = applied.model, applied.plan
        timed = measure.time_models({"original": prep.model, "pruned": pruned}, feed, settings, reference="original")
        measured, noise = float(timed["ratio"]["pruned"]), float(timed["noise"]["pruned"])
        if isinstance(target, str):  # absolute: against the least disturbed time of the original seen so far
            table.base_ms = min(table.base_ms, timed["ms"]["original"])
            target_ratio = parse_target(target, table.base_ms)
        tol = max(noise, table.noise, 0.02)
        ok = bool(measured <= target_ratio * (1 + tol))
        tried.append({"iteration": it + 1, "budget_ratio": internal, "predicted_ratio": predicted,
                      "measured_ratio": measured, "noise": noise, "channels_removed": plan.total_pruned,
                      "within_target": ok})
        if fastest is None or measured < fastest[2]:
            fastest = (plan, predicted, measured, noise)
        if ok and (best is None or measured > best[2]):
            best = (plan, predicted, measured, noise)
        if ok and measured >= target_ratio * (1 - tol):
            break
        if ok and internal > tight:
            tight, tight_m = internal, measured
        elif not ok and internal < loose:
            loose, loose_m = internal, measured
        bracket = (tight_m, loose_m) if tight > 0 and loose < 1.0 else None
        internal = next_budget(internal, predicted, measured, target_ratio, tight, loose, bracket)
    plan, predicted, measured, noise = best or fastest
    return LatencyResult(plan, target, target_ratio, table.base_ms, predicted, measured, noise, best is not None,
                         tried, table, "sensitivity" if sensitivity is not None else "scores")
