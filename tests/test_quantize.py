"""onnxprune.quantize.quantize and the `quantize` command: int8 static/dynamic and fp16 through onnxruntime."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnx.parser
import pytest

ort = pytest.importorskip("onnxruntime")

from onnxprune.errors import InputError, UnsupportedModelError  # noqa: E402
from onnxprune.quantize.quantize import provider_warnings, quantize_model  # noqa: E402
from onnxprune.recipe import Recipe
from tests.shipped_models import DIGITS  # noqa: E402

needs_digits = pytest.mark.skipif(not DIGITS.cnn_path.exists(), reason="models/digits_cnn.onnx not built yet")


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


@pytest.fixture(scope="module")
def cnn_data(digits):
    model, calib, held = digits.cnn(), digits.calib, digits.heldout
    # batches of 32 leave a short last batch (300 = 9*32 + 12), which the histogram methods must survive
    feeds = [{"input": calib["input"][i:i + 32]} for i in range(0, len(calib["input"]), 32)]
    return model, feeds, held["input"], held["labels"]


@pytest.fixture(scope="module")
def mlp():
    """An sklearn MLP on digits exported by skl2onnx: MatMul+Add layers, the dynamic-int8 use case."""
    pytest.importorskip("skl2onnx")
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier
    from skl2onnx import to_onnx

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    with warnings.catch_warnings():  # a few epochs are enough for a model to quantize; convergence is not the point
        warnings.simplefilter("ignore")
        clf = MLPClassifier(hidden_layer_sizes=(96, 48), max_iter=40, random_state=0).fit(x[:1200], y[:1200])
    assert clf.score(x[1200:], y[1200:]) > 0.85
    model = to_onnx(clf, x[:1], options={"zipmap": False}, target_opset=17)
    return model, x[1200:]


def gemm_model() -> onnx.ModelProto:
    """Gemm with transB, alpha and beta (what torch exports for Linear, with the scalars not at 1)."""
    rng = np.random.default_rng(0)
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        mlp (float[N, 32] x) => (float[N, 8] y) {
            h = Gemm <transB: int = 1, alpha: float = 0.5> (x, w1, b1)
            r = Relu (h)
            y = Gemm <beta: float = 2.0> (r, w2, b2)
        }""")
    for name, shape in (("w1", (64, 32)), ("b1", (64,)), ("w2", (64, 8)), ("b2", (8,))):
        model.graph.initializer.append(onnx.numpy_helper.from_array(
            rng.standard_normal(shape).astype(np.float32), name))
    return model


@needs_digits
def test_static_int8_digits_keeps_accuracy_and_is_3x_smaller(cnn_data):
    model, feeds, x, labels = cnn_data
    result = quantize_model(model, "static", calibration=feeds)
    onnx.checker.check_model(result.model, full_check=True)
    ops = op_types(result.model)
    assert ops.count("QuantizeLinear") >= 5 and ops.count("DequantizeLinear") >= 10
    fp32 = (run(model, {"input": x})[0].argmax(1) == labels).mean()
    int8 = (run(result.model, {"input": x})[0].argmax(1) == labels).mean()
    assert abs(fp32 - int8) <= 0.01, (fp32, int8)
    ratio = model.ByteSize() / result.model.ByteSize()
    assert ratio >= 3.0, ratio
    assert [i.name for i in result.model.graph.input] == ["input"]
    assert [o.name for o in result.model.graph.output] == [o.name for o in model.graph.output]
    assert any("quant_pre_process" in n for n in result.notes)


@needs_digits
@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_calibration_survives_a_short_last_batch(cnn_data, method):
    model, feeds, x, labels = cnn_data
    result = quantize_model(model, "static", calibration=feeds, method=method, per_channel=False)
    int8 = (run(result.model, {"input": x})[0].argmax(1) == labels).mean()
    assert int8 >= 0.97
    assert any(method in n for n in result.notes)


