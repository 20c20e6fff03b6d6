"""Outputs go into folders the CLI creates (issue 21): -o, --json, --plot, --csv and a sweep's -o may name folders
that do not exist yet. An existing file is still refused without --overwrite, a parent that cannot be created (a
file in the way) is a one-line error with exit code 2, and a run that fails leaves nothing behind: no file, no
new empty folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxprune.cli import main
from onnxprune.io.model_io import save_model
from onnxprune.runtime.session import run
from onnxprune.runtime.feeds import sample_feed
from onnxprune.runtime.feeds import validation_feed

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
DIGITS = MODELS / "digits_cnn.onnx"
HELDOUT = MODELS / "digits_heldout.npz"


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def loads_and_runs(path: Path, like: Path) -> None:
    """The written model passes the checker, runs in onnxruntime, and keeps the original's interface."""
    onnx.checker.check_model(str(path), full_check=True)
    original = onnx.load(like)
    feed = sample_feed(original, batch=2)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, feed)
    assert [g.shape for g in got] == [r.shape for r in run(original, feed)]


def test_plain_model_and_json_into_new_nested_folders(tmp_path):
    out, report = tmp_path / "a" / "b" / "model.onnx", tmp_path / "reports" / "x" / "prune.json"
    assert main(["prune", str(DIGITS), "--ratio", "0.3", "-o", str(out), "--json", str(report)]) == 0
    loads_and_runs(out, DIGITS)
    assert json.loads(report.read_text())["output"] == str(out)
    assert files_under(tmp_path) == ["a", "a/b", "a/b/model.onnx", "reports", "reports/x", "reports/x/prune.json"]
    # an existing output is still refused without --overwrite, and left as it was
    before = out.read_bytes()
    assert main(["prune", str(DIGITS), "--ratio", "0.5", "-o", str(out)]) == 2
    assert out.read_bytes() == before
    assert main(["prune", str(DIGITS), "--ratio", "0.5", "-o", str(out), "--overwrite"]) == 0
    assert out.read_bytes() != before


def test_external_data_model_into_a_new_folder(tmp_path):
    src = tmp_path / "src" / "model.onnx"
    save_model(onnx.load(DIGITS), src, external_data=True)
    out = tmp_path / "new" / "deep" / "model.onnx"
    assert main(["prune", str(src), "--ratio", "0.3", "-o", str(out)]) == 0
    # the weights beside the model, and no scratch folder of the rewrite left in the new folder
    assert files_under(out.parent) == ["model.onnx", "model.onnx.data"]
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in onnx.load(out, load_external_data=False)
               .graph.initializer)
    loads_and_runs(out, DIGITS)


def test_genai_folder_into_a_new_folder(tmp_path):
    """A model folder (model.onnx beside genai_config.json and a tokenizer, as onnxruntime-genai's builder writes
    it) pruned into a folder that does not exist: the folder is made, its files follow, the config says the
    pruned sizes."""
    src = tmp_path / "genai"
    src.mkdir()
    shutil.copy(MODELS / "stdlib_llama.onnx", src / "model.onnx")
    decoder = {"filename": "model.onnx", "num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 128,
               "head_size": 16}
    (src / "genai_config.json").write_text(json.dumps({"model": {"decoder": decoder}}))
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    out = tmp_path / "genai_pruned" / "v1" / "model.onnx"
    assert main(["prune", str(src / "model.onnx"), "--ratio", "0.5", "-o", str(out)]) == 0
    assert files_under(out.parent) == ["genai_config.json", "model.onnx", "tokenizer.json"]
    config = json.loads((out.parent / "genai_config.json").read_text())["model"]["decoder"]
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 1)
    assert (out.parent / "tokenizer.json").read_text() == '{"version": "1.0"}'
    pruned = onnx.load(out)
    onnx.checker.check_model(pruned, full_check=True)
    # the key/value cache follows the pruned heads, as the config says
    cache = next(i for i in pruned.graph.input if i.name == "past_key_values.0.key")
    assert cache.type.tensor_type.shape.dim[1].dim_value == 1
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feed = validation_feed(pruned)
    assert np.isfinite(session.run(["logits"], feed)[0]).all()


def test_sweep_outputs_into_new_folders(tmp_path):
    out, report, table = tmp_path / "runs" / "sweep1", tmp_path / "out" / "sweep.json", tmp_path / "csv" / "s.csv"
    assert main(["sweep", str(DIGITS), "--eval-data", str(HELDOUT), "-o", str(out), "--ratio", "0.3",
                 "--no-latency", "--json", str(report), "--csv", str(table)]) == 0
    assert json.loads(report.read_text()) == json.loads((out / "sweep.json").read_text())
    assert table.read_text() == (out / "sweep.csv").read_text()


def test_analyze_json_into_a_new_folder(tmp_path):
    report = tmp_path / "new" / "groups.json"
    assert main(["analyze", str(DIGITS), "--json", str(report)]) == 0
    assert json.loads(report.read_text())["groups"]


@pytest.mark.parametrize("argv", [
    ["prune", str(DIGITS), "-o", "{file}/sub/model.onnx"],
    ["prune", str(DIGITS), "-o", "{tmp}/new/model.onnx", "--json", "{file}/report.json"],
    ["analyze", str(DIGITS), "--json", "{file}/groups.json"],
    ["sweep", str(DIGITS), "--eval-data", str(HELDOUT), "-o", "{file}/sweep", "--no-latency"],
    ["sweep", str(DIGITS), "--eval-data", str(HELDOUT), "-o", "{tmp}/new/sweep", "--json", "{file}/s.json",
     "--no-latency"],
    ["sensitivity", str(DIGITS), "--data", str(HELDOUT), "--plot", "{file}/x/s.png"],
], ids=["prune-o", "prune-json", "analyze-json", "sweep-o", "sweep-json", "sensitivity-plot"])
def test_a_file_in_the_way_is_a_one_line_error_and_nothing_is_written(tmp_path, cli_error, argv):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    argv = [a.format(file=blocker, tmp=tmp_path) for a in argv]
    err = cli_error(argv, "is a file, not a folder")
    assert str(blocker) in err
    assert files_under(tmp_path) == ["blocker"] and blocker.read_text() == "a file, not a folder"


def test_a_failed_run_removes_the_folders_it_made(tmp_path, cli_error):
    src = tmp_path / "src" / "model.onnx"
    save_model(onnx.load(DIGITS), src, external_data=True)
    before = files_under(tmp_path)
    # fails after the output folder was made and a scratch folder for the rewrite was opened in it
    cli_error(["prune", str(src), "--criterion", "activation", "-o", str(tmp_path / "a" / "b" / "m.onnx"),
               "--json", str(tmp_path / "r" / "report.json")], "needs calibration data")
    # fails reading the data
    cli_error(["prune", str(DIGITS), "--data", str(tmp_path / "missing.npz"), "-o",
               str(tmp_path / "c" / "m.onnx")], "missing.npz")
    assert files_under(tmp_path) == before
