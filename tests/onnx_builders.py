"""Tiny ONNX graphs for per-handler tests, built with onnx.helper and seeded random weights."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build(nodes, inputs: dict[str, list], outputs: list[str], weights: dict, opset: int = 17,
          seed: int = 0) -> onnx.ModelProto:
    """nodes: (op_type, [inputs], [outputs], {attrs}) tuples; weights: name -> shape or array."""
    rng = np.random.default_rng(seed)
    inits = []
    for name, spec in weights.items():
        arr = spec if isinstance(spec, np.ndarray) else rng.standard_normal(spec).astype(np.float32)
        if arr.dtype == np.float32 and arr.ndim > 0 and not isinstance(spec, np.ndarray):
            arr = arr * 0.5
        inits.append(numpy_helper.from_array(arr, name))
    graph_nodes = [helper.make_node(op, ins, outs, name=f"{op.lower()}_{i}", **(attrs[0] if attrs else {}))
                   for i, (op, ins, outs, *attrs) in enumerate(nodes)]
    graph = helper.make_graph(
        graph_nodes, "test",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def init_shape(model: onnx.ModelProto, prefix: str) -> tuple:
    """Shape of the (possibly renamed) initializer feeding the input that was called `prefix`."""
    for t in model.graph.initializer:
        if t.name == prefix or t.name.startswith(prefix + "__pruned"):
            return tuple(t.dims)
    raise KeyError(prefix)
