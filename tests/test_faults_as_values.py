"""Faults are values: applying a plan returns the faults it met and leaves the prepared model as it was.

The regression behind it: a fault contained while pruning one sweep candidate was written into the shared
analysis, so the group stayed frozen for every later candidate of the sweep.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from onnxprune.evaluate.data import load_data
from onnxprune.graph.handlers import get_handler
from onnxprune.pipeline.apply import apply_validated
from onnxprune.pipeline.plan import plan_uniform
from onnxprune.pipeline.prepare import prepare
from onnxprune.pipeline.prune import Reuse, RunSettings, prune_model
from onnxprune.pipeline.score import score_groups
from onnxprune.recipe import Recipe
from onnxprune.runtime.feeds import sample_feed
from onnxprune.sweep.run import run_sweep

MODELS = Path(__file__).resolve().parents[1] / "models"
DIGITS = MODELS / "digits_cnn.onnx"
HEAD = "/head/head.1/Gemm"  # its input channels are the group of the Gemm before it


@pytest.fixture
def fails_once(monkeypatch):
    """The Gemm handler's rewrite raises the first time it meets HEAD, and works after that."""
    handler = get_handler("Gemm")
    real, calls = handler.rewrite, []

    def rewrite(node, ctx):
        if node.name == HEAD and not calls:
            calls.append(node.name)
            raise KeyError("injected once")
        return real(node, ctx)

    monkeypatch.setattr(handler, "rewrite", rewrite)
    return calls


def _group_state(prep) -> list:
    return [(g.id, list(g.reasons), g.prunable) for g in prep.analysis.groups] + [list(prep.analysis.faults)]


def test_apply_returns_faults_and_leaves_the_analysis_alone(fails_once):
    model = onnx.load(DIGITS)
    prep = prepare(model)
    before = _group_state(prep)
    scores = score_groups(prep.analysis, prep.view, "l1")
    plan = plan_uniform(prep.analysis, scores, 0.5)
    first = apply_validated(prep, plan, model, sample_feed(model))
    assert fails_once == [HEAD]
    assert len(first.faults) == 1 and "KeyError: 'injected once'" in first.faults[0].reason
    frozen = first.faults[0].groups
    assert frozen and len(first.plan.kept) == len(plan.kept) - len(frozen)
    assert _group_state(prep) == before  # nothing written into the shared analysis
    second = apply_validated(prep, plan, model, sample_feed(model))  # the handler works now
    assert not second.faults and second.plan.kept.keys() == plan.kept.keys()


def test_a_sweep_candidate_fault_does_not_freeze_the_next_candidate(fails_once, tmp_path):
    data = load_data(str(MODELS / "digits_calib.npz"), onnx.load(DIGITS), batch_size=100)
    held = load_data(str(MODELS / "digits_heldout.npz"), onnx.load(DIGITS), batch_size=150)
    recipes = [Recipe(ratio=0.5, criterion="l1", seed=0), Recipe(ratio=0.5, criterion="l1", seed=1)]
    result = run_sweep(DIGITS, recipes, tmp_path / "sweep", calibration=data, evaluation=held, jobs=1)
    first, second = result.candidates
    assert first["status"] == second["status"] == "ok"
    assert fails_once == [HEAD]  # the first candidate met the fault
    # the first candidate kept the faulted group whole; the second pruned it like an undisturbed prune does
    undisturbed = prune_model(onnx.load(DIGITS), recipes[1], RunSettings(calibration=data))
    assert not undisturbed.faults
    assert first["metrics"]["macs"] > second["metrics"]["macs"]
    assert second["metrics"]["macs"] == undisturbed.stats["macs_after"]


def test_a_reused_prepared_model_reports_only_its_own_faults(fails_once):
    model = onnx.load(DIGITS)
    run = RunSettings(reuse=Reuse(prepared=prepare(model)))
    faulted = prune_model(model, Recipe(ratio=0.5), run)
    clean = prune_model(model, Recipe(ratio=0.5), run)
    assert len(faulted.faults) == 1 and faulted.stats["faults"] == 1
    frozen = faulted.contained[0].groups
    assert clean.faults == [] and clean.stats["groups_pruned"] == faulted.stats["groups_pruned"] + len(frozen)
    assert any(r["fault"] and not r["prunable"] for r in faulted.group_rows())
    assert not any(r["fault"] for r in clean.group_rows())
    assert set(faulted.plan.kept) < set(clean.plan.kept)
