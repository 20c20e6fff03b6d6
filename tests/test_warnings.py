"""A warning before a data-free prune of a language model (issue 21): one line naming the risk and the remedy
(--data, --recover lstsq), printed before the prune and kept in the JSON report; never with calibration data,
never for a model that is not a language model (the digits CNN)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx

from onnxprune.cli import main
from onnxprune.pipeline.prepare import prepare
from onnxprune.pipeline.prune import prune_model
from onnxprune.pipeline.risks import data_free_warnings, language_model_signs
from onnxprune.recipe import Recipe
from onnxprune.pipeline.prune import Reuse, RunSettings

MODELS = Path(__file__).resolve().parents[1] / "models"
DECODER = MODELS / "stdlib_llama.onnx"
CNN = MODELS / "digits_cnn.onnx"


def prune_cli(capsys, tmp_path, model: Path, *args: str) -> tuple[list[str], dict]:
    """Warning lines on stderr and the JSON report of a dry-run prune."""
    report = tmp_path / "report.json"
    assert main(["prune", str(model), "--ratio", "0.2", "--dry-run", "--json", str(report), *args]) == 0
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if line.startswith("warning:")], json.loads(report.read_text())


def test_decoder_without_data_is_warned_once_with_the_remedy(capsys, tmp_path):
    lines, report = prune_cli(capsys, tmp_path, DECODER)
    assert len(lines) == 1
    line = lines[0]
    assert "language model" in line and "without calibration data" in line and "collapse" in line
    assert "--data" in line and "--recover lstsq" in line
    assert "attention heads" in line and "causal-LM output logits" in line
    assert report["warnings"] == [line.removeprefix("warning: ")]


def test_decoder_with_data_is_not_warned(capsys, tmp_path):
    lines, report = prune_cli(capsys, tmp_path, DECODER, "--data", str(MODELS / "stdlib_calib.npz"), "--limit", "1")
    assert lines == [] and report["warnings"] == []
    assert report["calibration"]["samples"] == 1 and report["criterion"] == "hybrid"


def test_digits_cnn_is_not_warned(capsys, tmp_path):
    lines, report = prune_cli(capsys, tmp_path, CNN)
    assert lines == [] and report["warnings"] == []


def test_the_library_sees_it_too():
    decoder, cnn = onnx.load(DECODER), onnx.load(CNN)
    prep = prepare(decoder)
    assert language_model_signs(decoder, prep.analysis) == ["attention heads", "causal-LM output logits"]
    # without an analysis (a sweep's driver) the decomposed attention shows no op, the logits output still does
    assert language_model_signs(decoder) == ["causal-LM output logits"]
    assert language_model_signs(cnn, prepare(cnn).analysis) == []  # its output is not over input_ids
    recipe = Recipe(ratio=0.2)
    assert len(data_free_warnings(decoder, recipe, has_data=False)) == 1
    assert data_free_warnings(decoder, recipe, has_data=True) == []
    assert data_free_warnings(decoder, Recipe(ratio=0.0), has_data=False) == []  # removes nothing
    assert data_free_warnings(decoder, Recipe(ratio=0.2, mode="unstructured"), has_data=False) == []
    result = prune_model(decoder, recipe, RunSettings(validate=False, reuse=Reuse(prepared=prep)))
    assert result.warnings == data_free_warnings(decoder, recipe, False, prep.analysis)
    assert result.warnings and "--recover lstsq" in result.warnings[0]


def test_sweep_reports_it(tmp_path, capsys):
    held = np.load(MODELS / "stdlib_heldout.npz")
    small = tmp_path / "held.npz"
    np.savez(small, **{k: v[:2] for k, v in held.items()})
    assert main(["sweep", str(DECODER), "--eval-data", str(small), "-o", str(tmp_path / "out"), "--ratio", "0.2",
                 "--no-latency"]) == 0
    out = capsys.readouterr().out
    payload = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert len(payload["warnings"]) == 1 and "--recover lstsq" in payload["warnings"][0]
    # said before the candidates ran
    assert out.index("warning: pruning a language model") < out.index("[1/1]")
