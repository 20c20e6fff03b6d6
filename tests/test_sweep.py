"""`onnxprune sweep` on the shipped digits model: table, JSON, CSV, plot, Pareto front, --max-drop, resume."""

from __future__ import annotations

import csv
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from onnxprune.cli import main
from onnxprune.recipe import Recipe
from tests.shipped_models import DIGITS

CALIB, HELDOUT = DIGITS.calib_path, DIGITS.heldout_path
FAST = ["--runs", "20", "--warmup", "2"]
GRID = ["--ratio", "0.25,0.5,0.75", "--criterion", "l1,hybrid", "--recover", "none,lstsq"]


def sweep_args(model, outdir, *extra) -> list[str]:
    return ["sweep", str(model), "--data", str(CALIB), "--limit", "100", "--eval-data", str(HELDOUT),
            "-o", str(outdir), *FAST, *map(str, extra)]


@pytest.fixture(scope="module")
def swept(tmp_path_factory, digits):
    """One sweep of 12 candidates (3 ratios x 2 criteria x 2 recoveries) with --max-drop 1."""
    tmp = tmp_path_factory.mktemp("sweep")
    model = tmp / "digits.onnx"
    shutil.copy(digits.cnn_path, model)
    out = tmp / "out"
    buffer = io.StringIO()  # capsys is per test; the command's rich console writes to sys.stdout
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "stdout", buffer)
        code = main(sweep_args(model, out, *GRID, "--max-drop", "1", "--json", tmp / "s.json",
                               "--csv", tmp / "s.csv"))
    return {"code": code, "out": out, "model": model, "tmp": tmp, "stdout": buffer.getvalue(),
            "json": json.loads((tmp / "s.json").read_text())}


def independent_accuracy(path: Path) -> float:
    data = np.load(HELDOUT)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return 100.0 * float((session.run(None, {"input": data["input"]})[0].argmax(axis=1) == data["labels"]).mean())


def test_json_has_the_issue_schema(swept, digits):
    assert swept["code"] == 0
    data = swept["json"]
    assert json.loads((swept["out"] / "sweep.json").read_text())["candidates"] == data["candidates"]
    metric_keys = {"metric", "value", "macs", "params", "bytes", "latency_ms"}
    assert set(data["baseline"]) == metric_keys
    assert data["baseline"]["value"] == pytest.approx(independent_accuracy(digits.cnn_path))
    candidates = data["candidates"]
    assert len(candidates) == 12
    for c in candidates:
        assert set(c) == {"id", "recipe", "status", "error", "metrics", "pareto"}
        assert c["status"] == "ok" and c["error"] is None and set(c["metrics"]) == metric_keys
        assert c["metrics"]["metric"] == "accuracy" and c["metrics"]["latency_ms"] > 0
        assert c["metrics"]["macs"] < data["baseline"]["macs"] and c["metrics"]["bytes"] < data["baseline"]["bytes"]
        Recipe.from_dict(c["recipe"])  # every embedded recipe is a valid recipe
    assert len({json.dumps(c["recipe"], sort_keys=True) for c in candidates}) == 12
    assert {(c["recipe"]["ratio"], c["recipe"]["criterion"], c["recipe"]["recover"]) for c in candidates} == {
        (r, k, v) for r in (0.25, 0.5, 0.75) for k in ("l1", "hybrid") for v in ("none", "lstsq")}
    # recovery is what keeps accuracy at high ratios (the README's claim, measured here by the sweep)
    at = {(c["recipe"]["ratio"], c["recipe"]["criterion"], c["recipe"]["recover"]): c["metrics"]["value"]
          for c in candidates}
    assert at[(0.5, "l1", "lstsq")] > at[(0.5, "l1", "none")] + 20


def dominated(a: dict, b: dict) -> bool:
    """Whether b dominates a: accuracy at least as high, MACs, bytes and latency at most (latencies within 5%
    are a tie), one of them strictly."""
    better_or_equal = (b["value"] >= a["value"] and b["macs"] <= a["macs"] and b["bytes"] <= a["bytes"]
                       and b["latency_ms"] <= 1.05 * a["latency_ms"])
    strictly = (b["value"] > a["value"] or b["macs"] < a["macs"] or b["bytes"] < a["bytes"]
                or 1.05 * b["latency_ms"] < a["latency_ms"])
    return better_or_equal and strictly


def test_pareto_flags_match_a_direct_dominance_check(swept):
    candidates = swept["json"]["candidates"]
    for c in candidates:
        expected = not any(dominated(c["metrics"], o["metrics"]) for o in candidates if o is not c)
        assert c["pareto"] == expected, c
    members = {c["id"] for c in candidates if c["pareto"]}
    assert 0 < len(members) < len(candidates)
    # Pareto members' models are in OUTDIR (with the --max-drop choice), the others were removed
    kept = {p.stem for p in (swept["out"] / "models").glob("*.onnx")}
    assert kept == members | {swept["json"]["selected"]}
    for i in members:
        assert independent_accuracy(swept["out"] / "models" / f"{i}.onnx") == pytest.approx(
            next(c["metrics"]["value"] for c in candidates if c["id"] == i))


