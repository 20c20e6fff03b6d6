"""Issue 12, fault isolation: a handler that raises, or a plan that fails validation, costs only its groups.

The handlers are broken on purpose (monkeypatched to raise) and the validator is made to reject one group: the
prune completes, the groups at fault are frozen with the fault as their reason, the rest is pruned and runs;
`--strict` turns any contained fault into exit 2 with nothing written.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from onnxprune.cli import main
from onnxprune.pipeline.apply import bisect_plan
from onnxprune.errors import ValidationError
from onnxprune.graph.handlers import get_handler
from onnxprune.pipeline.prepare import prepare
from onnxprune.pipeline.prune import prune_model
from onnxprune.graph.stats import count_params
from onnxprune.runtime.session import run
from onnxprune.runtime.feeds import sample_feed
from onnxprune.recipe import Recipe
from tests.shipped_models import MODELS

RELU = "/conv3/conv3.1/Relu"  # carries group 2 (conv3's 64 channels) to the head


@pytest.fixture()
def broken_relu(monkeypatch):
    """The element-wise handler raises on one node (as a handler bug would)."""
    handler = get_handler("Relu")
    real = handler.analyze

    def analyze(node, ctx):
        if node.name == RELU:
            raise ValueError("min() arg is an empty sequence")
        return real(node, ctx)

    monkeypatch.setattr(handler, "analyze", analyze)


def _kept_channels(model):
    inits = {t.name: t for t in model.graph.initializer}
    return {n.name: inits[n.input[1]].dims[0] for n in model.graph.node if n.op_type == "Conv"}


def test_handler_fault_in_analysis_freezes_its_groups_only(broken_relu, digits):
    model = digits.cnn()
    res = prune_model(model, Recipe(ratio=0.5))
    assert len(res.faults) == 1
    fault = res.faults[0]
    assert fault["stage"] == "analyze" and fault["node"] == RELU and fault["op_type"] == "Relu"
    assert fault["reason"] == f"handler fault in Relu {RELU} (analyze): ValueError: min() arg is an empty sequence"
    rows = {r["group"]: r for r in res.group_rows()}
    assert rows[2]["fault"] and not rows[2]["prunable"] and fault["reason"] in rows[2]["reason"]
    assert [r["group"] for r in rows.values() if r["fault"]] == fault["groups"] == [2]
    # everything else still prunes, and the result runs with the original's output shapes
    assert res.stats["groups_pruned"] == 3 and rows[2]["kept"] == 64
    assert _kept_channels(res.model)["/conv3/conv3.0/Conv"] == 64
    assert _kept_channels(res.model)["/conv1/conv1.0/Conv"] == 8
    feed = sample_feed(model)
    assert [o.shape for o in run(res.model, feed)] == [o.shape for o in run(model, feed)]


def test_handler_fault_in_rewrite_freezes_the_node_groups(monkeypatch, digits):
    handler = get_handler("Gemm")  # Gemm has no rewrite of its own: give it one that raises on the head's fc1

    def rewrite(node, ctx):
        if node.name == "/head/head.1/Gemm":
            raise KeyError("boom")

    monkeypatch.setattr(handler, "rewrite", rewrite)
    model = digits.cnn()
    res = prune_model(model, Recipe(ratio=0.5))
    [fault] = res.faults
    assert fault["stage"] == "rewrite" and fault["node"] == "/head/head.1/Gemm" and "KeyError" in fault["error"]
    assert sorted(fault["groups"]) == [2, 3]  # fc1 reads conv3's channels and opens its own
    assert res.stats["groups_pruned"] == 2
    onnx.checker.check_model(res.model, full_check=True)
    run(res.model, sample_feed(model))


def test_validation_failure_of_one_group_is_bisected(monkeypatch, digits):
    """The validator rejects any model where conv2's group lost channels: bisection freezes that group only."""
    from onnxprune.pipeline import apply as validate_module  # apply.py validates each candidate plan

    real = validate_module.validate
    calls = []

    def validate(candidate, original, feed=None, stage="prune"):
        calls.append(1)
        real(candidate, original, feed, stage)
        if _kept_channels(candidate)["/conv2/conv2.0/Conv"] < 32:
            raise ValidationError("prune: output logits has shape (1, 9), expected (1, 10)")

    monkeypatch.setattr(validate_module, "validate", validate)
    model = digits.cnn()
    res = prune_model(model, Recipe(ratio=0.5))
    [fault] = res.faults
    assert fault["stage"] == "validate" and fault["groups"] == [1]
    assert fault["reason"] == "pruning it fails validation: prune: output logits has shape (1, 9), expected (1, 10)"
    kept = _kept_channels(res.model)
    assert kept["/conv2/conv2.0/Conv"] == 32 and kept["/conv1/conv1.0/Conv"] == 8 and kept["/conv3/conv3.0/Conv"] == 32
    assert res.stats["groups_pruned"] == 3
    assert len(calls) <= 6  # whole plan, empty plan, two halvings, the rest


