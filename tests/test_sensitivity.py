"""`onnxprune sensitivity`: one row per prunable group, drops per ratio, a PNG plot."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from onnxprune.commands.sensitivity import sensitivity_command
from onnxprune.evaluate.data import from_arrays, load_data
from onnxprune.io.model_io import load_model
from onnxprune.pipeline.prepare import prepare
from onnxprune.pipeline.score import score_groups
from onnxprune.pipeline.sensitivity import sensitivity



@pytest.fixture(scope="module")
def cnn_prepared(digits):
    model = digits.cnn()
    return model, prepare(model)


def test_one_row_per_prunable_group(cnn_prepared, digits):
    model, prep = cnn_prepared
    data = load_data(digits.calib_path, model, batch_size=300)
    result = sensitivity(prep, data, score_groups(prep.analysis, prep.view, "l1"), (0.25, 0.75))
    assert result.metric == "accuracy"
    assert [r["group"] for r in result.rows] == [g.id for g in prep.analysis.prunable]
    assert all(len(r["drops"]) == 2 for r in result.rows)
    # removing three quarters of a group costs more than a quarter, somewhere
    assert any(r["drops"][1] > r["drops"][0] + 1 for r in result.rows)
    assert all(r["macs_kept"][1] < r["macs_kept"][0] < 1 for r in result.rows)


def test_without_labels_measures_agreement(cnn_prepared, digits):
    model, prep = cnn_prepared
    x = load_data(digits.calib_path, model).feeds[0]["input"]
    data = from_arrays({"input": x})
    result = sensitivity(prep, data, score_groups(prep.analysis, prep.view, "l1"), (0.5,))
    assert result.metric == "agreement" and result.baseline == 100.0
    assert all(0 <= r["drops"][0] <= 100 for r in result.rows)


def test_command_writes_table_json_and_png(tmp_path, digits):
    model = tmp_path / "digits.onnx"
    shutil.copy(digits.cnn_path, model)
    plot, report = tmp_path / "sens.png", tmp_path / "sens.json"
    result = CliRunner().invoke(sensitivity_command, [
        str(model), "--data", str(digits.calib_path), "--ratios", "0.3,0.6",
        "--plot", str(plot), "--json", str(report)])
    assert result.exit_code == 0, result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(report.read_text())
    assert len(data["rows"]) == len(prepare(load_model(model)).analysis.prunable)
    assert data["ratios"] == [0.3, 0.6]
    assert "30%" in result.output and "60%" in result.output
    assert not list(tmp_path.glob(".sensitivity.*"))


def test_bad_ratios_are_input_errors(tmp_path, digits):
    from onnxprune.errors import InputError

    result = CliRunner().invoke(sensitivity_command, [str(digits.cnn_path), "--data",
                                                      str(digits.calib_path), "--ratios", "0.5,1.2"])
    assert isinstance(result.exception, InputError)
    assert "--ratios" in str(result.exception)
