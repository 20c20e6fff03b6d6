"""The Pareto front of a sweep, and the candidate `--max-drop` picks.

Objectives: the quality metric (higher is better, except metrics in evaluate.LOWER_IS_BETTER such as
perplexity), and MACs, bytes and latency (lower is better; latency only when it was measured). A candidate
is on the front when no other candidate is at least as good in every objective and better in one. Bytes
count so that quantized candidates (same MACs, a quarter of the bytes) can be on the front.
"""

from __future__ import annotations

from typing import Sequence

COSTS = ("macs", "bytes", "latency_ms")


def higher_is_better(metric: str) -> bool:
    from onnxprune.evaluate import LOWER_IS_BETTER

    return metric not in LOWER_IS_BETTER


def _objectives(metrics: dict, costs: Sequence[str]) -> tuple[float, ...]:
    """Every objective as a number to minimise."""
    sign = -1.0 if higher_is_better(metrics["metric"]) else 1.0
    return (sign * metrics["value"], *(float(metrics[c]) for c in costs))


def dominates(a: dict, b: dict, costs: Sequence[str] = COSTS) -> bool:
    """Whether metrics `a` are at least as good as `b` in every objective and better in one."""
    x, y = _objectives(a, costs), _objectives(b, costs)
    return all(p <= q for p, q in zip(x, y)) and any(p < q for p, q in zip(x, y))


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
