"""End-to-end `onnxprune prune` / `analyze`: outputs, options, and one-line errors with exit code 2."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxprune.cli import main
from onnxprune.runtime.feeds import sample_feed
from onnxprune.runtime.session import run

def test_prune_writes_a_smaller_model_with_the_same_interface(digits_file, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    report = tmp_path / "report.json"
    assert main(["prune", str(digits_file), "--ratio", "0.5", "-o", str(out), "--json", str(report)]) == 0
    original, pruned = onnx.load(digits_file), onnx.load(out)
    assert [i.name for i in pruned.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in pruned.graph.output] == [o.name for o in original.graph.output]
    assert pruned.opset_import == original.opset_import and pruned.ir_version == original.ir_version
    feed = sample_feed(original, batch=3)
    assert run(pruned, feed)[0].shape == run(original, feed)[0].shape == (3, 10)
    stats = json.loads(report.read_text())["stats"]
    assert stats["macs_after"] < 0.5 * stats["macs_before"]
    assert stats["params_after"] < stats["params_before"]
    assert "wrote" in capsys.readouterr().out


def test_default_output_name_and_no_silent_overwrite(digits_file, cli_error):
    assert main(["prune", str(digits_file)]) == 0
    out = digits_file.with_name("digits.pruned.onnx")
    assert out.exists()
    before = out.read_bytes()
    cli_error(["prune", str(digits_file), "--ratio", "0.3"], "output exists")
    assert out.read_bytes() == before
    assert main(["prune", str(digits_file), "--ratio", "0.3", "--overwrite"]) == 0
    assert out.read_bytes() != before


def test_refuses_to_overwrite_the_input(digits_file, cli_error):
    before = digits_file.read_bytes()
    cli_error(["prune", str(digits_file), "-o", str(digits_file)], "refusing to overwrite the input")
    assert digits_file.read_bytes() == before


def test_dry_run_writes_nothing(digits_file, tmp_path):
    out = tmp_path / "never.onnx"
    assert main(["prune", str(digits_file), "--dry-run", "-o", str(out)]) == 0
    assert not out.exists()


def test_ratio_zero_changes_no_output(digits_file, tmp_path):
    out = tmp_path / "same.onnx"
    assert main(["prune", str(digits_file), "--ratio", "0", "-o", str(out)]) == 0
    feed = sample_feed(onnx.load(digits_file), batch=4)
    np.testing.assert_array_equal(run(onnx.load(out), feed)[0], run(onnx.load(digits_file), feed)[0])


def test_round_to_global_and_exclude(digits_file, tmp_path):
    report = tmp_path / "r.json"
    assert main(["prune", str(digits_file), "--round-to", "8", "--dry-run", "--json", str(report)]) == 0
    groups = json.loads(report.read_text())["groups"]
    assert all(g["kept"] % 8 == 0 for g in groups if g["kept"] != g["channels"])
    assert main(["prune", str(digits_file), "--global", "--ratio", "0.4", "--dry-run", "--json", str(report)]) == 0
    payload = json.loads(report.read_text())
    prunable = [g for g in payload["groups"] if g["prunable"]]
    removed = sum(g["channels"] - g["kept"] for g in prunable)
    assert abs(removed - 0.4 * sum(g["channels"] for g in prunable)) <= len(prunable)
    first_conv = next(n.name for n in onnx.load(digits_file).graph.node if n.op_type == "Conv")
    assert main(["prune", str(digits_file), "--exclude", first_conv, "--dry-run", "--json", str(report)]) == 0
    excluded = [g for g in json.loads(report.read_text())["groups"] if first_conv in g["sources"]]
    assert excluded and all(g["kept"] == g["channels"] and "excluded" in g["reason"] for g in excluded)


def test_analyze_lists_groups(digits_file, tmp_path, capsys):
    report = tmp_path / "a.json"
    assert main(["analyze", str(digits_file), "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "channel groups prunable" in out
    groups = json.loads(report.read_text())["groups"]
    assert any(g["prunable"] for g in groups)
    assert any("graph output" in g["reason"] for g in groups if not g["prunable"])


@pytest.mark.parametrize("ratio", ["1.0", "-0.1", "1.5"])
def test_ratio_out_of_range(digits_file, cli_error, ratio):
    cli_error(["prune", str(digits_file), "--ratio", ratio, "--dry-run"], "--ratio must be in [0, 1)")


def test_head_ratio_errors(digits_file, cli_error):
    cli_error(["prune", str(digits_file), "--head-ratio", "1.0"], "--head-ratio must be in [0, 1)")
    cli_error(["prune", str(digits_file), "--head-ratio", "0.2", "--target-macs", "0.5"],
              "--head-ratio goes with --ratio")
    cli_error(["prune", str(digits_file), "--head-ratio", "0.2", "--mode", "unstructured"], "--head-ratio goes with")


def test_missing_corrupt_and_truncated_files(tmp_path, cli_error, digits):
    cli_error(["prune", str(tmp_path / "nope.onnx")], "not found")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\xffnot an onnx model at all" * 10)
    cli_error(["prune", str(garbage)], "garbage.onnx")
    truncated = tmp_path / "truncated.onnx"
    whole = digits.cnn_path.read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])
    cli_error(["analyze", str(truncated)], "truncated.onnx")
    assert not (tmp_path / "truncated.pruned.onnx").exists()


def _tiny(opset=17, nodes=None):
    nodes = nodes or [helper.make_node("Relu", ["x"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_control_flow_and_unsupported_opset(tmp_path, cli_error):
    then = helper.make_graph([helper.make_node("Relu", ["x"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, [1, 4])])
    cond = helper.make_node("Constant", [], ["c"], value=helper.make_tensor("v", onnx.TensorProto.BOOL, [], [True]))
    iff = helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=then, name="branch")
    path = tmp_path / "if.onnx"
    onnx.save(_tiny(nodes=[cond, iff]), path)
    cli_error(["prune", str(path)], "control flow is not supported")
    old = tmp_path / "old.onnx"
    onnx.save(_tiny(opset=5), old)
    cli_error(["prune", str(old)], "opset 5 is not supported")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception):
        main(["--debug", "prune", str(tmp_path / "missing.onnx")])


def test_every_criterion_removes_the_same_count(digits_file, tmp_path):
    kept = {}
    for crit in ("l1", "l2", "bn-scale", "random"):
        report = tmp_path / f"{crit}.json"
        assert main(["prune", str(digits_file), "--criterion", crit, "--dry-run", "--json", str(report)]) == 0
        kept[crit] = json.loads(report.read_text())["stats"]["params_after"]
    # same ratio, same counts: every criterion removes the same number of channels
    assert len(set(kept.values())) == 1


def test_default_criterion_is_data_aware_with_data(digits_file, digits, tmp_path):
    calib = digits.calib_path
    for extra, want in (([], "l1"), (["--data", str(calib), "--limit", "64"], "hybrid"),
                        (["--data", str(calib), "--limit", "64", "--criterion", "l2"], "l2")):
        report = tmp_path / "r.json"
        assert main(["prune", str(digits_file), "--ratio", "0.3", "--dry-run", "--json", str(report), *extra]) == 0
        assert json.loads(report.read_text())["criterion"] == want
