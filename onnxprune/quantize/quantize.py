"""int8 (static QDQ, dynamic), int4 weight-only (MatMulNBits) and fp16 conversion through onnxruntime's own tools.

onnxprune does not quantize anything itself: it prepares the call (pre-processing, exclusions, defaults per
target, calibration feeds) and checks what came back. onnxruntime's quantizers read and write files, so the
work happens in a temporary folder and the caller gets a `ModelProto`.

Defaults per target, following onnxruntime's and TensorRT's guidance:
  cpu       activations uint8 asymmetric, weights int8 symmetric (the U8S8 kernels of the CPU provider);
  gpu       activations int8 symmetric, weights int8 symmetric;
  tensorrt  the same as gpu: TensorRT only accepts zero points equal to 0.

int4 is weight-only, the form decoders are served in: every MatMul with a constant 2-D weight becomes a
com.microsoft MatMulNBits holding 4-bit weights in blocks of `block_size` along K (a scale per block, and a zero
point unless symmetric), through onnxruntime.quantization.matmul_nbits_quantizer; activations stay float.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxprune.choices import QUANTIZE_ALIASES, QUANTIZE_MODES
from onnxprune.errors import InputError, UnsupportedModelError, first_line, require_onnxruntime
from onnxprune.runtime.session import load_error
from onnxprune.io.model_io import (
    check_supported,
    default_opset,
    model_bytes,
    save_model,
)
from onnxprune.io.weights import is_lazy

# "int8" is what `prune --quantize int8` says; it means calibrated static QDQ.
MODES, MODE_ALIASES = QUANTIZE_MODES, QUANTIZE_ALIASES
METHODS = ("minmax", "entropy", "percentile")
TARGETS = ("cpu", "gpu", "tensorrt")
INT8_MODES = ("static", "dynamic")

# Ops whose presence means the model was quantized already; quantizing twice stacks scales on scales.
_QUANTIZED_OPS = {
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
    "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm", "QAttention", "QOrderedMatMul",
    "DynamicQuantizeLSTM", "MatMulNBits", "QEmbedLayerNormalization",
}
# Dynamic quantization on CPU: MatMulInteger is U8S8, but ConvInteger only has a uint8 x uint8 kernel, so
# Conv stays float in dynamic mode (static QDQ is the right tool for CNNs).
_DYNAMIC_OPS = ["MatMul", "Attention", "LSTM", "Gather", "EmbedLayerNormalization"]
_PROTOBUF_LIMIT = 2**31 - 1 - 64 * 2**20


@dataclass
class QuantizeResult:
    """The quantized model, the mode that produced it and notes on what was done (shown to the user)."""

    model: onnx.ModelProto
    mode: str
    notes: list[str] = field(default_factory=list)


def normalize_mode(mode: str) -> str:
    """'int8' -> 'static' and friends; an unknown mode is an InputError listing the choices."""
    key = mode.strip().lower()
    key = MODE_ALIASES.get(key, key)
    if key not in MODES:
        raise InputError(f"unknown quantization mode {mode!r} (choose from {', '.join(MODES)} or int8)")
    return key


def quantize_model(model: onnx.ModelProto, mode: str, *, calibration: Iterable[dict[str, np.ndarray]] | None = None,
                   method: str = "minmax", per_channel: bool = True, target: str = "cpu",
                   exclude: Sequence[str] = (), preprocess: bool = True,
                   reduce_range: bool | None = None, block_size: int = 32, symmetric: bool = True,
                   accuracy_level: int | None = None) -> QuantizeResult:
    """Quantize `model` with onnxruntime: 'static' (int8 QDQ, needs `calibration`), 'dynamic' or 'fp16'.

    `calibration` yields feed dicts (input name -> array), e.g. `Dataset.feeds`. `exclude` holds node names
    or op types to keep in float. `reduce_range` (7-bit weights) defaults to on for per-channel int8 on
    the CPU target. 'int4' takes `block_size` (a power of two, at least 16), `symmetric` and onnxruntime's
    `accuracy_level` (how MatMulNBits computes: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8). Raises InputError /
    UnsupportedModelError with a one-line message.
    """
    mode = normalize_mode(mode)
    method = _choice(method, METHODS, "calibration method")
    target = _choice(target, TARGETS, "target")
    check_supported(model)
    check_not_quantized(model)
    if mode == "fp16":
        return _to_fp16(model, exclude)
    if mode == "int4":
        return _to_int4(model, exclude, block_size, symmetric, accuracy_level)
    feeds = _collect_feeds(model, calibration) if mode == "static" else []
    require_onnxruntime()

    notes: list[str] = []
    if reduce_range is None:
        # x86 CPUs without VNNI multiply u8 x s8 pairs with VPMADDUBSW, whose int16 sums saturate when weights
        # use the full int8 range; per-channel scales make that the rule. Measured on an sklearn MLP (AVX2):
        # 98.8% top-1 agreement with full-range weights, 100% with 7-bit ones.
        reduce_range = target == "cpu" and per_channel
        if reduce_range:
            notes.append("weights use 7 bits (reduce_range) to avoid int16 saturation on CPUs without VNNI")
    model = _upgrade_opset(_named_copy(model), notes)
    large = is_lazy(model) or model_bytes(model) > _PROTOBUF_LIMIT
    with tempfile.TemporaryDirectory(prefix="onnxprune-quant-") as tmp:
        src = _write(model, Path(tmp) / "float.onnx")
        if preprocess:
            src = _preprocess(src, Path(tmp) / "pre.onnx", large, notes)
        work = onnx.load(str(src))
        excluded = _resolve_exclude(work, model, exclude, notes)
        if mode == "dynamic":
            converted = _gemm_to_matmul(work, keep=set(excluded))
            if converted:
                notes.append(f"rewrote {converted} Gemm node(s) as MatMul+Add so dynamic int8 can cover them")
                src = _write(work, Path(tmp) / "matmul.onnx")
        out = Path(tmp) / "quant.onnx"
        with _onnxruntime_quantizing(model, mode):
            if mode == "static":
                if method != "minmax":
                    feeds = _equal_batches(feeds, notes)
                notes.append(_run_static(src, out, feeds, method, per_channel, reduce_range, target, excluded, large))
            else:
                notes.extend(_run_dynamic(src, out, work, per_channel, reduce_range, target, excluded, large))
        result = onnx.load(str(out))  # reads external data from tmp while it still exists
    counts = _quantized_node_counts(result)
    if not counts:
        raise UnsupportedModelError(
            f"nothing was quantized: {mode} int8 found no quantizable node "
            f"(op types in the model: {', '.join(sorted({n.op_type for n in model.graph.node}))})")
    notes.append("quantization nodes: " + ", ".join(f"{n} {op}" for op, n in sorted(counts.items())))
    if not large:
        _check_loads(result, model)
    return QuantizeResult(model=result, mode=mode, notes=notes)


def _check_loads(result: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """Post-condition: onnxruntime (CPU) can load the result. Blames the input when it cannot load either."""
    error = load_error(result)
    if error is not None:
        _blame_input(original)
        raise UnsupportedModelError(f"the quantized model does not load in onnxruntime: {error}; "
                                    "hint: --exclude the op type it names")


def _blame_input(original: onnx.ModelProto) -> None:
    """Raise a clear error when the input model itself does not load in onnxruntime (custom ops, ...)."""
    error = load_error(original)
    if error is not None:
        raise UnsupportedModelError(f"onnxruntime cannot run the input model, so it cannot be quantized and "
                                    f"checked: {error}")


def _run_static(src: Path, out: Path, feeds: list[dict[str, np.ndarray]], method: str, per_channel: bool,
                reduce_range: bool, target: str, excluded: list[str], large: bool) -> str:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    symmetric_act = target != "cpu"  # TensorRT (and the GPU int8 paths) need zero points of 0
    quantize_static(
        str(src), str(out), _FeedReader(feeds), quant_format=QuantFormat.QDQ,
        per_channel=per_channel, reduce_range=reduce_range,
        activation_type=QuantType.QInt8 if symmetric_act else QuantType.QUInt8,
        weight_type=QuantType.QInt8, nodes_to_exclude=excluded, use_external_data_format=large,
        calibrate_method=_calibration_method(method), calibration_providers=["CPUExecutionProvider"],
        extra_options={"ActivationSymmetric": symmetric_act, "WeightSymmetric": True},
    )
    act = "int8 symmetric" if symmetric_act else "uint8 asymmetric"
    note = (f"static int8 QDQ for target {target}: activations {act}, weights int8 symmetric "
            f"{'per channel' if per_channel else 'per tensor'}; calibration {method} on {len(feeds)} batch(es)")
    if symmetric_act:
        # Measured on the digits CNN: 99.6% with Q/DQ evaluated as float (what TensorRT computes) but 94.9%
        # through onnxruntime's fused CPU int8 kernels, so CPU numbers misjudge a GPU-targeted model.
        note += (f"; judge its accuracy on {target}: onnxruntime's CPU kernels for int8 activations can lose "
                 "accuracy that the target would not")
    return note


def _run_dynamic(src: Path, out: Path, work: onnx.ModelProto, per_channel: bool, reduce_range: bool, target: str,
                 excluded: list[str], large: bool) -> list[str]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src), str(out), op_types_to_quantize=_DYNAMIC_OPS, per_channel=per_channel,
        reduce_range=reduce_range, weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
        use_external_data_format=large,
    )
    notes = [f"dynamic int8: weights int8 symmetric {'per channel' if per_channel else 'per tensor'}, "
             "activations quantized at run time"]
    if any(n.op_type == "Conv" for n in work.graph.node):
        notes.append("Conv nodes stay float32 in dynamic mode (onnxruntime's CPU ConvInteger has no "
                     "int8-weight kernel); use --mode static for convolutional models")
    if target != "cpu":
        notes.append(f"dynamic int8 has no {target} kernels; it runs on the CPU provider")
    return notes


def check_not_quantized(model: onnx.ModelProto) -> None:
    """Refuse a model that already holds quantization ops (QDQ, QLinear*, *Integer)."""
    for node in model.graph.node:
        if node.op_type in _QUANTIZED_OPS or node.op_type.startswith("QLinear"):
            raise UnsupportedModelError(
                f"the model is already quantized: node {node.name or node.output[0]!r} is a {node.op_type}; "
                "quantize the float32 model instead")


def provider_warnings(mode: str, providers: Sequence[str]) -> list[str]:
    """Warnings about timing a `mode` model on `providers` (names like 'cpu', 'cuda', 'CUDAExecutionProvider')."""
    mode = normalize_mode(mode)
    names = {p.lower().replace("executionprovider", "") for p in providers}
    warnings = []
    if mode in INT8_MODES and "cuda" in names and "tensorrt" not in names:
        warnings.append("int8 is timed on the CUDA execution provider, which has no int8 kernels: Q/DQ nodes run "
                        "as float ops and latency is not representative; use TensorRT (or CPU) for int8")
    if mode == "fp16" and names <= {"cpu"}:
        warnings.append("the CPU provider has few fp16 kernels (onnxruntime inserts casts), so fp16 is usually "
                        "not faster on CPU; time it on CUDA or TensorRT")
    return warnings


def _to_fp16(model: onnx.ModelProto, exclude: Sequence[str]) -> QuantizeResult:
    from onnxruntime.transformers.float16 import (
        DEFAULT_OP_BLOCK_LIST,
        convert_float_to_float16,
    )

    floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    if not floats and any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
        raise UnsupportedModelError("the model is already float16 (no float32 weights to convert)")
    notes: list[str] = []
    model = _named_copy(model)
    names = {n.name for n in model.graph.node}
    ops = {n.op_type for n in model.graph.node}
    node_block = [e for e in exclude if e in names]
    op_block = [e for e in exclude if e not in names and e in ops]
    unknown = [e for e in exclude if e not in names and e not in ops]
    if unknown:
        raise InputError(f"--exclude {', '.join(unknown)}: no node name or op type in the model matches")
    try:
        # keep_io_types: callers keep feeding float32 and reading float32; casts sit at the boundary.
        result = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False,
                                          op_block_list=list(DEFAULT_OP_BLOCK_LIST) + op_block,
                                          node_block_list=node_block or None)
    except Exception as exc:  # noqa: BLE001 - converter errors vary; one line for the user
        raise UnsupportedModelError(f"fp16 conversion failed: {type(exc).__name__}: {first_line(exc)}") from exc
    _check_loads(result, model)
    notes.append("fp16 weights and activations; model inputs and outputs stay float32")
    if node_block or op_block:
        notes.append(f"kept in float32: {', '.join(node_block + op_block)}")
    return QuantizeResult(model=result, mode="fp16", notes=notes)


def _to_int4(model: onnx.ModelProto, exclude: Sequence[str], block_size: int, symmetric: bool,
             accuracy_level: int | None) -> QuantizeResult:
    require_onnxruntime()
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if block_size < 16 or block_size & (block_size - 1):
        raise InputError(f"--block-size must be a power of two of at least 16, got {block_size}")
    if accuracy_level is not None and accuracy_level not in (0, 1, 2, 3, 4):
        raise InputError(f"--accuracy-level is 0..4 (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8), got {accuracy_level}")
    model = _named_copy(model)
    names = {n.name for n in model.graph.node}
    excluded = [n.name for n in model.graph.node if n.name in exclude or n.op_type in exclude]
    unknown = [e for e in exclude if e not in names and e not in {n.op_type for n in model.graph.node}]
    if unknown:
        raise InputError(f"--exclude {', '.join(unknown)}: no node name or op type in the model matches")
    with _onnxruntime_quantizing(model, "int4"):
        quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=symmetric,
                                         accuracy_level=accuracy_level, nodes_to_exclude=excluded)
        quantizer.process()
        result = quantizer.model.model
    counts = _quantized_node_counts(result)
    if not counts:
        raise UnsupportedModelError("nothing was quantized: int4 weight-only quantization found no MatMul with a "
                                    "constant 2-D weight")
    _check_loads(result, model)
    notes = [f"int4 weight-only (MatMulNBits): blocks of {block_size} along K, "
             f"{'symmetric' if symmetric else 'asymmetric (zero points)'} weights; activations stay float",
             "quantization nodes: " + ", ".join(f"{n} {op}" for op, n in sorted(counts.items()))]
    if excluded:
        notes.append(f"kept in float: {len(excluded)} node(s) ({', '.join(exclude)})")
    return QuantizeResult(model=result, mode="int4", notes=notes)


class _FeedReader:
    """onnxruntime's CalibrationDataReader protocol (get_next returns a feed dict, then None) over a list."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._feeds = feeds
        self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)

    def __len__(self) -> int:
        return len(self._feeds)


