"""MLflow tracking for sweep, prune and eval (`--mlflow URI`; the optional extra onnxprune[mlflow]).

A sweep is one parent run (params: the model, the data, how many candidates; metrics: the baseline's;
artifacts: sweep.json, sweep.csv, pareto.png) with one nested run per candidate (params: its recipe;
metrics: its metrics, drop and Pareto flag; artifact: its JSON record). `prune` and `eval` log one run each
with their report as the artifact. Logging happens on the driver after the work, so Ray workers never need
to reach the tracking server.

URIs: a tracking server (http://HOST:PORT), a database (sqlite:///mlflow.db) or a file store
(file:./mlruns). MLflow 3 keeps the file store in maintenance mode and refuses it unless
MLFLOW_ALLOW_FILE_STORE is set; a file: URI given here sets it, since asking for one is that opt-in.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from onnxprune.errors import InputError, MissingDependency, first_line
from onnxprune.report import to_jsonable
from onnxprune.sweep.pareto import drop

MAX_PARAM = 500  # MLflow caps param values (6000 characters in recent versions, 500 in old ones)


def require_mlflow():
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise MissingDependency("--mlflow needs MLflow: pip install 'onnxprune[mlflow]'") from None
    return MlflowClient


def client(uri: str):
    MlflowClient = require_mlflow()
    if uri.startswith("file:") or "://" not in uri:  # a file store: file:./mlruns or a plain folder
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        return MlflowClient(tracking_uri=uri)
    except Exception as exc:  # noqa: BLE001 - MlflowException and friends: the user needs one line
        raise InputError(f"--mlflow {uri}: {first_line(exc)}") from None


def _experiment_id(mlflow_client, name: str) -> str:
    found = mlflow_client.get_experiment_by_name(name)
    return found.experiment_id if found is not None else mlflow_client.create_experiment(name)


def _params(values: dict[str, Any]) -> list:
    from mlflow.entities import Param

    out = []
    for key, value in values.items():
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        text = "None" if value is None else str(value)
        out.append(Param(key, text[:MAX_PARAM]))
    return out


def _metrics(values: dict[str, Any]) -> list:
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    return [Metric(key, float(value), stamp, 0) for key, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)]


def _run(mlflow_client, experiment_id: str, name: str, params: dict, metrics: dict, artifacts: Iterable[Path],
         tags: dict[str, str] | None = None, status: str = "FINISHED") -> str:
    run = mlflow_client.create_run(experiment_id, run_name=name, tags=tags or {})
    run_id = run.info.run_id
    mlflow_client.log_batch(run_id, metrics=_metrics(metrics), params=_params(params))
    for path in artifacts:
        if path is not None and Path(path).exists():
            mlflow_client.log_artifact(run_id, str(path))
    mlflow_client.set_terminated(run_id, status)
    return run_id


def _guarded(fn):
    def wrapper(uri: str, *args, **kwargs):
        try:
            return fn(uri, *args, **kwargs)
        except (InputError, MissingDependency):
            raise
        except Exception as exc:  # noqa: BLE001 - a tracking failure is reported on one line
            raise InputError(f"logging to MLflow at {uri} failed: {first_line(exc)}") from None
    wrapper.__doc__ = fn.__doc__
    wrapper.__name__ = fn.__name__
    return wrapper


@_guarded
def log_sweep(uri: str, result, outdir: Path, experiment: str = "onnxprune") -> str:
    """One parent run for the sweep and one nested run per candidate; returns the parent's run id."""
    mlflow_client = client(uri)
    experiment_id = _experiment_id(mlflow_client, experiment)
    payload = result.payload
    parent = mlflow_client.create_run(experiment_id, run_name=f"sweep {Path(payload['model']).name}",
                                      tags={"onnxprune.kind": "sweep"})
    parent_id = parent.info.run_id
    mlflow_client.log_batch(parent_id, params=_params({
        "model": payload["model"], "candidates": len(result.candidates), "executor": payload["executor"],
        "evaluation": payload["evaluation"]["source"],
        "calibration": (payload["calibration"] or {}).get("source"), "max_drop": payload["max_drop"],
        "selected": result.selected}), metrics=_metrics({f"baseline_{k}": v for k, v in result.baseline.items()}))
    for name in ("sweep.json", "sweep.csv", "pareto.png"):
        if (outdir / name).exists():
            mlflow_client.log_artifact(parent_id, str(outdir / name))
    for c in result.candidates:
        metrics = dict(c["metrics"] or {})
        if c["status"] == "ok":
            metrics["drop"] = drop(result.baseline, c["metrics"])
        metrics["pareto"] = 1.0 if c["pareto"] else 0.0
        _run(mlflow_client, experiment_id, result.labels[c["id"]], c["recipe"], metrics,
             [outdir / "candidates" / f"{c['id']}.json"],
             tags={"mlflow.parentRunId": parent_id, "onnxprune.kind": "candidate", "onnxprune.candidate": c["id"],
                   "onnxprune.status": c["status"], **({"onnxprune.error": c["error"][:MAX_PARAM]} if c["error"]
                                                      else {})},
             status="FINISHED" if c["status"] == "ok" else "FAILED")
    mlflow_client.set_terminated(parent_id, "FINISHED")
    return parent_id


