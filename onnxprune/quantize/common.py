"""What every quantization mode shares: the result, the post-condition that onnxruntime loads it, and the
working folder and logging around onnxruntime's file-based quantizers."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from onnxprune.errors import InputError, UnsupportedModelError, first_line
from onnxprune.runtime.session import load_error

# Ops whose presence means the model was quantized already; quantizing twice stacks scales on scales.

QUANTIZED_OPS = {
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
    "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm", "QAttention", "QOrderedMatMul",
    "DynamicQuantizeLSTM", "MatMulNBits", "QEmbedLayerNormalization",
}


@dataclass

class QuantizeResult:
    """The quantized model, the mode that produced it and notes on what was done (shown to the user)."""

    model: onnx.ModelProto
    mode: str
    notes: list[str] = field(default_factory=list)


def check_loads(result: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """Post-condition: onnxruntime (CPU) can load the result. Blames the input when it cannot load either."""
    error = load_error(result, fallback=False)
    if error is not None:
        blame_input(original)
        raise UnsupportedModelError(f"the quantized model does not load in onnxruntime: {error}; "
                                    "hint: --exclude the op type it names")


def blame_input(original: onnx.ModelProto) -> None:
    """Raise a clear error when the input model itself does not load in onnxruntime (custom ops, ...)."""
    error = load_error(original, fallback=False)
    if error is not None:
        raise UnsupportedModelError(f"onnxruntime cannot run the input model, so it cannot be quantized and "
                                    f"checked: {error}")


def check_not_quantized(model: onnx.ModelProto) -> None:
    """Refuse a model that already holds quantization ops (QDQ, QLinear*, *Integer)."""
    for node in model.graph.node:
        if node.op_type in QUANTIZED_OPS or node.op_type.startswith("QLinear"):
            raise UnsupportedModelError(
                f"the model is already quantized: node {node.name or node.output[0]!r} is a {node.op_type}; "
                "quantize the float32 model instead")


def named_copy(model: onnx.ModelProto) -> onnx.ModelProto:
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


def quantized_node_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in QUANTIZED_OPS or node.op_type.startswith("QLinear"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@contextlib.contextmanager

def working_dir(folder: Path) -> Iterator[None]:
    # When symbolic shape inference fails, onnxruntime dumps "sym_shape_infer_temp.onnx" into the current
    # directory; running it from the temporary folder keeps that file out of the user's.
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager

def onnxruntime_quantizing(model: onnx.ModelProto, mode: str) -> Iterator[None]:
    """onnxruntime's quantizers, quiet; what they raise becomes one line (after blaming the input if it is
    the model's fault)."""
    try:
        with quiet_ort_logging():
            yield
    except (InputError, UnsupportedModelError):
        raise
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises many types; the user needs one line
        blame_input(model)
        raise UnsupportedModelError(f"onnxruntime could not quantize the model ({mode}): "
                                    f"{type(exc).__name__}: {first_line(exc)}") from exc


@contextlib.contextmanager

def quiet_ort_logging() -> Iterator[None]:
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
