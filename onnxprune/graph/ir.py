"""A read-only index over an `onnx.ModelProto`: producers, consumers, constants and inferred shapes.

Handlers see the graph only through this view, so the rest of onnxprune does not depend on how onnx
stores attributes, initializers or value_info.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

Shape = tuple  # of int | None (None: unknown or symbolic)


class GraphView:
    def __init__(self, model: onnx.ModelProto, shapes: dict[str, Shape] | None = None):
        self.model = model
        graph = model.graph
        self.nodes: list[onnx.NodeProto] = list(graph.node)
        self.initializers = {t.name: t for t in graph.initializer}
        self.graph_inputs = [i.name for i in graph.input if i.name not in self.initializers]
        self.graph_outputs = [o.name for o in graph.output]
        # an initializer that is also a graph input can be overridden by the caller: not a constant
        self._overridable = {i.name for i in graph.input if i.name in self.initializers}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        for node in self.nodes:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for idx, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((node, idx))
        self._arrays: dict[str, np.ndarray] = {}
        self.shapes = shapes if shapes is not None else infer_shapes(model)

    def is_const(self, name: str) -> bool:
        return name in self.initializers and name not in self._overridable

    def array(self, name: str) -> np.ndarray | None:
        if not self.is_const(name):
            return None
        if name not in self._arrays:
            self._arrays[name] = numpy_helper.to_array(self.initializers[name])
        return self._arrays[name]

    def shape(self, name: str) -> Shape | None:
        arr = self.array(name)
        if arr is not None:
            return tuple(arr.shape)
        return self.shapes.get(name)

    def rank(self, name: str) -> int | None:
        shape = self.shape(name)
        return None if shape is None else len(shape)

    def dim(self, name: str, axis: int) -> int | None:
        shape = self.shape(name)
        if shape is None or not -len(shape) <= axis < len(shape):
            return None
        return shape[axis]

    def uses(self, name: str) -> int:
        return len(self.consumers.get(name, [])) + (1 if name in self.graph_outputs else 0)

    @property
    def opset(self) -> int:
        for imp in self.model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                return imp.version
        return 0


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


def infer_shapes(model: onnx.ModelProto) -> dict[str, Shape]:
    """Shapes of every tensor onnx's shape inference can reach (symbolic dims become None)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is best effort here; missing shapes freeze groups
        inferred = model
    shapes: dict[str, Shape] = {}
    graph = inferred.graph
    for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            continue
        shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    return shapes
