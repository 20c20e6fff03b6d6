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
