"""`evaluate`: a candidate model against a reference on one dataset: outputs, accuracy, perplexity, agreement
and latency per provider, as one JSON-ready dict (what `onnxprune eval` prints)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from onnxprune.errors import InputError
from onnxprune.evaluate.data import Dataset
from onnxprune.evaluate.latency import time_models
from onnxprune.evaluate.metrics import (
    OutputComparison,
    TopK,
    lm_digest,
    logits_name,
    perplexity,
)
from onnxprune.report import progress
from onnxprune.report import environment
from onnxprune.runtime.session import (
    ModelLike,
    check_providers,
    model_label,
    Runner,
    open_session,
)

METRICS = ("auto", "accuracy", "perplexity")


def evaluate(candidate: ModelLike, dataset: Dataset, reference: ModelLike | None = None,
             providers: Sequence[str] = ("cpu",), *, top_k: Sequence[int] = (1, 5), latency: bool = True,
             warmup: int = 10, runs: int = 100, duration: float | None = None, threads: int | None = None,
             opt_level: str = "all", batch_sizes: Sequence[int] | None = None, atol: float | None = None,
             rtol: float | None = None, show_progress: bool = False, metric: str = "auto") -> dict:
    """Outputs, accuracy (when the data has labels), agreement with `reference`, and latency on each provider.

    `metric`: "auto" also reports perplexity when the model outputs next-token logits and the data has input_ids
    (and no labels); "perplexity" requires it; "accuracy" never computes it."""
    if metric not in METRICS:
        raise InputError(f"unknown --metric {metric!r} (choose from {', '.join(METRICS)})")
    providers = check_providers(providers)
    models = {"candidate": candidate} | ({"reference": reference} if reference is not None else {})
    all_sessions = {role: {p: open_session(model, p, threads, opt_level) for p in providers}
                    for role, model in models.items()}
    figures = _run_metrics(all_sessions, providers[0], dataset, top_k, metric, atol, rtol, show_progress)
    result: dict[str, Any] = {}
    for role, model in models.items():
        entry: dict[str, Any] = {"model": model_label(model)}
        if dataset.labels is not None:
            entry["accuracy"] = figures[role]["accuracy"].result()
        if figures[role]["nll"] is not None:
            entry["perplexity"] = perplexity(figures[role]["nll"], dataset.feeds)
        result[role] = entry
    if latency:
        for p in providers:  # candidate and reference timed alternately, per provider
            rows = time_models({role: s[p] for role, s in all_sessions.items()}, dataset, batch_sizes, warmup,
                                runs, duration, show_progress)
            for role, role_rows in rows.items():
                result[role].setdefault("latency", []).extend(role_rows)
    if reference is not None:
        result["agreement"] = figures["comparison"].result()
        result["deltas"] = _deltas(result["candidate"], result["reference"])
    result["data"] = {"source": dataset.source, "samples": len(dataset), "batches": len(dataset.feeds),
                      "batch_size": dataset.batch_size, "labels": dataset.labels is not None}
    result["providers"] = providers
    result["options"] = {"metric": metric, "top_k": list(top_k), "warmup": warmup, "runs": None if duration else runs,
                         "duration_s": duration, "threads": threads, "opt_level": opt_level,
                         "batch_sizes": list(batch_sizes) if batch_sizes else None, "atol": atol, "rtol": rtol}
    result.update(environment())
    return result


def _run_metrics(sessions: dict, provider: str, dataset: Dataset, top_k, metric: str, atol, rtol,
                 show_progress: bool) -> dict:
    """Every batch through every role's session, reduced at once to what the metrics need (top-k hits, a
    language model's log-likelihood, the candidate-reference comparison): no batch's outputs outlive it, so a
    perplexity over many tokens costs one batch of logits, not all of them."""
    runners = {role: Runner(s[provider]) for role, s in sessions.items()}
    figures: dict[str, Any] = {role: {"accuracy": TopK(top_k) if dataset.labels is not None else None,
                                      "nll": None} for role in runners}
    comparison = OutputComparison(atol, rtol) if "reference" in runners else None
    figures["comparison"] = comparison
    batches = list(dataset.batches())
    offset = 0
    with progress("running", len(batches) * len(runners), enabled=show_progress) as advance:
        for i, feed in enumerate(batches):
            outs = {}
            for role, runner in runners.items():
                runner.what = f"batch {i}"
                outs[role] = runner.run(feed)
                advance()
            n = next((v.shape[0] for v in feed.values() if np.ndim(v)), 1)
            for role, out in outs.items():
                if dataset.labels is not None:
                    figures[role]["accuracy"].add(out, dataset.labels[offset:offset + n])
                if i == 0 and (metric == "perplexity" or (metric == "auto" and dataset.labels is None and
                                                          logits_name(out, feed) is not None)):
                    figures[role]["nll"] = []  # what the first batch says: a language model's logits
                if figures[role]["nll"] is not None:
                    figures[role]["nll"].append(lm_digest(out, feed))
            if comparison is not None:
                comparison.add(outs["candidate"], outs["reference"], feed)
            offset += n
    return figures


def _deltas(candidate: dict, reference: dict) -> dict:
    deltas: dict[str, Any] = {}
    if "perplexity" in candidate and "perplexity" in reference:
        deltas["perplexity_ratio"] = candidate["perplexity"]["perplexity"] / reference["perplexity"]["perplexity"]
    for key, value in candidate.get("accuracy", {}).items():
        if key.startswith("top") and key in reference.get("accuracy", {}):
            deltas[f"{key}_points"] = 100.0 * (value - reference["accuracy"][key])
    ref_rows = {(r["provider"], r["batch_size"], r["mode"]): r for r in reference.get("latency", [])}
    speedups = []
    for row in candidate.get("latency", []):
        ref = ref_rows.get((row["provider"], row["batch_size"], row["mode"]))
        if ref:
            speedups.append({"provider": row["provider"], "batch_size": row["batch_size"], "mode": row["mode"],
                             "p50_speedup": ref["p50_ms"] / row["p50_ms"] if row["p50_ms"] else None})
    if speedups:
        deltas["latency"] = speedups
    return deltas