def _collect_feeds(model: onnx.ModelProto, calibration: Iterable[dict[str, np.ndarray]] | None):
    if calibration is None:
        raise InputError("static int8 quantization needs calibration data: pass --data FILE "
                         "(or use --mode dynamic, which needs none)")
    inits = {t.name for t in model.graph.initializer}
    needed = [i.name for i in model.graph.input if i.name not in inits]
    feeds = []
    for k, feed in enumerate(calibration):
        missing = [n for n in needed if n not in feed]
        if missing:
            raise InputError(f"calibration batch {k} lacks model input(s) {', '.join(missing)} "
                             f"(it has {', '.join(feed) or 'nothing'})")
        feeds.append({n: np.asarray(feed[n]) for n in needed})
    if not feeds:
        raise InputError("static int8 quantization needs calibration data, but the data given is empty")
    return feeds


def _equal_batches(feeds: list[dict[str, np.ndarray]], notes: list[str]) -> list[dict[str, np.ndarray]]:
    """Re-split feeds into batches of one shape: onnxruntime's histogram calibrators stack every batch's
    outputs into one array, which fails when the last batch is shorter. The batch size becomes the gcd of
    the batch sizes, so no sample is lost; feeds whose inputs disagree on axis 0 are dropped instead."""
    shapes = {_shapes_of(f) for f in feeds}
    if len(shapes) == 1:
        return feeds
    sizes = set()
    for f in feeds:
        first = {v.shape[0] if v.ndim else -1 for v in f.values()}
        sizes.add(first.pop() if len(first) == 1 else -1)
    if -1 in sizes:
        ref = _shapes_of(feeds[0])
        kept = [f for f in feeds if _shapes_of(f) == ref]
        notes.append(f"histogram calibration needs equal batch shapes: used {len(kept)} of {len(feeds)} batches")
        return kept
    step = int(np.gcd.reduce(sorted(sizes)))
    return [{k: v[i:i + step] for k, v in f.items()} for f in feeds
            for i in range(0, next(iter(f.values())).shape[0], step)]


