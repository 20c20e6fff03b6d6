"""One candidate of a sweep: prune by its recipe, measure the result; and the work candidates share.

`SweepContext` is what every executor ships once to wherever candidates run (a worker process, a Ray
node): the model's bytes, the calibration and evaluation data, the reference outputs, how to measure, and
the shared work (normalised model and channel groups per graph setting, activation statistics, scores per
criterion, sensitivity curves), all plain picklable values. `execute(context, recipe)` never raises: a
candidate that fails comes back with status "failed" and its error on one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxprune.errors import OnnxPruneError
from onnxprune.evaluate.data import Dataset
from onnxprune.evaluate.latency import measure_latency
from onnxprune.evaluate.metrics import metric_digest, quality_metric
from onnxprune.graph.stats import count_macs, count_params
from onnxprune.io.model_io import model_bytes
from onnxprune.pipeline.prepare import prepare_recipe
from onnxprune.pipeline.prune import Reuse, RunSettings, prune_model, sensitivity_curves
from onnxprune.pipeline.score import DATA_CRITERIA, STATISTICS, score_groups
from onnxprune.pipeline.statistics import channel_stats, criterion_stats
from onnxprune.recipe import Recipe
from onnxprune.runtime.session import open_session, run_batches


@dataclass(frozen=True)
class Measure:
    """How candidates are measured: the execution provider, onnxruntime threads, the latency loop."""

    provider: str = "cpu"
    threads: int | None = None
    warmup: int = 10
    runs: int = 100
    latency: bool = True
    latency_batch: int | None = None  # None: the evaluation data's batch size

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Shared:
    """Work computed once for every candidate with the same graph settings (see graph_key)."""

    prepared: Any                                               # onnxprune.pipeline.prune.Prepared
    stats: Any = None                                           # ActivationStats on the calibration data
    scores: dict[tuple[str, int], dict] = field(default_factory=dict)       # (criterion, seed) -> scores
    sensitivity: dict[tuple[str, int], dict] = field(default_factory=dict)  # (criterion, seed) -> curves


@dataclass
class SweepContext:
    model: bytes                        # the original model, serialised
    calibration: Dataset | None
    evaluation: Dataset
    reference_outputs: list[dict] | None  # the original's outputs on `evaluation` (metrics without labels)
    measure: Measure
    shared: dict[str, Shared] = field(default_factory=dict)     # graph_key -> work shared by candidates
    _proto: onnx.ModelProto | None = field(default=None, repr=False, compare=False)

    def original(self) -> onnx.ModelProto:
        if self._proto is None:
            self._proto = onnx.load_from_string(self.model)
        return self._proto

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_proto"] = None  # parsed again where it runs: bytes travel smaller and faster
        return state


def graph_key(recipe: Recipe, gqa: bool = True) -> str:
    """What normalisation and analysis depend on: candidates with equal keys share one prepared model.

    gqa_mode "auto" decides by the share of heads a candidate removes, so that share is part of the key of a
    model with grouped-query attention (`gqa`); without it, the grouped-query settings change nothing."""
    from onnxprune.pipeline.prune import head_share

    if not gqa:
        return json.dumps([list(recipe.exclude), recipe.prune_hidden, recipe.keep_kv_cache])
    share = head_share(recipe) if recipe.gqa_mode == "auto" else None
    return json.dumps([list(recipe.exclude), recipe.prune_hidden, recipe.gqa_mode, recipe.keep_kv_cache, share])


def shared_for(shared: dict[str, Shared], recipe: Recipe) -> Shared | None:
    """The shared work of `recipe` (see graph_key), or None."""
    return shared.get(graph_key(recipe)) or shared.get(graph_key(recipe, gqa=False))


def compute_shared(model: onnx.ModelProto, recipes: list[Recipe], calibration: Dataset | None) -> dict[str, Shared]:
    """Prepared models, activation statistics, scores and sensitivity curves for `recipes`, each once."""
    shared: dict[str, Shared] = {}
    for recipe in recipes:
        if recipe.mode != "structured":
            continue
        try:
            entry = shared_for(shared, recipe)
            if entry is None:
                entry = Shared(prepare_recipe(model, recipe))
                gqa = any(g.kv_groups for g in entry.prepared.analysis.groups)
                shared[graph_key(recipe, gqa)] = entry
            own = recipe.criterion in STATISTICS  # e.g. taylor's gradients, not activation statistics
            if recipe.criterion in DATA_CRITERIA and not own and entry.stats is None and calibration is not None:
                entry.stats = channel_stats(entry.prepared, calibration.feeds, source=calibration.source)
            score_key = (recipe.criterion, recipe.seed)
            if score_key not in entry.scores and own and calibration is not None:
                entry.scores[score_key] = score_groups(
                    entry.prepared.analysis, entry.prepared.view, recipe.criterion, recipe.seed,
                    stats=criterion_stats(recipe.criterion, entry.prepared, calibration.feeds,
                                          labels=calibration.labels))
            if score_key not in entry.scores and not own and (recipe.criterion not in DATA_CRITERIA
                                                                or entry.stats is not None):
                entry.scores[score_key] = score_groups(entry.prepared.analysis, entry.prepared.view,
                                                       recipe.criterion, recipe.seed, stats=entry.stats)
            if (recipe.allocate == "sensitivity" and recipe.target is not None and calibration is not None
                    and score_key in entry.scores and score_key not in entry.sensitivity):
                entry.sensitivity[score_key] = sensitivity_curves(entry.prepared, calibration,
                                                                  entry.scores[score_key])
        except OnnxPruneError:
            continue  # the candidate meets the same error when it runs, and reports it
    return shared


def execute(context: SweepContext, recipe: Recipe | None) -> tuple[dict, bytes | None]:
    """Prune by `recipe` (None: the original model, the baseline) and measure it: (record, model bytes).

    The record: {"status": "ok" | "failed", "error", "metrics": {"metric", "value", "macs", "params",
    "bytes", "latency_ms"}, "stats", "notes", "seconds", "worker"}. Never raises for a candidate's fault.
    """
    from onnxprune import __version__

    start = time.perf_counter()
    worker = {"host": socket.gethostname(), "pid": os.getpid(), "onnxprune": __version__}
    try:
        metrics, stats, notes, data = _run(context, recipe)
        record = {"status": "ok", "error": None, "metrics": metrics, "stats": stats, "notes": notes}
    except MemoryError:
        record, data = _failed("out of memory"), None
    except OnnxPruneError as exc:
        record, data = _failed(str(exc)), None
    except Exception as exc:  # noqa: BLE001 - one candidate's internal error must not stop the sweep
        record, data = _failed(f"internal error ({type(exc).__name__}: {_one_line(exc)})"), None
    record["seconds"] = time.perf_counter() - start
    worker["ended"] = time.time()  # wall clock, to tell runs in one reused worker process apart
    record["worker"] = worker
    return record, data


def _failed(error: str) -> dict:
    return {"status": "failed", "error": _one_line(error), "metrics": None, "stats": None, "notes": []}


def _one_line(exc) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 500 else text[:497] + "..."


def _run(context: SweepContext, recipe: Recipe | None) -> tuple[dict, dict, list[str], bytes | None]:
    original = context.original()
    if recipe is None:
        model, data = original, None
        stats = {"macs_after": count_macs(original), "params_after": count_params(original),
                 "bytes_after": model_bytes(original)}
        notes: list[str] = []
    else:
        shared = shared_for(context.shared, recipe) if recipe.mode == "structured" else None
        score_key = (recipe.criterion, recipe.seed)
        reuse = Reuse(shared.prepared, shared.stats, shared.scores.get(score_key),
                      shared.sensitivity.get(score_key)) if shared else Reuse()
        result = prune_model(original, recipe, RunSettings(calibration=context.calibration, reuse=reuse))
        model, stats, notes = result.model, result.stats, result.notes
        data = model.SerializeToString()
    m = context.measure
    session = open_session(data if data is not None else context.model, m.provider, m.threads)
    evaluation = context.evaluation
    outputs = run_batches(session, evaluation, reduce=metric_digest(evaluation))
    reference = context.reference_outputs if context.reference_outputs is not None else outputs
    metric, value = quality_metric(outputs, reference, evaluation.labels, evaluation.feeds)
    latency = None
    if m.latency:
        rows = measure_latency(session, evaluation, warmup=m.warmup, runs=m.runs,
                               batch_sizes=[m.latency_batch] if m.latency_batch else None)["results"]
        latency = rows[0]["p50_ms"]
    metrics = {"metric": metric, "value": value, "macs": int(stats["macs_after"]),
               "params": int(stats["params_after"]), "bytes": int(stats["bytes_after"]), "latency_ms": latency}
    return metrics, _plain(stats), list(notes), data


def _plain(stats: dict) -> dict:
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in stats.items()}


# ---- keys: a candidate's result is reused only for the same model, data, measurement and recipe ------------

def dataset_hash(dataset: Dataset | None) -> str | None:
    if dataset is None:
        return None
    h = hashlib.sha256()
    for feed in dataset.feeds:
        for name in sorted(feed):
            array = np.ascontiguousarray(feed[name])
            h.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
            h.update(array.tobytes())
    if dataset.labels is not None:
        h.update(np.ascontiguousarray(dataset.labels).tobytes())
    return h.hexdigest()


def fingerprint(model: bytes, calibration: Dataset | None, evaluation: Dataset, measure: Measure) -> dict:
    """What every candidate's result depends on besides its recipe."""
    return {"model": hashlib.sha256(model).hexdigest(), "calibration": dataset_hash(calibration),
            "evaluation": dataset_hash(evaluation), "measure": measure.to_dict()}


def candidate_id(fingerprint_: dict, recipe: Recipe) -> str:
    text = json.dumps(fingerprint_, sort_keys=True) + recipe.key()
    return hashlib.sha256(text.encode()).hexdigest()[:16]
