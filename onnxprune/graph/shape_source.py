"""Where an entry of a shape tensor computed at run time comes from.

Exporters build `sizes` of a Resize, targets of a Reshape and shapes of an Expand from `Shape` of some tensor,
cut by Slice or Gather and put together by Concat (`F.interpolate(x, size=y.shape[2:])`). `dim_source` follows
one entry back through those ops to the dim of the tensor it reads, or to a constant. After pruning a Shape reads
the new shape, so an entry that reads a pruned tensor's channel dim follows the new channel count by itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxprune.graph.ir import attr


@dataclass(frozen=True)
class DimSource:
    tensor: str | None  # the tensor whose dim this entry reads (None: a constant)
    dim: int = -1       # which dim of it (non-negative)
    value: int | None = None  # the constant's value


def dim_source(view, name: str, pos: int, depth: int = 8) -> DimSource | None:
    """The origin of entry `pos` of the 1-D (or scalar, pos 0) integer tensor `name`, or None when unknown."""
    for _ in range(depth):
        arr = view.array(name)
        if arr is not None:
            flat = np.ravel(arr)
            return DimSource(None, value=int(flat[pos])) if 0 <= pos < flat.size else None
        node = view.producer.get(name)
        if node is None:
            return None
        op = node.op_type
        if op in ("Cast", "Identity") or (op in ("Unsqueeze", "Squeeze") and view.rank(node.input[0]) in (0, 1)):
            name = node.input[0]
            if op == "Unsqueeze" and view.rank(node.input[0]) == 0:
                if pos != 0:
                    return None
            continue
        if op == "Where" and len(node.input) == 3:
            name = node.input[2]  # torch's Where(s == -1, 1, s): the shape itself, -1 read as "keep"
            continue
        if op == "Reshape" and view.rank(node.input[0]) == 1 and view.rank(node.output[0]) == 1:
            name = node.input[0]
            continue
        if op == "Shape":
            rank = view.rank(node.input[0])
            if rank is None:
                return None
            start = attr(node, "start", 0)
            start = max(0, start + rank if start < 0 else start)
            dim = start + pos
            return DimSource(node.input[0], dim) if dim < rank else None
        if op == "Gather":
            index = view.array(node.input[1])
            if index is None or attr(node, "axis", 0) != 0:
                return None
            flat = np.ravel(index)
            if index.ndim == 0:
                if pos != 0:
                    return None
                pos = int(flat[0])
            elif 0 <= pos < flat.size:
                pos = int(flat[pos])
            else:
                return None
            length = view.dim(node.input[0], 0)
            if pos < 0:
                if length is None:
                    return None
                pos += length
            name = node.input[0]
            continue
        if op == "Slice" and view.opset >= 10:
            bounds = [view.array(node.input[i]) if len(node.input) > i and node.input[i] else None for i in range(1, 5)]
            starts, ends, axes, steps = bounds
            if starts is None or ends is None or np.size(starts) != 1:
                return None
            if (axes is not None and int(np.ravel(axes)[0]) not in (0, -1)) or (
                    steps is not None and int(np.ravel(steps)[0]) != 1):
                return None
            start = int(np.ravel(starts)[0])
            if start < 0:
                length = view.dim(node.input[0], 0)
                if length is None:
                    return None
                start = max(0, start + length)
            pos += start
            name = node.input[0]
            continue
        if op == "Concat":
            offset = 0
            for piece in node.input:
                n = view.dim(piece, 0) if view.rank(piece) == 1 else (1 if view.rank(piece) == 0 else None)
                if n is None:
                    return None
                if pos < offset + n:
                    pos -= offset
                    name = piece
                    break
                offset += n
            else:
                return None
            continue
        return None
    return None


_ARITHMETIC = frozenset({
    "Shape", "Size", "Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Cast", "Add", "Sub", "Mul", "Div", "Mod",
    "Floor", "Ceil", "Neg", "Abs", "Min", "Max", "Reshape", "Identity", "Range", "Equal", "Where", "ReduceProd",
    "ReduceSum", "ReduceMax", "ReduceMin", "Sqrt"})
_CACHE: "weakref.WeakKeyDictionary" = None  # view -> {name: value or None}


def static_value(view, name: str, max_nodes: int = 48) -> np.ndarray | None:
    """The value of `name` when it is computed from shapes alone and does not depend on the dynamic dims
    (TorchScript's `x.chunk(2, 1)` slices at Shape(x)[1] // 2: the channel count is static, the batch is not).

    The computation (Shape, Gather, arithmetic, Concat ... back to Shape nodes and constants) is evaluated with
    every dynamic dim set to 2 and then to 3; the value counts as static when both agree. None otherwise.
    """
    import weakref

    global _CACHE
    if _CACHE is None:
        _CACHE = weakref.WeakKeyDictionary()
    cache = _CACHE.setdefault(view, {})
    if name not in cache:
        cache[name] = _evaluate_static(view, name, max_nodes)
    return cache[name]


def _evaluate_static(view, name: str, max_nodes: int) -> np.ndarray | None:
    import onnx
    from onnx import helper

    nodes, sources, consts, stack, seen = [], {}, set(), [name], set()
    while stack:
        tensor = stack.pop()
        if not tensor or tensor in seen:
            continue
        seen.add(tensor)
        if view.is_const(tensor):
            consts.add(tensor)
            continue
        node = view.producer.get(tensor)
        if node is None or node.op_type not in _ARITHMETIC or node.domain not in ("", "ai.onnx"):
            return None
        nodes.append(node)
        if len(nodes) > max_nodes:
            return None
        if node.op_type in ("Shape", "Size"):
            shape = view.shape(node.input[0])
            if shape is None:
                return None
            sources[node.input[0]] = shape
            continue
        stack.extend(node.input)
    if not any(n.op_type in ("Shape", "Size") for n in nodes):
        return None  # constants only: normalisation or the constant folder deal with those
    order = {id(n): i for i, n in enumerate(view.nodes)}
    nodes.sort(key=lambda n: order.get(id(n), 0))
    model = helper.make_model(
        helper.make_graph(nodes, "static", [helper.make_tensor_value_info(s, onnx.TensorProto.FLOAT, None)
                                            for s in sources],
                          [helper.make_tensor_value_info(name, 0, None)],
                          [view.initializers[c] for c in consts]),
        opset_imports=view.model.opset_import, ir_version=view.model.ir_version)
    values = []
    try:
        from onnx.reference import ReferenceEvaluator

        evaluator = ReferenceEvaluator(model)
        for dynamic in (2, 3):
            feed = {s: np.broadcast_to(np.zeros((), np.float32), tuple(d if d is not None else dynamic for d in shape))
                    for s, shape in sources.items()}
            values.append(np.asarray(evaluator.run(None, feed)[0]))
    except Exception:  # noqa: BLE001 - what the evaluator cannot run is simply not static
        return None
    if values[0].shape != values[1].shape or not np.array_equal(values[0], values[1]):
        return None
    return values[0]
