"""--mlflow on sweep, prune and eval: runs in a file store, read back with MLflow's own client."""

from __future__ import annotations

import json
import shutil

import pytest

from onnxprune.cli import main
from tests.shipped_models import DIGITS

mlflow = pytest.importorskip("mlflow", reason="tracking is tested with onnxprune[mlflow] installed (the test extras)")

CALIB, HELDOUT = DIGITS.calib_path, DIGITS.heldout_path


@pytest.fixture()
def store(tmp_path, monkeypatch):
    """A file store in a temporary folder, and a function that opens MLflow's own client on it."""
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # onnxprune opts in for file: URIs itself
    uri = f"file:{tmp_path / 'mlruns'}"

    def make_client():
        from mlflow.tracking import MlflowClient

        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses file stores without it
        return MlflowClient(tracking_uri=uri)

    return uri, make_client


def _runs(client, experiment="onnxprune"):
    found = client.get_experiment_by_name(experiment)
    assert found is not None, "no experiment was created"
    return client.search_runs([found.experiment_id], max_results=1000)


def _artifacts(client, run) -> set[str]:
    return {a.path for a in client.list_artifacts(run.info.run_id)}


def test_sweep_logs_a_parent_run_and_one_nested_run_per_candidate(tmp_path, store, digits):
    uri, make_client = store
    out = tmp_path / "out"
    # without --data the lstsq candidates fail: they are logged as failed runs with their error
    assert main(["sweep", str(digits.cnn_path), "--eval-data", str(HELDOUT), "-o", str(out),
                 "--ratio", "0.3,0.6", "--recover", "none,lstsq", "--runs", "5", "--warmup", "1",
                 "--mlflow", uri]) == 0
    sweep = json.loads((out / "sweep.json").read_text())
    client = make_client()
    runs = _runs(client)
    parents = [r for r in runs if r.data.tags.get("onnxprune.kind") == "sweep"]
    assert len(parents) == 1 and len(runs) == 1 + len(sweep["candidates"]) == 5
    parent = parents[0]
    assert _artifacts(client, parent) == {"sweep.json", "sweep.csv", "pareto.png"}
    assert parent.data.metrics["baseline_value"] == pytest.approx(sweep["baseline"]["value"])
    assert parent.data.params["candidates"] == "4"
    children = {r.data.tags["onnxprune.candidate"]: r for r in runs if r is not parent}
    assert set(children) == {c["id"] for c in sweep["candidates"]}
    for c in sweep["candidates"]:
        run = children[c["id"]]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.params["ratio"] == str(c["recipe"]["ratio"])
        assert run.data.params["recover"] == c["recipe"]["recover"]
        assert set(run.data.params) == set(c["recipe"])
        assert _artifacts(client, run) == {f"{c['id']}.json"}
        assert run.data.metrics["pareto"] == float(c["pareto"])
        if c["status"] == "ok":
            assert run.info.status == "FINISHED"
            for key in ("value", "macs", "params", "bytes", "latency_ms"):
                assert run.data.metrics[key] == pytest.approx(c["metrics"][key])
            assert run.data.metrics["drop"] == pytest.approx(sweep["baseline"]["value"] - c["metrics"]["value"])
        else:
            assert run.info.status == "FAILED" and "calibration data" in run.data.tags["onnxprune.error"]
            assert "value" not in run.data.metrics


def test_prune_and_eval_log_one_run_each(tmp_path, store, digits):
    uri, make_client = store
    model = tmp_path / "digits.onnx"
    shutil.copy(digits.cnn_path, model)
    pruned = tmp_path / "pruned.onnx"
    assert main(["prune", str(model), "--ratio", "0.4", "--data", str(CALIB), "--limit", "64", "--recover",
                 "lstsq", "-o", str(pruned), "--mlflow", uri]) == 0
    assert main(["eval", str(pruned), "--reference", str(model), "--data", str(HELDOUT), "--runs", "5",
                 "--warmup", "1", "--quiet", "--json", str(tmp_path / "e.json"), "--mlflow", uri]) == 0
    client = make_client()
    runs = {r.data.tags["onnxprune.kind"]: r for r in _runs(client)}
    assert set(runs) == {"prune", "eval"}
    prune_run, eval_run = runs["prune"], runs["eval"]
    assert prune_run.data.params["ratio"] == "0.4" and prune_run.data.params["recover"] == "lstsq"
    assert prune_run.data.params["criterion"] == "hybrid"  # the resolved recipe
    assert prune_run.data.metrics["macs_after"] < prune_run.data.metrics["macs_before"]
    assert "calibration_accuracy_after" in prune_run.data.metrics
    assert _artifacts(client, prune_run) == {"report.json"}
    report = json.loads((tmp_path / "e.json").read_text())
    assert eval_run.data.metrics["candidate_top1"] == pytest.approx(report["candidate"]["accuracy"]["top1"])
    assert eval_run.data.metrics["top1_agreement"] == pytest.approx(report["agreement"]["top1_agreement"])
    assert any(k.startswith("candidate_p50_ms_cpu") for k in eval_run.data.metrics)
    assert _artifacts(client, eval_run) == {"e.json"}


def test_without_mlflow_installed_the_option_is_an_install_hint(tmp_path, cli_error, monkeypatch, digits):
    import sys

    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    cli_error(["prune", str(digits.cnn_path), "--dry-run", "--mlflow", f"file:{tmp_path}"],
              "pip install 'onnxprune[mlflow]'")