@needs_digits
def test_target_tensorrt_uses_symmetric_activations(cnn_data):
    model, feeds, _, _ = cnn_data
    result = quantize_model(model, "static", calibration=feeds, target="tensorrt")
    zero_points = [t for t in result.model.graph.initializer if t.name.endswith("_zero_point")]
    assert zero_points
    for t in zero_points:
        values = onnx.numpy_helper.to_array(t)
        assert not values.any(), t.name
        if "bias" not in t.name:  # int32 bias zero points aside, every Q/DQ zero point is int8
            assert values.dtype == np.int8, t.name
    cpu = quantize_model(model, "static", calibration=feeds, target="cpu")
    input_zp = [onnx.numpy_helper.to_array(t) for t in cpu.model.graph.initializer
                if t.name == "input_zero_point"]
    assert input_zp and input_zp[0].dtype == np.uint8


@needs_digits
def test_exclude_op_type_keeps_it_float(cnn_data):
    model, feeds, _, _ = cnn_data
    result = quantize_model(model, "static", calibration=feeds, exclude=["Gemm"])
    producers = {o: n.op_type for n in result.model.graph.node for o in n.output}
    for node in result.model.graph.node:
        if node.op_type == "Gemm":
            assert producers.get(node.input[1]) != "DequantizeLinear"
    assert any("kept in float" in n for n in result.notes)


@needs_digits
def test_failed_preprocessing_is_reported_not_fatal(cnn_data, monkeypatch):
    import onnxruntime.quantization.shape_inference as shape_inference

    def broken(*args, **kwargs):
        raise RuntimeError("symbolic shape inference exploded")

    monkeypatch.setattr(shape_inference, "quant_pre_process", broken)
    model, feeds, _, _ = cnn_data
    result = quantize_model(model, "static", calibration=feeds)
    assert "QuantizeLinear" in op_types(result.model)
    assert any("pre-processing" in n and "failed" in n and "exploded" in n for n in result.notes)


def test_dynamic_int8_mlp_agrees_with_float32(mlp):
    model, x = mlp
    result = quantize_model(model, "dynamic")
    assert op_types(result.model).count("MatMulInteger") == 3
    ref = run(model, {"X": x})
    out = run(result.model, {"X": x})
    agreement = (ref[1].argmax(1) == out[1].argmax(1)).mean()
    assert agreement >= 0.99, agreement


def test_gemm_to_matmul_is_exact_in_float():
    from onnxprune.quantize.gemm import gemm_to_matmul as _gemm_to_matmul

    model = gemm_model()
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    assert _gemm_to_matmul(rewritten) == 2
    assert op_types(rewritten) == ["MatMul", "Add", "Relu", "MatMul", "Add"]
    onnx.checker.check_model(rewritten, full_check=True)
    x = np.random.default_rng(1).standard_normal((16, 32)).astype(np.float32)
    np.testing.assert_allclose(run(rewritten, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-5, atol=1e-4)


def test_dynamic_int8_covers_gemm_through_matmul():
    model = gemm_model()
    result = quantize_model(model, "dynamic")
    assert "Gemm" not in op_types(result.model)
    assert op_types(result.model).count("MatMulInteger") == 2
    x = np.random.default_rng(1).standard_normal((16, 32)).astype(np.float32)
    ref, out = run(model, {"x": x})[0], run(result.model, {"x": x})[0]
    assert np.abs(out - ref).max() < 0.1 * np.abs(ref).max()


@needs_digits
def test_fp16_keeps_float32_inputs_and_outputs(cnn_data):
    model, _, x, _ = cnn_data
    result = quantize_model(model, "fp16")
    float32 = onnx.TensorProto.FLOAT
    assert [i.type.tensor_type.elem_type for i in result.model.graph.input] == [float32]
    assert [o.type.tensor_type.elem_type for o in result.model.graph.output] == [float32]
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in result.model.graph.initializer)
    out = run(result.model, {"input": x})[0]
    assert out.dtype == np.float32
    assert (out.argmax(1) == run(model, {"input": x})[0].argmax(1)).mean() >= 0.99
    assert result.model.ByteSize() < 0.6 * model.ByteSize()


