"""`onnxprune eval` and onnxprune.evaluate.metrics: figures match an independent onnxruntime loop, gates set the exit
code, bad input is one line with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import numpy_helper

from onnxprune.cli import main
from onnxprune.evaluate.data import from_arrays, load_data
from onnxprune.errors import InputError
from onnxprune.evaluate.metrics import accuracy, compare_outputs
from onnxprune.evaluate.compare import evaluate
from onnxprune.evaluate.latency import measure_latency
from onnxprune.runtime.session import run_batches
from tests.shipped_models import DIGITS

MODEL = DIGITS.cnn_path
HELDOUT = DIGITS.heldout_path
HAS_CUDA = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
FAST = ["--no-latency", "--quiet"]


def independent_accuracy() -> float:
    data = np.load(HELDOUT)
    session = onnxruntime.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": data["input"]})[0]
    return float((logits.argmax(axis=1) == data["labels"]).mean())


def with_class0_bias(tmp_path: Path, shift: float) -> Path:
    """The digits model with `shift` added to the last Gemm's bias for class 0: a controlled degradation."""
    model = onnx.load(str(MODEL))
    bias_name = [n for n in model.graph.node if n.op_type == "Gemm"][-1].input[2]
    init = next(t for t in model.graph.initializer if t.name == bias_name)
    bias = numpy_helper.to_array(init).copy()
    bias[0] += shift
    init.CopyFrom(numpy_helper.from_array(bias, bias_name))
    path = tmp_path / f"shifted_{shift}.onnx"
    onnx.save(model, str(path))
    return path


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["eval", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_heldout_accuracy_equals_an_independent_onnxruntime_loop(tmp_path, capsys):
    expected = independent_accuracy()
    assert expected >= 0.97  # the shipped model's promise (models/README.md)
    code, out, _ = run_cli(capsys, MODEL, "--data", HELDOUT, "--json", tmp_path / "r.json", "--batch-size", "64", *FAST)
    report = json.loads((tmp_path / "r.json").read_text())
    assert code == 0 and report["candidate"]["accuracy"]["top1"] == expected
    assert f"{100 * expected:.4g}" in out
    assert report["data"]["samples"] == 450 and report["versions"]["onnxruntime"] == onnxruntime.__version__
    assert report["machine"]["cpu_count"] and report["versions"]["onnx"] == onnx.__version__
    assert report["providers"] == ["CPUExecutionProvider"]
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # the temporary file was renamed into place


def test_accuracy_top_k_and_ties():
    scores = np.array([[0.1, 0.9, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]], np.float32)
    result = accuracy([{"s": scores[:2]}, {"s": scores[2:]}], np.array([1, 1, 0, 1]), k=(1, 2, 5))
    # the tie in row 1 goes to class 0, as argmax does
    assert result["top1"] == 0.25 and result["top2"] == 0.75 and "top5" not in result
    with pytest.raises(InputError, match="3 classes"):
        accuracy([{"s": scores}], np.array([0, 1, 2, 3]))


def test_compare_outputs_for_scores_and_embeddings():
    # "emb" stands for any output that is not [N, classes] scores: a feature map, a mask
    ref = [{"logits": np.array([[1.0, 2.0], [3.0, 1.0]], np.float32), "emb": np.array([[[1.0, 0.0]], [[0.0, 2.0]]])}]
    cand = [{"logits": np.array([[1.0, 2.5], [0.0, 1.0]], np.float32), "emb": np.array([[[2.0, 0.0]], [[0.0, -2.0]]])}]
    result = compare_outputs(cand, ref, atol=0.6)
    logits, emb = result["outputs"]["logits"], result["outputs"]["emb"]
    assert result["top1_agreement"] == 0.5 and logits["top1_agreement"] == 0.5
    assert logits["max_abs_err"] == 3.0 and logits["mean_abs_err"] == 0.875
    assert logits["tolerance_violations"] == 1 and not logits["within_tolerance"]
    assert emb["cosine_min"] == pytest.approx(-1.0) and emb["cosine"] == pytest.approx(0.0)
    assert "top1_agreement" not in emb and emb["max_abs_err"] == 4.0
    with pytest.raises(InputError, match="outputs differ"):
        compare_outputs([{"a": np.zeros(2)}], [{"b": np.zeros(2)}])


def test_evaluate_against_itself_agrees_exactly():
    dataset = load_data(HELDOUT, onnx.load(str(MODEL)), batch_size=100, limit=200)
    result = evaluate(str(MODEL), dataset, reference=str(MODEL), warmup=1, runs=11, batch_sizes=[1, 4])
    assert result["agreement"]["top1_agreement"] == 1.0 and result["agreement"]["outputs"]["logits"]["max_abs_err"] == 0
    assert result["deltas"]["top1_points"] == 0.0
    for role in ("candidate", "reference"):  # ABBA segments still add up to the runs asked for
        assert [(r["batch_size"], r["runs"]) for r in result[role]["latency"]] == [(1, 11), (4, 11)]
    assert [d["batch_size"] for d in result["deltas"]["latency"]] == [1, 4]


def test_latency_statistics_and_batch_sizes():
    dataset = load_data(HELDOUT, onnx.load(str(MODEL)), batch_size=8)
    result = measure_latency(str(MODEL), dataset, warmup=2, runs=30, batch_sizes=[1, 16], threads=1)
    rows = result["results"]
    assert [r["batch_size"] for r in rows] == [1, 16] and all(r["runs"] == 30 for r in rows)
    for r in rows:
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p95_ms"] <= r["p99_ms"]
        assert r["providers_used"] == ["CPUExecutionProvider"]
        assert r["throughput_per_s"] == pytest.approx(r["batch_size"] * 1e3 / r["mean_ms"])
    timed = measure_latency(str(MODEL), dataset.feeds[0], warmup=0, duration=0.05)["results"][0]
    assert timed["runs"] >= 1 and timed["batch_size"] == 8


def test_io_binding_path_runs_with_the_cpu_as_its_device():
    """The CUDA timing path (inputs bound once, outputs left in place, synchronised) exercised on the CPU."""
    from onnxprune.evaluate.latency import _device_resident_call
    from onnxprune.runtime.session import open_session

    session = open_session(str(MODEL))
    x = np.load(HELDOUT)["input"][:3]
    call = _device_resident_call(session, {"input": x}, "cpu")
    call()
    np.testing.assert_array_equal(call.binding.copy_outputs_to_cpu()[0], session.run(None, {"input": x})[0])


def test_onnxruntime_failures_are_one_line_input_errors():
    feeds = from_arrays({"input": np.zeros((2, 1, 9, 9), np.float32)})  # bypasses the loader's checks
    with pytest.raises(InputError, match="onnxruntime failed on batch 0") as info:
        run_batches(str(MODEL), feeds)
    assert "\n" not in str(info.value)
    fixed = onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 17]> g (float[4, 2] x) => (float[4, 2] y) '
                                    '{ y = Relu(x) }')
    with pytest.raises(InputError, match="at batch size 3 .*Expected: 4"):
        measure_latency(fixed, {"x": np.zeros((4, 2), np.float32)}, batch_sizes=[4, 3], warmup=0, runs=2)


