"""float16 conversion (onnxconverter-common through onnxruntime's tools), inputs and outputs kept float32."""

from __future__ import annotations

from collections.abc import Sequence

import onnx

from onnxprune.errors import InputError, UnsupportedModelError, first_line
from onnxprune.quantize.common import QuantizeResult, check_loads, named_copy


def to_fp16(model: onnx.ModelProto, exclude: Sequence[str]) -> QuantizeResult:
    from onnxruntime.transformers.float16 import (
        DEFAULT_OP_BLOCK_LIST,
        convert_float_to_float16,
    )

    floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    if not floats and any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
        raise UnsupportedModelError("the model is already float16 (no float32 weights to convert)")
    notes: list[str] = []
    model = named_copy(model)
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
    check_loads(result, model)
    notes.append("fp16 weights and activations; model inputs and outputs stay float32")
    if node_block or op_block:
        notes.append(f"kept in float32: {', '.join(node_block + op_block)}")
    return QuantizeResult(model=result, mode="fp16", notes=notes)
