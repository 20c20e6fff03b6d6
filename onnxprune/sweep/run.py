"""The sweep driver: candidates in, results, Pareto front, choice and files out.

OUTDIR holds everything a rerun needs to skip work already done:

    candidates/ID.json   one candidate's result (its recipe, status, error, metrics, stats, notes), written
                         as it arrives; ID hashes the recipe with the model, the data and how it is measured
    models/ID.onnx       the models of Pareto members (all candidates' with keep_models)
    selected.onnx        with max_drop: the smallest candidate within the drop
    sweep.json, sweep.csv, pareto.png

A rerun skips candidates whose ok result is in candidates/ (failed ones run again).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from onnxprune.errors import InputError
from onnxprune.evaluate.data import Dataset
from onnxprune.io.model_io import load_model
from onnxprune.io.weights import is_lazy, nbytes
from onnxprune.pipeline.risks import data_free_warnings
from onnxprune.recipe import Recipe
from onnxprune.report import environment, write_json
from onnxprune.evaluate.metrics import lm_digest
from onnxprune.runtime.session import run_batches
from onnxprune.sweep import output
from onnxprune.sweep.candidate import (
    Measure,
    SweepContext,
    candidate_id,
    compute_shared,
    execute,
    fingerprint,
)
from onnxprune.sweep.executors import run_local, run_ray
from onnxprune.sweep.grid import varying_fields
from onnxprune.sweep.pareto import (
    LATENCY_TIE,
    drop,
    front_costs,
    pareto_flags,
    select_within,
)


@dataclass
class SweepResult:
    baseline: dict                       # the original's metrics
    candidates: list[dict]               # one entry per recipe, in order (the JSON's "candidates")
    labels: dict[str, str]               # id -> short recipe text
    selected: str | None = None          # id chosen by max_drop
    resumed: set[str] = field(default_factory=set)  # ids whose results came from an earlier run
    ran: int = 0                         # candidates run now (the rest were resumed)
    notes: list[str] = field(default_factory=list)
    payload: dict = field(default_factory=dict)  # what sweep.json holds
    warnings: list[str] = field(default_factory=list)  # known risks of its prunes (onnxprune.pipeline.risks)


SWEEP_LIMIT = 2**31 - 256 * 2**20  # serialised candidates must stay under protobuf's 2 GB


def run_sweep(model_path: str | os.PathLike, recipes: list[Recipe], outdir: str | os.PathLike, *,
              calibration: Dataset | None, evaluation: Dataset, measure: Measure | None = None,
              executor: str = "local", jobs: int = 1, address: str | None = None, retries: int = 2,
              max_drop: float | None = None, keep_models: bool = False, skipped: list[str] | None = None,
              report: Callable[[str], None] = lambda line: None) -> SweepResult:
    """Run every recipe not already done in `outdir`, then write sweep.json, sweep.csv and pareto.png."""
    from onnxprune import __version__
    measure = measure or Measure()
    if not recipes:
        raise InputError("the sweep has no candidates (every combination was skipped)" if skipped
                         else "the sweep has no candidates")
    outdir = Path(outdir)
    for folder in (outdir, outdir / "candidates", outdir / "models"):
        folder.mkdir(parents=True, exist_ok=True)
    original = load_model(model_path)
    # said before the candidates run (the graph's own signs: candidates are analysed in the workers)
    warnings = sorted({w for r in recipes for w in data_free_warnings(original, r, calibration is not None)})
    for warning in warnings:
        report(f"warning: {warning}")
    if is_lazy(original):
        # candidates travel as serialised models (to worker processes and Ray nodes): read the weights in
        if sum(nbytes(t) for t in original.graph.initializer) > SWEEP_LIMIT:
            raise InputError(f"{model_path} has more than 2 GB of weights: sweep holds candidates in memory and "
                             "cannot take it yet; prune it with `onnxprune prune` (recipes replay there)")
        original = load_model(model_path, lazy=False)
    model_data = original.SerializeToString()
    print_ = fingerprint(model_data, calibration, evaluation, measure)
    ids = [candidate_id(print_, r) for r in recipes]
    labels = {i: r.describe(varying_fields(recipes)) for i, r in zip(ids, recipes)}
    records: dict[str, dict] = {}
    for i in ids:
        path = outdir / "candidates" / f"{i}.json"
        if path.exists():
            try:
                record = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue  # a damaged record is run again
            if record.get("status") == "ok" and record.get("fingerprint") == print_:
                records[i] = {**record, "resumed": True}
    pending = [(i, r) for i, r in zip(ids, recipes) if i not in records]
    result = SweepResult({}, [], labels, ran=len(pending), warnings=warnings)
    if records:
        report(f"resuming: {len(records)} of {len(recipes)} candidates already done in {outdir}")

    reference = None if evaluation.labels is not None else run_batches(original, evaluation,
                                                                                  reduce=lm_digest)
    context = SweepContext(model_data, calibration, evaluation, reference, measure,
                           compute_shared(original, [r for _, r in pending], calibration))
    baseline: dict = {}
    count = [0]

    def done(key: str, record: dict, data: bytes | None) -> None:
        if key == "baseline":
            baseline.update(record)
            m = record["metrics"]
            report(f"original: {m['metric']} {m['value']:.2f}, MACs {m['macs']:,}" if record["status"] == "ok"
                   else f"original: failed: {record['error']}")
            return
        recipe = recipes[ids.index(key)]
        record = {"id": key, "recipe": recipe.to_dict(), **record, "fingerprint": print_}
        if data is not None:
            _write_bytes(outdir / "models" / f"{key}.onnx", data)
        write_json(outdir / "candidates" / f"{key}.json", record)
        records[key] = record
        count[0] += 1
        report(f"[{count[0]}/{len(pending)}] {labels[key]}: " + (
            f"{record['metrics']['metric']} {record['metrics']['value']:.2f}, MACs {record['metrics']['macs']:,} "
            f"({record['seconds']:.1f} s)" if record["status"] == "ok" else f"failed: {record['error']}"))

    tasks = [("baseline", None), *pending]
    if executor == "ray":
        run_ray(context, tasks, done, address or "", retries)
    elif executor == "local":
        run_local(context, tasks, done, jobs, retries)
    else:
        raise InputError(f"unknown --executor {executor!r} (choose from local, ray)")
    if baseline.get("status") != "ok":
        raise InputError(f"the original model could not be measured: {baseline.get('error')}")
    base = baseline["metrics"]
    versions = {r["worker"]["onnxprune"] for r in records.values() if r.get("worker")}
    if versions - {__version__}:
        result.notes.append(f"workers ran onnxprune {', '.join(sorted(versions))}; this driver runs {__version__}")
    if jobs > 1 or executor == "ray":
        result.notes.append("latencies were measured while several candidates ran at once: rerun the front with "
                            "--jobs 1 for figures to compare")

    entries = [records[i] for i in ids]
    flags = pareto_flags([e["metrics"] if e["status"] == "ok" else None for e in entries])
    chosen = None
    if max_drop is not None:
        index = select_within(base, [e["metrics"] if e["status"] == "ok" else None for e in entries], max_drop)
        chosen = ids[index] if index is not None else None
    keep = {i for i, f in zip(ids, flags) if f} | ({chosen} if chosen else set())
    candidates = []
    for i, entry, flag in zip(ids, entries, flags):
        candidates.append({"id": i, "recipe": entry["recipe"], "status": entry["status"], "error": entry["error"],
                           "metrics": entry["metrics"], "pareto": flag})
    _keep_models(outdir, context, recipes, ids, keep, keep_models, report)
    if chosen:
        _copy(outdir / "models" / f"{chosen}.onnx", outdir / "selected.onnx")
        result.notes.append(f"--max-drop {max_drop:g}: {labels[chosen]} ({base['metric']} "
                            f"{records[chosen]['metrics']['value']:.2f}, drop "
                            f"{drop(base, records[chosen]['metrics']):.2f}) written to {outdir / 'selected.onnx'}")
    elif max_drop is not None:
        result.notes.append(f"no candidate stays within --max-drop {max_drop:g} points of the baseline")
    result.baseline, result.candidates, result.selected = base, candidates, chosen
    result.resumed = {i for i in ids if records[i].get("resumed")}
    result.payload = {
        "model": str(model_path), "baseline": base, "candidates": candidates, "selected": chosen,
        "max_drop": max_drop, "skipped": skipped or [],
        "front": {"objectives": [base["metric"], *front_costs([e["metrics"] for e in entries
                                                               if e["status"] == "ok"])],
                  "latency_tie": LATENCY_TIE},
        "calibration": None if calibration is None else {"source": calibration.source, "samples": len(calibration)},
        "evaluation": {"source": evaluation.source, "samples": len(evaluation)},
        "measure": measure.to_dict(), "executor": executor, "notes": result.notes, "warnings": warnings,
        **environment(),
    }
    write_json(outdir / "sweep.json", result.payload)
    with_status = [{**c, "selected": c["id"] == chosen, "resumed": c["id"] in result.resumed} for c in candidates]
    output.write_csv(outdir / "sweep.csv", {"metrics": base}, with_status, labels)
    if output.plot_pareto(outdir / "pareto.png", {"metrics": base}, with_status, labels) is None:
        result.notes.append("no pareto.png: matplotlib is missing (pip install 'onnxprune[plot]')")
    return result


def _keep_models(outdir: Path, context: SweepContext, recipes, ids, keep: set[str], keep_all: bool, report) -> None:
    """Models of `keep` stay in models/ (rebuilt here when an earlier run removed one); others are removed."""
    for i, recipe in zip(ids, recipes):
        path = outdir / "models" / f"{i}.onnx"
        if i in keep and not path.exists():
            report(f"rebuilding the model of {i} (a Pareto member now; an earlier run had removed it)")
            context.shared = compute_shared(context.original(), [recipe], context.calibration)
            _, data = execute(context, recipe)
            if data is not None:
                _write_bytes(path, data)
        elif i not in keep and not keep_all and path.exists():
            path.unlink()


def _write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        output.readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _copy(src: Path, dst: Path) -> None:
    _write_bytes(dst, src.read_bytes())
