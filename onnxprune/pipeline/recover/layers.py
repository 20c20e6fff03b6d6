"""The linear layers recovery refits: which Conv/Gemm/MatMul nodes a plan affects, and reading and writing
their weights and biases in the pruned model (a shared initializer is copied on write)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.graph.ir import attr
from onnxprune.io.weights import tensor_array


@dataclass

class Layer:
    """One linear layer of the original model, seen as rows x (features) -> y (outputs)."""

    node: onnx.NodeProto
    kind: str                 # conv, gemm, matmul
    in_kept: np.ndarray       # kept positions of the input channel axis
    out_kept: np.ndarray      # kept positions of the output axis
    in_length: int
    bias_add: tuple | None = None  # MatMul: (Add node, constant input index) that holds its bias
    # (Add node, index of its other input) when the layer's (biased) output is added to a residual stream
    residual: tuple | None = None

    @property
    def kernel(self) -> int:
        return int(np.prod(attr(self.node, "kernel_shape", []) or [1])) if self.kind == "conv" else 1

    def kept_columns(self) -> np.ndarray:
        k = self.kernel
        return (self.in_kept[:, None] * k + np.arange(k)[None, :]).ravel()

    def removed_columns(self) -> np.ndarray:
        return np.setdiff1d(np.arange(self.in_length * self.kernel), self.kept_columns())


def _linear_kind(node, view) -> str | None:
    if len(node.input) < 2 or view.array(node.input[1]) is None:
        return None
    if node.op_type == "Conv":
        rank = view.rank(node.input[0])
        if rank in (3, 4) and attr(node, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET"):
            return "conv"
    elif node.op_type == "Gemm":
        if not attr(node, "transA", 0) and attr(node, "alpha", 1.0) == 1.0 and attr(node, "beta", 1.0) == 1.0:
            bias = view.array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if len(node.input) < 3 or not node.input[2] or (bias is not None and bias.ndim == 1):
                return "gemm"
    elif node.op_type == "MatMul" and view.array(node.input[1]).ndim == 2:
        return "matmul"
    return None


def find_layers(prep, plan, all_affected: bool) -> tuple[list[Layer], list[str]]:
    """Linear layers that read pruned channels and, with `all_affected`, every one downstream of them."""
    view, analysis = prep.view, prep.analysis
    find = analysis.find
    pruned = set(plan.kept)
    reads: dict[str, list] = {}
    for m in analysis.context.members:
        if m.role == "in" and any(find(s.space) in pruned for s in m.layout.segments):
            reads.setdefault(m.node, []).append(m)
    affected: set[str] = set()
    layers, notes = [], []
    for node in view.nodes:
        changed_input = bool(node.input) and node.input[0] in affected
        if node.name in reads or changed_input:
            affected.update(o for o in node.output if o)
        if node.name not in reads and not (all_affected and changed_input):
            continue
        kind = _linear_kind(node, view)
        if kind == "conv" and attr(node, "group", 1) != 1:
            kind = None
        if kind is None:
            if node.name in reads:
                notes.append(f"{node.op_type} {node.name}: not refit (only plain Conv, Gemm and MatMul layers are)")
            continue
        weight = view.array(node.input[1])
        in_axis = {"conv": 1, "gemm": 1 if attr(node, "transB", 0) else 0, "matmul": 0}[kind]
        in_len = weight.shape[in_axis]
        in_kept = np.arange(in_len)
        if node.name in reads:
            member = next(m for m in reads[node.name] if m.input_index == 1)
            in_kept = member.layout.kept_positions(plan.kept, find)
        out_axis = analysis.context.axes.get(node.output[0])
        out_len = weight.shape[0] if kind == "conv" or (kind == "gemm" and attr(node, "transB", 0)) else weight.shape[1]
        out_kept = out_axis.kept_positions(plan.kept, find) if out_axis is not None else np.arange(out_len)
        layer = Layer(node, kind, in_kept, out_kept, in_len)
        if kind == "matmul":
            layer.bias_add = _matmul_bias(node, view, out_len)
        if len(out_kept) == out_len:
            layer.residual = _residual_add(layer, view)
        layers.append(layer)
    return layers, notes


def _matmul_bias(node, view, n: int):
    users = view.consumers.get(node.output[0], [])
    if len(users) == 1 and users[0][0].op_type == "Add":
        add = users[0][0]
        other = 1 - users[0][1]
        arr = view.array(add.input[other])
        if arr is not None and arr.shape[-1:] == (n,) and arr.size == n:
            return add, other
    return None


def _residual_add(layer: Layer, view):
    """(Add, other input index) when the layer's output, after its bias, joins a residual stream of its shape."""
    out = layer.bias_add[0].output[0] if layer.bias_add is not None else layer.node.output[0]
    users = view.consumers.get(out, [])
    if len(users) != 1 or users[0][0].op_type != "Add":
        return None
    add, index = users[0]
    other = add.input[1 - index]
    if view.array(other) is not None or view.shape(other) != view.shape(out):
        return None
    return add, 1 - index