def test_image_folder_through_the_cli(tmp_path, capsys):
    """Held-out digits written as 8x8 PNGs in class folders 0..9 score as the arrays do (up to 8-bit rounding)."""
    from PIL import Image

    data = np.load(HELDOUT)
    for i, (x, y) in enumerate(zip(data["input"][:40], data["labels"][:40])):
        (tmp_path / "img" / str(y)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(x[0] * 255).astype(np.uint8), "L").save(tmp_path / "img" / str(y) / f"{i}.png")
    code, _, err = run_cli(capsys, MODEL, "--data", tmp_path / "img", "--mean", "0", "--std", "1",
                           "--json", tmp_path / "r.json", *FAST)
    report = json.loads((tmp_path / "r.json").read_text())
    assert code == 0, err
    assert report["data"]["samples"] == 40 and report["candidate"]["accuracy"]["top1"] >= 0.95


# ---- gates: exit code 1 when missed, 0 when met --------------------------------------------------------

@pytest.mark.parametrize("gate", [["--max-drop", "1"], ["--min-agreement", "0.99"], ["--atol", "1e-4"]])
def test_each_gate_is_met_by_the_model_itself(capsys, gate):
    code, out, err = run_cli(capsys, MODEL, "--reference", MODEL, "--data", HELDOUT, *gate, *FAST)
    assert code == 0 and "met" in out and err == ""


@pytest.mark.parametrize("gate, word", [(["--max-drop", "1"], "dropped"), (["--min-agreement", "0.99"], "agreement"),
                                        (["--atol", "1e-4"], "outside atol")])
def test_each_gate_fails_with_exit_code_1(tmp_path, capsys, gate, word):
    degraded = with_class0_bias(tmp_path, 8.0)
    code, out, err = run_cli(capsys, degraded, "--reference", MODEL, "--data", HELDOUT, *gate, *FAST)
    assert code == 1 and "MISSED" in out
    assert err.startswith("error: gate missed") and word in err and len(err.strip().splitlines()) == 1


def test_tolerance_gate_follows_the_tolerance(tmp_path, capsys):
    nudged = with_class0_bias(tmp_path, 1e-3)
    assert run_cli(capsys, nudged, "--reference", MODEL, "--data", HELDOUT, "--atol", "1e-5", *FAST)[0] == 1
    assert run_cli(capsys, nudged, "--reference", MODEL, "--data", HELDOUT, "--atol", "2e-3", *FAST)[0] == 0
    assert run_cli(capsys, nudged, "--reference", MODEL, "--data", HELDOUT, "--rtol", "1e-7", *FAST)[0] == 1


