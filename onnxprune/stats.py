"""Parameter and multiply-accumulate counts, from initializers and inferred shapes (unknown dims count as 1)."""

from __future__ import annotations

import math

import numpy as np
import onnx

from onnxprune.graph.ir import GraphView, attr, infer_shapes
from onnxprune.model_io import weightless


_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


def count_params(model: onnx.ModelProto) -> int:
    """Float weights, in initializers and in Constant nodes (normalisation turns the latter into the former)."""
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    return sum(math.prod(t.dims) for t in tensors if t.data_type in _FLOATS)


def _numel(shape) -> int:
    return math.prod(d if d else 1 for d in shape) if shape is not None else 0


def count_macs(model: onnx.ModelProto, view: GraphView | None = None) -> int:
    view = view or GraphView(model, shapes=infer_shapes(weightless(model)))
    total = 0
    for node in view.nodes:
        op = node.op_type
        if op in ("Conv", "ConvTranspose") and len(node.input) > 1:
            w = view.shape(node.input[1])
            if w is None:
                continue
            kernel = math.prod(w[2:])
            if op == "Conv":
                total += _numel(view.shape(node.output[0])) * w[1] * kernel
            else:
                total += _numel(view.shape(node.input[0])) * w[1] * kernel
        elif op in ("Gemm", "MatMul"):
            a, b, y = view.shape(node.input[0]), view.shape(node.input[1]), view.shape(node.output[0])
            if a is None or b is None or y is None or not a:
                continue
            k = a[0] if op == "Gemm" and attr(node, "transA", 0) else a[-1]
            total += _numel(y) * (k or 1)
    return int(total)


def summarize(model: onnx.ModelProto) -> dict:
    return {"params": count_params(model), "macs": count_macs(model), "bytes": model.ByteSize()}


def ratio(before: float, after: float) -> float:
    return float(after) / float(before) if before else float(np.nan)