def test_static_without_calibration_is_an_input_error():
    with pytest.raises(InputError, match="calibration data"):
        quantize_model(gemm_model(), "static")
    with pytest.raises(InputError, match="empty"):
        quantize_model(gemm_model(), "static", calibration=[])


def test_calibration_missing_an_input_is_named():
    with pytest.raises(InputError, match="lacks model input.*x"):
        quantize_model(gemm_model(), "static", calibration=[{"y": np.zeros((1, 32), np.float32)}])


def test_already_quantized_model_is_refused():
    quantized = quantize_model(gemm_model(), "dynamic").model
    for mode in ("dynamic", "static", "fp16"):
        with pytest.raises(UnsupportedModelError, match="already quantized"):
            quantize_model(quantized, mode, calibration=[{"x": np.zeros((1, 32), np.float32)}])


def test_nothing_to_quantize_is_unsupported():
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        act (float[N, 4] x) => (float[N, 4] y) { y = Relu (x) }""")
    with pytest.raises(UnsupportedModelError, match="nothing was quantized"):
        quantize_model(model, "dynamic")


@pytest.mark.parametrize("mode", ["static", "dynamic", "fp16"])
def test_ops_onnxruntime_cannot_run_are_unsupported(mode, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # onnxruntime's shape inference drops debug files in the working directory
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17, "my.ops" : 1]>
        custom (float[N, 4] x) => (float[N, 4] y) { h = MatMul (x, w)  y = my.ops.Weird (h) }""")
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.eye(4, dtype=np.float32), "w"))
    with pytest.raises(UnsupportedModelError, match="cannot run the input model.*Weird"):
        quantize_model(model, mode, calibration=[{"x": np.ones((2, 4), np.float32)}])
    assert list(tmp_path.iterdir()) == []


def test_exclude_by_node_name_keeps_that_gemm():
    model = gemm_model()
    model.graph.node[0].name = "first"
    result = quantize_model(model, "dynamic", exclude=["first"])
    assert op_types(result.model).count("Gemm") == 1
    assert op_types(result.model).count("MatMulInteger") == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "int3"}, "unknown quantization mode"),
    ({"mode": "static", "method": "kl"}, "unknown calibration method"),
    ({"mode": "dynamic", "target": "npu"}, "unknown target"),
    ({"mode": "dynamic", "exclude": ["NoSuchNode"]}, "NoSuchNode"),
])
def test_bad_options_are_input_errors(kwargs, message):
    calibration = [{"x": np.zeros((2, 32), np.float32)}]
    with pytest.raises(InputError, match=message):
        quantize_model(gemm_model(), calibration=calibration, **kwargs)


def test_int8_alias_means_static():
    x = np.random.default_rng(2).standard_normal((8, 32)).astype(np.float32)
    result = quantize_model(gemm_model(), "int8", calibration=[{"x": x}])
    assert result.mode == "static"
    assert "QuantizeLinear" in op_types(result.model)


def test_provider_warnings():
    assert any("no int8 kernels" in w for w in provider_warnings("static", ["CUDAExecutionProvider"]))
    assert provider_warnings("static", ["tensorrt", "cuda"]) == []
    assert provider_warnings("dynamic", ["cpu"]) == []


# --- the `quantize` command and `prune --quantize` -------------------------------------------------------------