def test_gate_results_are_in_the_json_even_when_missed(tmp_path, capsys):
    degraded = with_class0_bias(tmp_path, 8.0)
    code, _, _ = run_cli(capsys, degraded, "--reference", MODEL, "--data", HELDOUT, "--max-drop", "0.5",
                         "--json", tmp_path / "r.json", *FAST)
    gates = json.loads((tmp_path / "r.json").read_text())["gates"]
    assert code == 1 and gates[0]["gate"] == "max-drop" and gates[0]["passed"] is False and gates[0]["value"] > 0.5


# ---- bad input: exit code 2, one line on stderr, no traceback ------------------------------------------

def _bad_npz(tmp_path: Path) -> Path:
    np.savez(tmp_path / "bad.npz", input=np.zeros((4, 64), np.float32))
    return tmp_path / "bad.npz"


def _pickled(tmp_path: Path) -> Path:
    np.save(tmp_path / "p.npy", np.array([object()], dtype=object), allow_pickle=True)
    return tmp_path / "p.npy"


def _file(tmp_path):
    (tmp_path / "a_file").write_text("")
    return tmp_path / "a_file"


@pytest.mark.parametrize("make_args, message", [
    (lambda t: [MODEL, "--data", _bad_npz(t)], "expects shape [batch,1,8,8] but the data has [4,64]"),
    (lambda t: [MODEL, "--data", _pickled(t)], "pickled"),
    (lambda t: [MODEL, "--data", t / "missing.npz"], "data not found"),
    (lambda t: [MODEL], "eval needs data"),
    (lambda t: [t / "missing.onnx", "--data", HELDOUT], "model file not found"),
    (lambda t: [MODEL, "--data", HELDOUT, "--max-drop", "1"], "pass --reference"),
    (lambda t: [MODEL, "--random", "4", "--reference", MODEL, "--max-drop", "1"], "--max-drop needs labels"),
    (lambda t: [MODEL, "--reference", MODEL, "--data", HELDOUT, "--min-agreement", "99"], "fraction"),
    (lambda t: [MODEL, "--random", "4", "--input-shapes", "input:1x3x8x8"], "contradicts"),
    (lambda t: [MODEL, "--random", "4", "--providers", "tpu"], "unknown execution provider"),
    (lambda t: [MODEL, "--data", HELDOUT, "--json", _file(t) / "r.json"], "is a file, not a folder"),
])
def test_bad_input_is_one_line_with_exit_code_2(tmp_path, capsys, make_args, message):
    code, _, err = run_cli(capsys, *make_args(tmp_path), *FAST)
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.skipif(HAS_CUDA, reason="checks the error given when CUDA is missing; CUDA is available here")
def test_cuda_when_unavailable_is_an_error_with_an_install_hint(capsys):
    code, _, err = run_cli(capsys, MODEL, "--random", "4", "--providers", "cpu,cuda", "--quiet")
    assert code == 2 and "CUDAExecutionProvider is not available" in err and "onnxprune[gpu]" in err


@pytest.mark.skipif(not HAS_CUDA, reason="CUDAExecutionProvider is not available in this onnxruntime build")
def test_cuda_latency_with_and_without_host_copies():
    result = measure_latency(str(MODEL), {"input": np.zeros((8, 1, 8, 8), np.float32)}, providers=("cuda",),
                             warmup=3, runs=20)
    modes = [r["mode"] for r in result["results"]]
    assert modes == ["run (host copies)", "I/O binding (on device)"]
    assert all(r["providers_used"][0] == "CUDAExecutionProvider" for r in result["results"])


def test_end_to_end_exit_codes_in_a_real_process(tmp_path):
    base = [sys.executable, "-m", "onnxprune.cli", "eval", str(with_class0_bias(tmp_path, 8.0)), "--reference",
            str(MODEL), "--data", str(HELDOUT), "--runs", "5", "--warmup", "1"]
    missed = subprocess.run([*base, "--max-drop", "1"], capture_output=True, text=True, timeout=120)
    met = subprocess.run([*base, "--max-drop", "100"], capture_output=True, text=True, timeout=120)
    assert missed.returncode == 1 and "Traceback" not in missed.stderr and "gate missed" in missed.stderr
    assert met.returncode == 0, met.stderr
    assert "latency" in met.stdout and "p50 ms" in met.stdout


def test_fidelity_on_real_tokens_only():
    """Token outputs ([batch, seq, features]) with an attention mask in the feed are compared on real tokens:
    garbage at padded positions changes no figure."""
    from onnxprune.evaluate.metrics import compare_outputs

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int64)
    cand = ref.copy()
    cand[0, 3:] = 100.0  # padded positions
    feeds = [{"input_ids": np.zeros((2, 5), np.int64), "attention_mask": mask}]
    masked = compare_outputs([{"y": cand}], [{"y": ref}], feeds=feeds)["outputs"]["y"]
    assert masked["cosine"] == pytest.approx(1.0) and masked["max_abs_err"] == 0.0 and masked["real_tokens_only"]
    plain = compare_outputs([{"y": cand}], [{"y": ref}])["outputs"]["y"]
    assert plain["cosine"] < 0.9 and plain["max_abs_err"] > 50