@_guarded
def log_prune(uri: str, report: dict, json_path: str | None, experiment: str = "onnxprune") -> str:
    """One run for a prune: params = the recipe (and the model and data), metrics = the stats and quality,
    artifact = the JSON report."""
    mlflow_client = client(uri)
    metrics = {k: v for k, v in (report.get("stats") or {}).items() if isinstance(v, (int, float))}
    for role, row in (report.get("quality") or {}).items():
        metrics[f"{role}_{row['metric']}_before"] = row["before"]
        metrics[f"{role}_{row['metric']}_after"] = row["after"]
    params = {**report["recipe"], "model": report["model"], "output": report.get("output"),
              "calibration": (report.get("calibration") or {}).get("source")}
    with _report_file(report, json_path) as path:
        return _run(mlflow_client, _experiment_id(mlflow_client, experiment), f"prune {Path(report['model']).name}",
                    params, metrics, [path], tags={"onnxprune.kind": "prune"})


@_guarded
def log_eval(uri: str, result: dict, json_path: str | None, experiment: str = "onnxprune") -> str:
    """One run for an eval: params = the models, data and providers, metrics = accuracy, agreement and p50
    latency per provider and batch size, artifact = the JSON report."""
    mlflow_client = client(uri)
    cand, ref = result["candidate"], result.get("reference") or {}
    metrics: dict[str, Any] = {}
    for role, entry in (("candidate", cand), ("reference", ref)):
        for key, value in (entry.get("accuracy") or {}).items():
            if key.startswith("top"):
                metrics[f"{role}_{key}"] = value
        for row in entry.get("latency", []):
            provider = row["provider"].replace("ExecutionProvider", "").lower()
            metrics[f"{role}_p50_ms_{provider}_b{row['batch_size']}"] = row["p50_ms"]
    agreement = (result.get("agreement") or {}).get("top1_agreement")
    if agreement is not None:
        metrics["top1_agreement"] = agreement
    params = {"model": cand["model"], "reference": ref.get("model"), "data": result["data"]["source"],
              "samples": result["data"]["samples"], "providers": result["providers"]}
    with _report_file(result, json_path) as path:
        return _run(mlflow_client, _experiment_id(mlflow_client, experiment), f"eval {Path(cand['model']).name}",
                    params, metrics, [path], tags={"onnxprune.kind": "eval"})


class _report_file:
    """The report's JSON file: `json_path` when it was written, else a temporary report.json."""

    def __init__(self, report: dict, json_path: str | None):
        self.report, self.json_path, self.tmp = report, json_path, None

    def __enter__(self) -> Path:
        if self.json_path:
            return Path(self.json_path)
        self.tmp = tempfile.TemporaryDirectory(prefix="onnxprune-mlflow-")
        path = Path(self.tmp.name) / "report.json"
        path.write_text(json.dumps(to_jsonable(self.report), indent=2) + "\n")
        return path

    def __exit__(self, *exc) -> None:
        if self.tmp is not None:
            self.tmp.cleanup()