class Params:
    """Reads and writes the constants of the pruned model's nodes, copying a shared initializer on write."""

    def __init__(self, model: onnx.ModelProto, writer=None):
        self.model = model
        self.writer = writer  # lazy models: new values go to the workspace's data file (weights.TensorWriter)
        self.nodes = {n.name: n for n in model.graph.node}
        self.inits = {t.name: t for t in model.graph.initializer}

    def get(self, node_name: str, index: int) -> np.ndarray | None:
        node = self.nodes[node_name]
        if index >= len(node.input) or not node.input[index] or node.input[index] not in self.inits:
            return None
        return tensor_array(self.inits[node.input[index]])

    def set(self, node_name: str, index: int, value: np.ndarray, base: str) -> None:
        node = self.nodes[node_name]
        current = node.input[index] if index < len(node.input) else ""
        uses = sum(1 for n in self.model.graph.node for i in n.input if current and i == current)
        if current in self.inits and uses == 1 and current not in {o.name for o in self.model.graph.output}:
            tensor = self.inits[current]
            if self.writer is not None and self.writer.overwrite(tensor, value):
                return
            self.inits[current].CopyFrom(self._tensor(value, current))
            return
        name = f"{base}__recovered"
        k = 1
        while name in self.inits:
            k += 1
            name = f"{base}__recovered{k}"
        tensor = self._tensor(value, name)
        self.model.graph.initializer.append(tensor)
        self.inits[name] = tensor
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = name

    def _tensor(self, value: np.ndarray, name: str) -> onnx.TensorProto:
        if self.writer is not None and value.size > 256:
            return self.writer.write(name, value)
        return numpy_helper.from_array(value, name)


def current_params(layer: Layer, params: Params) -> tuple[np.ndarray, np.ndarray | None]:
    """The pruned layer's weights as [features, outputs] and its bias (None when it has none)."""
    w = params.get(layer.node.name, 1).astype(np.float64)
    if layer.kind == "conv":
        wt = w.reshape(w.shape[0], -1).T
        bias = params.get(layer.node.name, 2)
    elif layer.kind == "gemm":
        wt = w.T if attr(layer.node, "transB", 0) else w
        bias = params.get(layer.node.name, 2)
    else:
        wt = w
        bias = None
        if layer.bias_add is not None:
            add, idx = layer.bias_add
            bias = params.get(add.name, idx)
    return wt, None if bias is None else bias.astype(np.float64).reshape(-1)


def write_layer(layer: Layer, params: Params, wt: np.ndarray, bias: np.ndarray | None, dtype) -> None:
    node = layer.node
    old = params.get(node.name, 1)
    if layer.kind == "conv":
        w = wt.T.reshape(old.shape)
    elif layer.kind == "gemm" and attr(node, "transB", 0):
        w = wt.T
    else:
        w = wt
    params.set(node.name, 1, w.astype(dtype), node.input[1].split("__")[0])
    if bias is None:
        return
    if layer.kind == "matmul":
        add, idx = layer.bias_add
        old_b = params.get(add.name, idx)
        params.set(add.name, idx, bias.reshape(old_b.shape).astype(old_b.dtype), add.input[idx].split("__")[0])
    else:
        params.set(node.name, 2, bias.astype(dtype), (node.input[2] if len(node.input) > 2 and node.input[2]
                                                       else node.name.strip("/").replace("/", "_") + "_bias"))


def original_wt(prep, layer: Layer) -> np.ndarray:
    w = prep.view.array(layer.node.input[1]).astype(np.float64)
    if layer.kind == "conv":
        return w.reshape(w.shape[0], -1).T
    if layer.kind == "gemm" and attr(layer.node, "transB", 0):
        return w.T
    return w