def test_bisect_finds_every_culprit_and_pairs():
    def make(bad_sets):
        def apply(roots):
            return frozenset(roots)

        def validate(model):
            hit = [b for b in bad_sets if b <= model]
            return f"bad {sorted(hit[0])}" if hit else None
        return apply, validate

    apply, validate = make([{3}, {11}])
    model, rejected = bisect_plan(apply, validate, list(range(16)))
    assert set(rejected) == {3, 11} and model == frozenset(range(16)) - {3, 11}
    # two groups that fail only together: one of them goes, the other stays
    apply, validate = make([{2, 5}])
    model, rejected = bisect_plan(apply, validate, list(range(8)))
    assert len(rejected) == 1 and set(rejected) <= {2, 5} and len(model) == 7
    apply, validate = make([set()])
    with pytest.raises(ValidationError):
        bisect_plan(apply, validate, [0, 1])


def test_every_group_failing_validation_is_an_error(digits_file, monkeypatch, cli_error, tmp_path):
    from onnxprune.pipeline import apply as validate_module  # apply.py validates each candidate plan

    real = validate_module.validate

    def validate(candidate, original, feed=None, stage="prune"):
        real(candidate, original, feed, stage)
        if count_params(candidate) != count_params(original):
            raise ValidationError("prune: onnxruntime cannot run the rewritten model: injected")

    monkeypatch.setattr(validate_module, "validate", validate)
    out = tmp_path / "out.onnx"
    cli_error(["prune", str(digits_file), "-o", str(out), "--ratio", "0.5"], "no group can be pruned")
    assert not out.exists()


def test_cli_reports_contained_faults_and_strict_fails(digits_file, broken_relu, tmp_path, capsys, cli_error):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    assert main(["prune", str(digits_file), "-o", str(out), "--json", str(report)]) == 0
    captured = capsys.readouterr()
    assert "1 fault(s) contained" in captured.err and f"handler fault in Relu {RELU}" in captured.err
    data = json.loads(report.read_text())
    assert [f["node"] for f in data["faults"]] == [RELU]
    assert [g["group"] for g in data["groups"] if g["fault"]] == [2]
    run(onnx.load(out), sample_feed(onnx.load(digits_file)))

    strict_out = tmp_path / "strict.onnx"
    cli_error(["prune", str(digits_file), "-o", str(strict_out), "--strict"], "--strict: a fault was contained")
    assert not strict_out.exists()

    analysis = tmp_path / "analysis.json"
    assert main(["analyze", str(digits_file), "--json", str(analysis)]) == 0
    data = json.loads(analysis.read_text())
    assert data["faults"][0]["groups"] == [2] and data["groups"][2]["fault"]
    assert [g["fault"] for g in data["groups"]].count(True) == 1
    capsys.readouterr()
    cli_error(["analyze", str(digits_file), "--strict"], "handler fault in Relu")


def test_no_faults_on_the_shipped_models():
    for path in sorted(MODELS.glob("*.onnx")):
        model = onnx.load(path)
        assert not prepare(model).analysis.faults, path
        assert not prune_model(model, Recipe(ratio=0.5)).faults, path


def test_sensitivity_leaves_out_a_group_whose_rewrite_raises(digits_file, digits, monkeypatch, capsys):
    handler = get_handler("Gemm")

    def rewrite(node, ctx):
        if node.name == "/head/head.1/Gemm":
            raise KeyError("boom")

    monkeypatch.setattr(handler, "rewrite", rewrite)
    data = digits.calib_path
    assert main(["sensitivity", str(digits_file), "--data", str(data), "--ratios", "0.5", "--limit", "32"]) == 0
    err = capsys.readouterr().err
    assert "fault(s) contained" in err and "KeyError" in err
