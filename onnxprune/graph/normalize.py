"""Before analysis: put the graph in the one form handlers expect.

- local functions (dynamo exports) are inlined, so every op is visible;
- `Constant` nodes become initializers, and so do `Identity` nodes in front of initializers (the TorchScript
  exporter puts them before shared or deduplicated weights), so every constant is an initializer;
- every node gets a unique name, because plans and reports refer to nodes by name;
- a Conv without `kernel_shape` (optional in ONNX: paddle2onnx and hand-built graphs leave it out) gets it from
  its weight's shape, so im2col and the refits read the kernel from the node.
"""

from __future__ import annotations

import onnx
from onnx import numpy_helper


def normalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """The normalised model: `model` itself when it already is (nothing downstream edits it in place), else a
    copy, so a 100 MB model in normal form costs no copy."""
    if _is_normal(model):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if out.functions:
        from onnx import inliner

        out = inliner.inline_local_functions(out)
    _constants_to_initializers(out.graph)
    _unique_names(out.graph)
    _conv_kernel_shapes(out.graph)
    return out


def _is_normal(model: onnx.ModelProto) -> bool:
    graph = model.graph
    if model.functions:
        return False
    inits = {t.name for t in graph.initializer}
    names = [n.name for n in graph.node]
    if not all(names) or len(set(names)) != len(names):
        return False
    if any(_missing_kernel_shape(n, inits) for n in graph.node):
        return False
    return not any(n.op_type == "Constant" or (n.op_type == "Identity" and n.input[0] in inits) for n in graph.node)


def _missing_kernel_shape(node: onnx.NodeProto, inits) -> bool:
    return (node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in inits
            and not any(a.name == "kernel_shape" for a in node.attribute))


def _conv_kernel_shapes(graph: onnx.GraphProto) -> None:
    inits = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if _missing_kernel_shape(node, inits):
            node.attribute.append(onnx.helper.make_attribute("kernel_shape", list(inits[node.input[1]].dims[2:])))


def _constants_to_initializers(graph: onnx.GraphProto) -> None:
    outputs = {o.name for o in graph.output}
    inits = {t.name: t for t in graph.initializer}
    graph_inputs = {i.name for i in graph.input}
    keep = []
    alias: dict[str, str] = {}
    for node in graph.node:
        value = None
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output[0] not in outputs:
            value = _constant_value(node)
        elif (node.op_type == "Identity" and node.input[0] in inits and node.input[0] not in graph_inputs
              and node.output[0] not in outputs):
            # the TorchScript exporter's way of sharing a weight (ALBERT's repeated layer, tied projections):
            # readers of the Identity read the weight itself, so the sharing stays visible (and kept)
            alias[node.output[0]] = node.input[0]
            continue
        if value is None:
            keep.append(node)
            continue
        tensor = numpy_helper.from_array(value, node.output[0])
        graph.initializer.append(tensor)
        inits[tensor.name] = tensor
    for node in keep:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    del graph.node[:]
    graph.node.extend(keep)


def _constant_value(node: onnx.NodeProto):
    import numpy as np

    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    return None  # sparse or string constants stay as nodes


def _unique_names(graph: onnx.GraphProto) -> None:
    seen: set[str] = set()
    for i, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)