def test_max_drop_picks_the_smallest_candidate_within_the_drop(swept, tmp_path):
    data = swept["json"]
    base = data["baseline"]["value"]
    within = [c for c in data["candidates"] if base - c["metrics"]["value"] <= 1.0]
    assert within and len(within) < len(data["candidates"])
    # fewest MACs, then fewest bytes, then the higher accuracy (l1 and hybrid tie on size at one ratio)
    smallest = min(within, key=lambda c: (c["metrics"]["macs"], c["metrics"]["bytes"], -c["metrics"]["value"]))
    assert data["selected"] == smallest["id"]
    selected = swept["out"] / "selected.onnx"
    assert selected.read_bytes() == (swept["out"] / "models" / f"{smallest['id']}.onnx").read_bytes()
    assert base - independent_accuracy(selected) <= 1.0
    # the candidate's record is a recipe file: prune replays it to the same bytes
    replay = tmp_path / "replay.onnx"
    assert main(["prune", str(swept["model"]), "--recipe", str(swept["out"] / "candidates" / f"{smallest['id']}.json"),
                 "--data", str(CALIB), "--limit", "100", "-o", str(replay)]) == 0
    assert replay.read_bytes() == selected.read_bytes()


def test_table_csv_and_png(swept):
    from PIL import Image

    data = swept["json"]
    text = swept["stdout"]
    table = text[text.index("sweep: 12 candidates"):]
    rows = [line for line in table.splitlines() if line.startswith("│")]
    assert "original" in rows[0] and len(rows) == 13  # baseline first, one row per candidate
    marked = [row for row in rows[1:] if row.split("│")[2].strip().startswith("*")]
    assert len(marked) == sum(c["pareto"] for c in data["candidates"])
    assert sum(">" in row.split("│")[2] for row in rows[1:]) == 1
    with open(swept["tmp"] / "s.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert (swept["out"] / "sweep.csv").read_text() == (swept["tmp"] / "s.csv").read_text()
    assert lines[0]["id"] == "baseline" and float(lines[0]["value"]) == pytest.approx(data["baseline"]["value"])
    assert [row["id"] for row in lines[1:]] == [c["id"] for c in data["candidates"]]
    for row, c in zip(lines[1:], data["candidates"]):
        assert int(row["macs"]) == c["metrics"]["macs"] and float(row["value"]) == pytest.approx(c["metrics"]["value"])
        assert row["pareto"] == str(c["pareto"]) and row["criterion"] == c["recipe"]["criterion"]
    with Image.open(swept["out"] / "pareto.png") as image:
        image.load()  # decodes the whole file
        assert image.format == "PNG" and image.width > 800 and image.height > 300
        pixels = np.asarray(image.convert("RGB"))
    red = (pixels[..., 0] > 180) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
    assert red.sum() > 50  # the front is drawn highlighted


def test_resume_skips_candidates_already_done(swept, capsys):
    out = swept["out"]
    before = {p.name: p.stat().st_mtime_ns for p in (out / "candidates").glob("*.json")}
    assert main(sweep_args(swept["model"], out, *GRID, "--max-drop", "1")) == 0
    text = capsys.readouterr().out
    assert "resuming: 12 of 12 candidates already done" in text and "[1/" not in text
    assert {p.name: p.stat().st_mtime_ns for p in (out / "candidates").glob("*.json")} == before
    again = json.loads((out / "sweep.json").read_text())
    assert [(c["id"], c["metrics"]) for c in again["candidates"]] == [
        (c["id"], c["metrics"]) for c in swept["json"]["candidates"]]
    # a wider grid runs only what is new: ratio 0.6 for each criterion and recovery
    wider = ["--ratio", "0.25,0.5,0.6,0.75", "--criterion", "l1,hybrid", "--recover", "none,lstsq"]
    assert main(sweep_args(swept["model"], out, *wider)) == 0
    text = capsys.readouterr().out
    assert "resuming: 12 of 16" in text and "[4/4]" in text and "[5/" not in text
    assert len(json.loads((out / "sweep.json").read_text())["candidates"]) == 16


def test_a_failing_candidate_is_reported_and_the_sweep_goes_on(tmp_path, capsys, digits):
    out = tmp_path / "out"
    # without --data, least-squares recovery cannot run: those candidates fail, the others are measured
    assert main(["sweep", str(digits.cnn_path), "--eval-data", str(HELDOUT), "-o", str(out),
                 "--ratio", "0.3,0.6", "--recover", "none,lstsq", "--no-latency"]) == 0
    data = json.loads((out / "sweep.json").read_text())
    status = {(c["recipe"]["ratio"], c["recipe"]["recover"]): c for c in data["candidates"]}
    for ratio in (0.3, 0.6):
        failed = status[(ratio, "lstsq")]
        assert failed["status"] == "failed" and "needs calibration data" in failed["error"]
        assert failed["metrics"] is None and failed["pareto"] is False
        assert status[(ratio, "none")]["status"] == "ok"
        assert status[(ratio, "none")]["metrics"]["latency_ms"] is None
    assert "failed: --recover lstsq needs calibration data" in " ".join(capsys.readouterr().out.split())
    # a rerun tries failed candidates again (and skips the rest)
    assert main(["sweep", str(digits.cnn_path), "--eval-data", str(HELDOUT), "-o", str(out),
                 "--ratio", "0.3,0.6", "--recover", "none,lstsq", "--no-latency"]) == 0
    assert "resuming: 2 of 4" in capsys.readouterr().out


def test_grid_file_budgets_are_alternatives_and_invalid_combinations_are_skipped(tmp_path, capsys, digits):
    grid = tmp_path / "grid.toml"
    grid.write_text('[base]\nrecover = "bias"\n\n[grid]\nratio = [0.3, 0.5]\ntarget_macs = [0.4]\n'
                    'mode = ["structured", "unstructured"]\n\n[[candidate]]\ntarget_params = 0.5\n'
                    'allocate = "uniform"\n')
    out = tmp_path / "out"
    assert main(["sweep", str(digits.cnn_path), "--data", str(CALIB), "--limit", "100",
                 "--eval-data", str(HELDOUT), "-o", str(out), "--grid", str(grid), "--no-latency"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    recipes = [c["recipe"] for c in json.loads((out / "sweep.json").read_text())["candidates"]]
    # 3 budgets x structured, plus the extra candidate; unstructured with bias recovery is not a recipe
    assert [(r["ratio"], r["target_macs"], r["target_params"]) for r in recipes] == [
        (0.3, None, None), (0.5, None, None), (None, 0.4, None), (None, None, 0.5)]
    assert all(r["recover"] == "bias" and r["mode"] == "structured" for r in recipes)
    assert "skipped" in text and "unstructured prunes weights by magnitude only" in text
    assert json.loads((out / "sweep.json").read_text())["skipped"]


def test_local_process_pool_gives_the_same_results(tmp_path, digits):
    one, two = tmp_path / "one", tmp_path / "two"
    grid = ["--ratio", "0.3,0.6", "--recover", "none,lstsq", "--no-latency"]
    assert main(sweep_args(digits.cnn_path, one, *grid)) == 0
    assert main(sweep_args(digits.cnn_path, two, *grid, "--jobs", "2")) == 0
    first, second = (json.loads((d / "sweep.json").read_text())["candidates"] for d in (one, two))
    assert [(c["id"], c["metrics"]) for c in first] == [(c["id"], c["metrics"]) for c in second]


@pytest.mark.parametrize("argv, needle", [
    (["--ratio", "0.5,abc"], "--ratio: 'abc' is not a number"),
    (["--ratio", "0.5,1.5"], "--ratio must be in [0, 1)"),
    (["--criterion", "l1,best"], "--criterion must be one of"),
    (["--global", "maybe"], "--global takes true/false values"),
    (["--address", "127.0.0.1:1"], "--address is for --executor ray"),
    (["--max-drop", "-1"], "--max-drop is in points"),
    (["--grid", "missing.toml"], "grid file not found"),
])
def test_bad_sweep_options_are_one_line_errors(tmp_path, cli_error, argv, needle, digits):
    cli_error(["sweep", str(digits.cnn_path), "--eval-data", str(HELDOUT), "-o", str(tmp_path / "o"),
               *argv], needle)


def test_bad_grid_files(tmp_path, cli_error, digits):
    grid = tmp_path / "g.toml"
    for text, needle in (("[grid]\nratio = 0.5\n", "'ratio' must be a non-empty list"),
                         ("[grid]\nratoi = [0.5]\n", "unknown key 'ratoi'"),
                         ("[grid]\nratio = [0.5, 2.0]\n", "'ratio' must be in [0, 1)"),
                         ("[grids]\n", "unknown section 'grids'"),
                         ("[base]\nround_to = 'x'\n", "'round_to' must be an integer")):
        grid.write_text(text)
        err = cli_error(["sweep", str(digits.cnn_path), "--eval-data", str(HELDOUT), "-o",
                         str(tmp_path / "o"), "--grid", str(grid)], needle)
        assert "g.toml" in err


def test_ray_executor_without_ray_is_an_install_hint(tmp_path, cli_error, monkeypatch, digits):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError, as without the extra
    cli_error(["sweep", str(digits.cnn_path), "--eval-data", str(HELDOUT), "-o", str(tmp_path / "o"),
               "--executor", "ray", "--address", "127.0.0.1:1"], "pip install 'onnxprune[ray]'")