def _shapes_of(feed: dict[str, np.ndarray]) -> tuple:
    return tuple((k, v.shape) for k, v in sorted(feed.items()))


def _choice(value: str, choices: Sequence[str], what: str) -> str:
    key = value.strip().lower()
    if key not in choices:
        raise InputError(f"unknown {what} {value!r} (choose from {', '.join(choices)})")
    return key


def _calibration_method(method: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[method]


def _named_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy where every node has a unique name: exclusions and onnxruntime's quantizer key on names."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    used = {n.name for n in out.graph.node if n.name}
    for i, node in enumerate(out.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)
    return out


def _upgrade_opset(model: onnx.ModelProto, notes: list[str]) -> onnx.ModelProto:
    # QDQ with per-channel scales (the axis attribute) needs opset 13.
    opset = default_opset(model) or 0
    if opset >= 13:
        return model
    try:
        upgraded = onnx.version_converter.convert_version(model, 13)
    except Exception as exc:  # noqa: BLE001 - the converter raises bare RuntimeErrors
        raise UnsupportedModelError(f"int8 needs opset >= 13 and converting from opset {opset} failed: "
                                    f"{first_line(exc)}; re-export the model with opset 13 or later") from exc
    notes.append(f"converted opset {opset} -> 13 (needed for QDQ per-channel scales)")
    return upgraded


def _write(model: onnx.ModelProto, path: Path) -> Path:
    return save_model(model, path, overwrite=True)  # external data past 2 GB, and for lazily loaded models


def _preprocess(src: Path, dst: Path, large: bool, notes: list[str]) -> Path:
    """onnxruntime's quant_pre_process (shape inference, BN folding); on failure go on without it and say so."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with _quiet_ort_logging(), _working_dir(dst.parent):
            quant_pre_process(str(src), str(dst), save_as_external_data=large, all_tensors_to_one_file=large,
                              external_data_location=dst.name + ".data" if large else None)
        onnx.load(str(dst), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - pre-processing is best effort by design
        notes.append(f"pre-processing (quant_pre_process) failed, quantized without it: "
                     f"{type(exc).__name__}: {first_line(exc)}")
        return src
    notes.append("pre-processed with quant_pre_process (shape inference, graph optimization)")
    return dst


def _resolve_exclude(work: onnx.ModelProto, original: onnx.ModelProto, exclude: Sequence[str],
                     notes: list[str]) -> list[str]:
    """Node names to leave in float. Each entry is a node name or an op type; unknown entries are errors."""
    names = {n.name for n in work.graph.node}
    original_names = {n.name for n in original.graph.node}
    ops = {n.op_type for n in original.graph.node} | {n.op_type for n in work.graph.node}
    excluded: list[str] = []
    for entry in exclude:
        if entry in names:
            excluded.append(entry)
        elif entry in original_names:
            notes.append(f"--exclude {entry}: the node was merged away by pre-processing; nothing to exclude")
        elif entry in ops:
            excluded.extend(n.name for n in work.graph.node if n.op_type == entry)
        else:
            raise InputError(f"--exclude {entry}: no node name or op type in the model matches "
                             "(pass node names or op types such as Conv, MatMul)")
    if excluded:
        notes.append(f"kept in float: {len(excluded)} node(s) ({', '.join(exclude)})")
    return excluded


def _gemm_to_matmul(model: onnx.ModelProto, keep: set[str] = frozenset()) -> int:
    """Rewrite Gemm(A, B, C) with constant B as MatMul(A, B') + C, in place, except nodes named in `keep`;
    returns how many.

    onnxruntime's dynamic quantizer covers MatMul but not Gemm, and torch exports every Linear as Gemm.
    Y = alpha * A @ op(B) + beta * C, so alpha and beta fold into the constants B' and C.
    """
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    used = {n.name for n in model.graph.node}
    nodes = []
    count = 0

    def fresh(base: str) -> str:
        name = base
        while name in used:
            name += "_"
        used.add(name)
        return name

    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.name in keep or attrs.get("transA", 0) or len(node.input) < 2
                or node.input[1] not in inits):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            weight = weight.T
        weight = np.ascontiguousarray(weight * np.float32(attrs.get("alpha", 1.0))).astype(weight.dtype)
        w_name = f"{node.input[1]}__matmul_{count}"
        model.graph.initializer.append(numpy_helper.from_array(weight, w_name))
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = f"{node.output[0]}__matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [mm_out], name=fresh(f"{node.name or node.output[0]}_MatMul")))
        if has_bias:
            bias_name = node.input[2]
            beta = attrs.get("beta", 1.0)
            if beta != 1.0:
                if bias_name not in inits:
                    nodes[-1] = node  # a computed bias scaled by beta: leave this Gemm alone
                    model.graph.initializer.pop()
                    continue
                bias = numpy_helper.to_array(inits[bias_name]) * np.float32(beta)
                bias_name = f"{bias_name}__beta_{count}"
                model.graph.initializer.append(numpy_helper.from_array(bias.astype(np.float32), bias_name))
            nodes.append(helper.make_node("Add", [mm_out, bias_name], [node.output[0]], name=fresh(f"{node.name or node.output[0]}_Add")))
        count += 1
    if count:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        _drop_unused_initializers(model)
    return count


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _quantized_node_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in _QUANTIZED_OPS or node.op_type.startswith("QLinear"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@contextlib.contextmanager
def _working_dir(folder: Path) -> Iterator[None]:
    # When symbolic shape inference fails, onnxruntime dumps "sym_shape_infer_temp.onnx" into the current
    # directory; running it from the temporary folder keeps that file out of the user's.
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def _onnxruntime_quantizing(model: onnx.ModelProto, mode: str) -> Iterator[None]:
    """onnxruntime's quantizers, quiet; what they raise becomes one line (after blaming the input if it is
    the model's fault)."""
    try:
        with _quiet_ort_logging():
            yield
    except (InputError, UnsupportedModelError):
        raise
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises many types; the user needs one line
        _blame_input(model)
        raise UnsupportedModelError(f"onnxruntime could not quantize the model ({mode}): "
                                    f"{type(exc).__name__}: {first_line(exc)}") from exc


@contextlib.contextmanager
def _quiet_ort_logging() -> Iterator[None]:
    # onnxruntime.quantization logs warnings (some on the root logger) per tensor it leaves alone; the notes
    # carry what matters, so silence them for the duration and restore the levels afterwards.
    # The histogram calibrators also print() progress, which would corrupt a --json report on stdout.
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
