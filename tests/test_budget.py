"""MAC and parameter budgets, per-group allocation, and --max-drop on held-out data."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from onnxprune.cli import main
from onnxprune.evaluate.data import load_data
from onnxprune.evaluate.metrics import accuracy
from onnxprune.runtime.session import run_batches
from onnxprune.io.model_io import load_model
from onnxprune.pipeline.prepare import prepare
from onnxprune.pipeline.prune import prune_model
from onnxprune.graph.stats import count_macs, count_params
from onnxprune.recipe import Recipe
from onnxprune.pipeline.prune import Reuse, RunSettings



@pytest.fixture(scope="module")
def resnet(digits):
    model = digits.resnet()
    return model, prepare(model)


@pytest.mark.parametrize("allocate", ["global", "uniform"])
@pytest.mark.parametrize("target", [0.8, 0.5, 0.33])
def test_mac_target_is_met_within_two_percent(resnet, allocate, target):
    model, prep = resnet
    result = prune_model(model, Recipe(target_macs=target, allocate=allocate), RunSettings(reuse=Reuse(prepared=prep)))
    kept = count_macs(result.model) / count_macs(model)
    assert target - 0.02 <= kept <= target + 1e-9, kept


@pytest.mark.parametrize("target", [0.7, 0.4])
def test_param_target_is_met_within_two_percent(resnet, target):
    model, prep = resnet
    result = prune_model(model, Recipe(target_params=target), RunSettings(reuse=Reuse(prepared=prep)))
    kept = count_params(result.model) / count_params(model)
    assert target - 0.02 <= kept <= target + 1e-9, kept


def test_groups_get_different_ratios(resnet):
    model, prep = resnet
    result = prune_model(model, Recipe(target_macs=0.5, allocate="global"), RunSettings(reuse=Reuse(prepared=prep)))
    ratios = {r["kept"] / r["channels"] for r in result.group_rows() if r["prunable"]}
    assert len(ratios) > 1


def test_sensitivity_allocation_spares_sensitive_groups(digits):
    from onnxprune.pipeline.score import score_groups
    from onnxprune.pipeline.sensitivity import sensitivity

    model = digits.cnn()
    prep = prepare(model)
    data = load_data(digits.calib_path, model, batch_size=300)
    scores = score_groups(prep.analysis, prep.view, "l1")
    sens = sensitivity(prep, data, scores, (0.25, 0.5, 0.75))
    result = prune_model(model, Recipe(target_macs=0.6, allocate="sensitivity"), RunSettings(reuse=Reuse(prepared=prep, sensitivity=sens)))
    kept = count_macs(result.model) / count_macs(model)
    assert 0.58 <= kept <= 0.6
    drop_at_half = {row["root"]: row["drops"][1] for row in sens.rows}
    frac = {root: len(k) / result.plan.sizes[root] for root, k in result.plan.kept.items()}
    most, least = max(drop_at_half, key=drop_at_half.get), min(drop_at_half, key=drop_at_half.get)
    assert frac.get(most, 1.0) > frac.get(least, 1.0)


def test_max_drop_respects_its_budget_on_held_out_data(tmp_path, digits):
    model = tmp_path / "digits.onnx"
    shutil.copy(digits.cnn_path, model)
    out, report = tmp_path / "small.onnx", tmp_path / "report.json"
    assert main(["prune", str(model), "-o", str(out), "--data", str(digits.calib_path),
                 "--eval-data", str(digits.heldout_path), "--max-drop", "1", "--recover", "lstsq",
                 "--json", str(report)]) == 0
    held = load_data(digits.heldout_path, load_model(model), batch_size=450)
    before = 100 * accuracy(run_batches(load_model(model), held), held.labels, (1,))["top1"]
    after = 100 * accuracy(run_batches(load_model(out), held), held.labels, (1,))["top1"]
    assert before - after <= 1.0
    data = json.loads(report.read_text())
    assert data["stats"]["macs_after"] < 0.7 * data["stats"]["macs_before"]
    assert any(not step["ok"] for step in data["search"])  # the search went past the budget at least once
    assert data["quality"]["evaluation"]["source"].endswith("digits_heldout.npz")
    assert data["quality"]["calibration"]["source"].endswith("digits_calib.npz")


@pytest.mark.parametrize("argv, needle", [
    (["--target-macs", "1.5"], "--target-macs"),
    (["--target-macs", "0.5", "--target-params", "0.5"], "give one of"),
    (["--recover", "lstsq"], "--data"),
    (["--criterion", "activation"], "--data"),
    (["--ratio", "0.3", "--target-macs", "0.5"], "give one of"),
])
def test_bad_budget_options_are_one_line_errors(cli_error, argv, needle, digits):
    cli_error(["prune", str(digits.cnn_path), "--dry-run", *argv], needle)


def test_budget_cost_model_matches_the_rewritten_model(resnet):
    from onnxprune.pipeline.budget import CostModel
    from onnxprune.pipeline.plan import plan_uniform
    from onnxprune.pipeline.rewrite import apply_plan

    model, prep = resnet
    rng = np.random.default_rng(0)
    plan = plan_uniform(prep.analysis, {g.spaces[0]: rng.random(g.size) for g in prep.analysis.prunable}, 0.4)
    pruned = apply_plan(prep.model, prep.view, prep.analysis, plan)
    cost = CostModel(prep)
    assert cost.cost(plan, "macs") == pytest.approx(count_macs(pruned) / count_macs(model), rel=1e-9)
    # the normalised model holds Constant nodes as initializers, as the rewritten one does
    assert cost.cost(plan, "params") == pytest.approx(count_params(pruned) / count_params(prep.model), rel=1e-9)
