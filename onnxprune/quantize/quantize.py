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

The modes live in int8.py, int4.py and fp16.py; gemm.py is the Gemm -> MatMul pass; common.py holds what they
share. This module is the entry point: `quantize_model` prepares the call and checks what came back."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx

from onnxprune.choices import QUANTIZE_ALIASES, QUANTIZE_MODES
from onnxprune.errors import InputError, UnsupportedModelError, first_line, require_onnxruntime
from onnxprune.io.model_io import (
    check_supported,
    default_opset,
    model_bytes,
    save_model,
)
from onnxprune.io.weights import is_lazy
from onnxprune.quantize.common import (
    QuantizeResult,
    check_loads,
    check_not_quantized,
    named_copy,
    onnxruntime_quantizing,
    quantized_node_counts,
    quiet_ort_logging,
    working_dir,
)
from onnxprune.quantize.fp16 import to_fp16
from onnxprune.quantize.gemm import gemm_to_matmul
from onnxprune.quantize.int4 import to_int4
from onnxprune.quantize.int8 import METHODS, TARGETS, collect_feeds, equal_batches, run_dynamic, run_static

# "int8" is what `prune --quantize int8` says; it means calibrated static QDQ.
MODES, MODE_ALIASES = QUANTIZE_MODES, QUANTIZE_ALIASES


INT8_MODES = ("static", "dynamic")


_PROTOBUF_LIMIT = 2**31 - 1 - 64 * 2**20


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
        return to_fp16(model, exclude)
    if mode == "int4":
        return to_int4(model, exclude, block_size, symmetric, accuracy_level)
    feeds = collect_feeds(model, calibration) if mode == "static" else []
    require_onnxruntime()

    notes: list[str] = []
    if reduce_range is None:
        # x86 CPUs without VNNI multiply u8 x s8 pairs with VPMADDUBSW, whose int16 sums saturate when weights
        # use the full int8 range; per-channel scales make that the rule. Measured on an sklearn MLP (AVX2):
        # 98.8% top-1 agreement with full-range weights, 100% with 7-bit ones.
        reduce_range = target == "cpu" and per_channel
        if reduce_range:
            notes.append("weights use 7 bits (reduce_range) to avoid int16 saturation on CPUs without VNNI")
    model = _upgrade_opset(named_copy(model), notes)
    large = is_lazy(model) or model_bytes(model) > _PROTOBUF_LIMIT
    with tempfile.TemporaryDirectory(prefix="onnxprune-quant-") as tmp:
        src = _write(model, Path(tmp) / "float.onnx")
        if preprocess:
            src = _preprocess(src, Path(tmp) / "pre.onnx", large, notes)
        work = onnx.load(str(src))
        excluded = _resolve_exclude(work, model, exclude, notes)
        if mode == "dynamic":
            converted = gemm_to_matmul(work, keep=set(excluded))
            if converted:
                notes.append(f"rewrote {converted} Gemm node(s) as MatMul+Add so dynamic int8 can cover them")
                src = _write(work, Path(tmp) / "matmul.onnx")
        out = Path(tmp) / "quant.onnx"
        with onnxruntime_quantizing(model, mode):
            if mode == "static":
                if method != "minmax":
                    feeds = equal_batches(feeds, notes)
                notes.append(run_static(src, out, feeds, method, per_channel, reduce_range, target, excluded, large))
            else:
                notes.extend(run_dynamic(src, out, work, per_channel, reduce_range, target, excluded, large))
        result = onnx.load(str(out))  # reads external data from tmp while it still exists
    counts = quantized_node_counts(result)
    if not counts:
        raise UnsupportedModelError(
            f"nothing was quantized: {mode} int8 found no quantizable node "
            f"(op types in the model: {', '.join(sorted({n.op_type for n in model.graph.node}))})")
    notes.append("quantization nodes: " + ", ".join(f"{n} {op}" for op, n in sorted(counts.items())))
    if not large:
        check_loads(result, model)
    return QuantizeResult(model=result, mode=mode, notes=notes)


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


def _choice(value: str, choices: Sequence[str], what: str) -> str:
    key = value.strip().lower()
    if key not in choices:
        raise InputError(f"unknown {what} {value!r} (choose from {', '.join(choices)})")
    return key


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
        with quiet_ort_logging(), working_dir(dst.parent):
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
