"""Parameter and multiply-accumulate counts, from initializers and inferred shapes (unknown dims count as 1)."""

from __future__ import annotations

import math

import numpy as np
import onnx

from onnxprune.graph.ir import GraphView, attr, infer_shapes, infer_symbolic_shapes
from onnxprune.io.model_io import model_bytes, weightless


_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


def count_params(model: onnx.ModelProto) -> int:
    """Float weights, in initializers and in Constant nodes (normalisation turns the latter into the former)."""
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    return sum(math.prod(t.dims) for t in tensors if t.data_type in _FLOATS)


def numel(shape) -> int:
    return math.prod(d if d else 1 for d in shape) if shape is not None else 0


def _bound(model: onnx.ModelProto, input_shapes: dict | None = None) -> onnx.ModelProto:
    """A weightless copy with every dynamic input dim (symbolic, missing, 0 or -1) set to 1, or to what
    `input_shapes` gives, so that shape arithmetic (Shape→Gather→Concat→Reshape, as the TorchScript exporter
    writes it) folds to static shapes: MACs are per sample and, for sequence models, per token."""
    light = weightless(model)
    for inp in light.graph.input:
        given = (input_shapes or {}).get(inp.name)
        dims = inp.type.tensor_type.shape.dim
        for i, d in enumerate(dims):
            if given is not None and i < len(given) and len(given) == len(dims):
                d.dim_value = int(given[i])
            elif not (d.HasField("dim_value") and d.dim_value > 0):
                d.dim_value = 1
    for out in light.graph.output:
        for d in out.type.tensor_type.shape.dim:
            if d.HasField("dim_value") and d.dim_value <= 0:
                d.Clear()
    del light.graph.value_info[:]
    return light


_COUNTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _shapes(model: onnx.ModelProto, input_shapes: dict | None = None) -> dict:
    """Static shapes of the bound model: onnxruntime's symbolic inference folds the Div/Cast arithmetic that
    onnx's data propagation does not; onnx's own inference fills in whatever that leaves unknown."""
    bound = _bound(model, input_shapes)
    shapes = infer_shapes(bound)
    needed = [name for n in model.graph.node if n.op_type in _COUNTED for name in (n.input[0], n.output[0])]
    if all(shapes.get(name) is not None and None not in shapes[name] for name in needed):
        return shapes
    for name, shape in infer_symbolic_shapes(bound).items():
        if shape and all(d is not None for d in shape):
            shapes[name] = shape
    return shapes


def _static(view: GraphView) -> bool:
    """Whether the view's shapes are all known (then they can be reused for counting)."""
    return all(d is not None for shape in view.shapes.values() for d in shape)


def count_macs(model: onnx.ModelProto, view: GraphView | None = None, input_shapes: dict | None = None) -> int:
    """MACs at the given input shapes (dynamic dims 1 where none are given)."""
    if input_shapes or view is None or not _static(view):
        view = GraphView(model, shapes=_shapes(model, input_shapes))
    return int(sum(node_macs(view).values()))


def node_macs(view: GraphView) -> dict[str, int]:
    """MACs of every Conv/ConvTranspose/Gemm/MatMul node, by node name (unknown dims count as 1)."""
    macs = {}
    for node in view.nodes:
        op = node.op_type
        if op in ("Conv", "ConvTranspose") and len(node.input) > 1:
            w = view.shape(node.input[1])
            if w is None:
                continue
            # Conv: one MAC per output element and kernel tap of its group; ConvTranspose: per input element
            src = node.output[0] if op == "Conv" else node.input[0]
            macs[node.name] = numel(view.shape(src)) * w[1] * math.prod(w[2:])
        elif op in ("Gemm", "MatMul"):
            a, b, y = view.shape(node.input[0]), view.shape(node.input[1]), view.shape(node.output[0])
            if a is None or b is None or y is None or not a:
                continue
            k = a[0] if op == "Gemm" and attr(node, "transA", 0) else a[-1]
            macs[node.name] = numel(y) * (k or 1)
    return macs


def summarize(model: onnx.ModelProto) -> dict:
    return {"params": count_params(model), "macs": count_macs(model), "bytes": model_bytes(model)}


def ratio(before: float, after: float) -> float:
    return float(after) / float(before) if before else float(np.nan)