@pytest.fixture
def cli(capsys):
    """Run `onnxprune ARGS` through cli.main (one-line errors, exit codes); returns (code, stdout, stderr)."""
    from onnxprune.cli import cli as group
    from onnxprune.cli import main
    from onnxprune.commands.quantize_cmd import quantize_command

    if "quantize" not in group.commands:  # until cli.py registers it
        group.add_command(quantize_command)

    def invoke(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


FAST = ("--runs", "3", "--warmup", "0", "--quiet")


@needs_digits
def test_cli_static_reports_accuracy_size_and_writes_the_model(cli, tmp_path, digits):
    import json

    out, report = tmp_path / "digits.int8.onnx", tmp_path / "report.json"
    code, stdout, err = cli("quantize", digits.cnn_path, "--data", digits.calib_path,
                            "--eval-data", digits.heldout_path, "-o", out, "--json", report, *FAST)
    assert code == 0, err
    assert "smaller by" in stdout and "top1 accuracy" in stdout and "latency" in stdout
    data = json.loads(report.read_text())
    sizes = data["size_bytes"]
    assert sizes["before"] / sizes["after"] >= 3.0
    assert abs(data["evaluation"]["deltas"]["top1_points"]) <= 1.0
    assert data["evaluation"]["data"]["samples"] == 450
    assert "QuantizeLinear" in op_types(onnx.load(str(out)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits.int8.onnx", "report.json"]


@needs_digits
def test_cli_static_without_data_fails_in_one_line_and_writes_nothing(cli, tmp_path, digits):
    code, _, err = cli("quantize", digits.cnn_path, "-o", tmp_path / "q.onnx", *FAST)
    assert code == 2
    assert err.strip().count("\n") == 0 and err.startswith("error: ") and "calibration data" in err
    assert list(tmp_path.iterdir()) == []


@needs_digits
def test_cli_refuses_to_overwrite_without_flag(cli, tmp_path, digits):
    out = tmp_path / "q.onnx"
    out.write_bytes(b"keep me")
    args = ("quantize", digits.cnn_path, "--mode", "dynamic", "-o", out, "--no-eval")
    code, _, err = cli(*args)
    assert code == 2 and "--overwrite" in err
    assert out.read_bytes() == b"keep me"
    code, _, err = cli(*args, "--overwrite")
    assert code == 0, err
    assert "MatMulInteger" in op_types(onnx.load(str(out)))


def test_cli_refuses_an_already_quantized_model(cli, tmp_path):
    quantized = tmp_path / "already.onnx"
    onnx.save(quantize_model(gemm_model(), "dynamic").model, str(quantized))
    code, _, err = cli("quantize", quantized, "--mode", "dynamic", "-o", tmp_path / "again.onnx", *FAST)
    assert code == 2 and "already quantized" in err and "Traceback" not in err
    assert not (tmp_path / "again.onnx").exists()


@needs_digits
def test_cli_fp16_without_data_checks_on_random_inputs(cli, tmp_path, digits):
    out = tmp_path / "digits.fp16.onnx"
    code, stdout, err = cli("quantize", digits.cnn_path, "--mode", "fp16", "-o", out, *FAST)
    assert code == 0, err
    assert "random samples" in stdout and "top-1 agreement" in stdout
    model = onnx.load(str(out))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert "CPU provider has few fp16 kernels" in err  # timed on CPU: the warning says what that means


@needs_digits
def test_prune_then_quantize_composes(cnn_data):
    prune = pytest.importorskip("onnxprune.pipeline.prune")
    model, feeds, x, labels = cnn_data
    pruned = prune.prune_model(model, Recipe(ratio=0.25)).model
    result = quantize_model(pruned, "static", calibration=feeds)
    # less than 3x here: with a quarter of the channels gone, Q/DQ nodes and per-channel scales weigh more
    assert result.model.ByteSize() < pruned.ByteSize() / 2
    assert result.model.ByteSize() < model.ByteSize() / 4
    out = run(result.model, {"input": x})[0]
    assert out.shape == (len(x), 10)
    assert (out.argmax(1) == run(pruned, {"input": x})[0].argmax(1)).mean() >= 0.97


@needs_digits
def test_cli_prune_with_quantize_int8(cli, tmp_path, digits):
    from onnxprune.cli import cli as group

    if not any(p.name == "quantize" for p in group.commands["prune"].params):
        pytest.skip("prune --quantize is not wired yet")
    out = tmp_path / "digits.pruned.int8.onnx"
    code, stdout, err = cli("prune", digits.cnn_path, "--ratio", "0.25", "--quantize", "int8",
                            "--data", digits.calib_path, "-o", out)
    assert code == 0, err
    model = onnx.load(str(out))
    assert "QuantizeLinear" in op_types(model)
    assert model.ByteSize() < digits.cnn().ByteSize() / 3
