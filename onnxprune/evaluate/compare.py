"""`evaluate`: a candidate model against a reference on one dataset: outputs, accuracy, perplexity, agreement
and latency per provider, as one JSON-ready dict (what `onnxprune eval` prints)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from onnxprune.errors import InputError
from onnxprune.evaluate.data import Dataset
from onnxprune.evaluate.latency import time_models
from onnxprune.evaluate.metrics import (
    accuracy,
    compare_outputs,
    logits_name,
    perplexity,
)
from onnxprune.report import environment
from onnxprune.runtime.session import (
    ModelLike,
    check_providers,
    model_label,
    open_session,
    run_batches,
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
    result: dict[str, Any] = {}
    outputs, all_sessions = {}, {}
    for role, model in models.items():
        sessions = {p: open_session(model, p, threads, opt_level) for p in providers}
        outputs[role] = run_batches(sessions[providers[0]], dataset.batches(), show_progress=show_progress)
        entry: dict[str, Any] = {"model": model_label(model)}
        if dataset.labels is not None:
            entry["accuracy"] = accuracy(outputs[role], dataset.labels, top_k)
        if metric == "perplexity" or (metric == "auto" and dataset.labels is None and outputs[role]
                                      and logits_name(outputs[role][0], dataset.feeds[0]) is not None):
            entry["perplexity"] = perplexity(outputs[role], dataset.feeds)
        result[role] = entry
        all_sessions[role] = sessions
    if latency:
        for p in providers:  # candidate and reference timed alternately, per provider
            rows = time_models({role: s[p] for role, s in all_sessions.items()}, dataset, batch_sizes, warmup,
                                runs, duration, show_progress)
            for role, role_rows in rows.items():
                result[role].setdefault("latency", []).extend(role_rows)
    if reference is not None:
        result["agreement"] = compare_outputs(outputs["candidate"], outputs["reference"], atol=atol, rtol=rtol,
                                              feeds=dataset.feeds)
        result["deltas"] = _deltas(result["candidate"], result["reference"])
    result["data"] = {"source": dataset.source, "samples": len(dataset), "batches": len(dataset.feeds),
                      "batch_size": dataset.batch_size, "labels": dataset.labels is not None}
    result["providers"] = providers
    result["options"] = {"metric": metric, "top_k": list(top_k), "warmup": warmup, "runs": None if duration else runs,
                         "duration_s": duration, "threads": threads, "opt_level": opt_level,
                         "batch_sizes": list(batch_sizes) if batch_sizes else None, "atol": atol, "rtol": rtol}
    result.update(environment())
    return result


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

