"""The Pareto front of a sweep, and the candidate `--max-drop` picks.

Objectives: the quality metric (higher is better, except metrics in evaluate.LOWER_IS_BETTER such as
perplexity), and MACs, bytes and latency (lower is better; latency only when it was measured). A candidate
is on the front when no other candidate is at least as good in every objective and better in one. Bytes
count so that quantized candidates (same MACs, a quarter of the bytes) can be on the front. Latencies
within LATENCY_TIE of each other count as equal: timing a small model moves by a few percent from run to
run, and a front decided by that noise would keep candidates that are worse in every other way.
"""

from __future__ import annotations

from collections.abc import Sequence

from onnxprune.evaluate.metrics import LOWER_IS_BETTER

COSTS = ("macs", "bytes", "latency_ms")
LATENCY_TIE = 0.05  # relative


def higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


def _quality(metrics: dict) -> float:
    """The metric as a number to maximise."""
    return metrics["value"] if higher_is_better(metrics["metric"]) else -metrics["value"]


def _no_worse(a: dict, b: dict, key: str) -> bool:
    if key == "latency_ms":
        return a[key] <= b[key] * (1 + LATENCY_TIE)
    return a[key] <= b[key]


def _better(a: dict, b: dict, key: str) -> bool:
    if key == "latency_ms":
        return a[key] * (1 + LATENCY_TIE) < b[key]
    return a[key] < b[key]


def dominates(a: dict, b: dict, costs: Sequence[str] = COSTS) -> bool:
    """Whether metrics `a` are at least as good as `b` in every objective and better in one."""
    qa, qb = _quality(a), _quality(b)
    no_worse = qa >= qb and all(_no_worse(a, b, c) for c in costs)
    return no_worse and (qa > qb or any(_better(a, b, c) for c in costs))


def front_costs(metrics: Sequence[dict]) -> tuple[str, ...]:
    """The cost objectives every candidate has (latency drops out when it was not measured)."""
    return tuple(c for c in COSTS if metrics and all(m.get(c) is not None for m in metrics))


def pareto_flags(metrics: Sequence[dict | None]) -> list[bool]:
    """For each candidate's metrics (None for a failed one), whether it is on the front of the others."""
    ok = [m for m in metrics if m is not None]
    costs = front_costs(ok)
    return [m is not None and not any(dominates(o, m, costs) for o in ok if o is not m) for m in metrics]


def drop(baseline: dict, metrics: dict) -> float:
    """How much worse than the baseline, in the metric's points (positive = worse)."""
    delta = baseline["value"] - metrics["value"]
    return delta if higher_is_better(metrics["metric"]) else -delta


def select_within(baseline: dict, metrics: Sequence[dict | None], max_drop: float) -> int | None:
    """The index of the smallest candidate (fewest MACs, then bytes, then the better metric) whose drop
    is at most `max_drop` points; None when none is."""
    best, best_key = None, None
    for i, m in enumerate(metrics):
        if m is None or drop(baseline, m) > max_drop:
            continue
        key = (m["macs"], m["bytes"], drop(baseline, m))
        if best_key is None or key < best_key:
            best, best_key = i, key
    return best
