"""int4 weight-only quantization: MatMul with a constant 2-D weight becomes com.microsoft MatMulNBits."""

from __future__ import annotations

from collections.abc import Sequence

import onnx

from onnxprune.errors import InputError, UnsupportedModelError, require_onnxruntime
from onnxprune.quantize.common import (
    QuantizeResult,
    check_loads,
    named_copy,
    onnxruntime_quantizing,
    quantized_node_counts,
)


def to_int4(model: onnx.ModelProto, exclude: Sequence[str], block_size: int, symmetric: bool,
             accuracy_level: int | None) -> QuantizeResult:
    require_onnxruntime()
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if block_size < 16 or block_size & (block_size - 1):
        raise InputError(f"--block-size must be a power of two of at least 16, got {block_size}")
    if accuracy_level is not None and accuracy_level not in (0, 1, 2, 3, 4):
        raise InputError(f"--accuracy-level is 0..4 (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8), got {accuracy_level}")
    model = named_copy(model)
    names = {n.name for n in model.graph.node}
    excluded = [n.name for n in model.graph.node if n.name in exclude or n.op_type in exclude]
    unknown = [e for e in exclude if e not in names and e not in {n.op_type for n in model.graph.node}]
    if unknown:
        raise InputError(f"--exclude {', '.join(unknown)}: no node name or op type in the model matches")
    with onnxruntime_quantizing(model, "int4"):
        quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=symmetric,
                                         accuracy_level=accuracy_level, nodes_to_exclude=excluded)
        quantizer.process()
        result = quantizer.model.model
    counts = quantized_node_counts(result)
    if not counts:
        raise UnsupportedModelError("nothing was quantized: int4 weight-only quantization found no MatMul with a "
                                    "constant 2-D weight")
    check_loads(result, model)
    notes = [f"int4 weight-only (MatMulNBits): blocks of {block_size} along K, "
             f"{'symmetric' if symmetric else 'asymmetric (zero points)'} weights; activations stay float",
             "quantization nodes: " + ", ".join(f"{n} {op}" for op, n in sorted(counts.items()))]
    if excluded:
        notes.append(f"kept in float: {len(excluded)} node(s) ({', '.join(exclude)})")
    return QuantizeResult(model=result, mode="int4", notes=notes)
