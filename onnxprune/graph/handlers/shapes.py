"""Shape tensors after pruning: set dims of a target shape (an Expand's, a Reshape's) to new lengths.

A shape input is a constant, or (TorchScript and dynamo exports) a Concat of 1-D pieces, some constant and some
read from Shape at run time, sometimes behind torch's `-1 means keep` arithmetic (Where(Equal(s, -1), 1, s)) or a
Reshape to [-1]. Constant pieces are rewritten; pieces computed at run time follow the new shapes by themselves.
"""

from __future__ import annotations

import numpy as np


def _concat_producer(view, name: str):
    """The Concat node of `view` that builds shape tensor `name` (through torch's -1 arithmetic), or None."""
    for _ in range(6):
        producer = view.producer.get(name)
        if producer is None:
            return None
        if producer.op_type == "Concat":
            return producer
        if producer.op_type == "Where" and len(producer.input) == 3:
            name = producer.input[2]
        elif producer.op_type in ("Cast", "Identity"):
            name = producer.input[0]
        elif producer.op_type == "Reshape" and view.rank(producer.input[0]) == 1:
            name = producer.input[0]
        else:
            return None
    return None


def constant_entry(view, name: str, entry: int) -> int | None:
    """Entry `entry` of shape tensor `name` when it sits in a constant piece of the Concat that builds it
    (`set_shape_dims` rewrites such pieces after pruning), else None."""
    concat = _concat_producer(view, name)
    if concat is None:
        return None
    pos = 0
    for piece in concat.input:
        n = view.dim(piece, 0) if view.rank(piece) == 1 else None
        if n is None:
            return None
        if pos <= entry < pos + n:
            value = view.array(piece)
            return None if value is None else int(np.ravel(value)[entry - pos])
        pos += n
    return None


def shape_concat(ctx, name: str):
    """The Concat (of the model being rewritten) that builds shape tensor `name`, or None."""
    for _ in range(6):
        producer = ctx.view.producer.get(name)
        if producer is None:
            return None
        if producer.op_type == "Concat":
            return next(n for n in ctx.model.graph.node if n.name == producer.name)
        if producer.op_type == "Where" and len(producer.input) == 3:
            name = producer.input[2]  # Where(s == -1, 1, s): the shape itself, with -1 read as "keep"
        elif producer.op_type in ("Cast", "Identity"):
            name = producer.input[0]
        elif producer.op_type == "Reshape" and ctx.view.rank(producer.input[0]) == 1:
            name = producer.input[0]
        else:
            return None
    return None


def set_shape_dims(ctx, node, index: int, dims: dict[int, int]) -> None:
    """Set entries of the shape tensor at input `index` of `node`, where they hold an explicit length (> 1;
    0, -1 and a broadcast 1 follow the input by themselves)."""
    name = node.input[index] if index < len(node.input) else ""
    if not name:
        return
    value = ctx.array(name)
    if value is not None:
        new = _with(value, dims)
        if new is not None:
            ctx.set_input_constant(node, index, new)
        return
    concat = shape_concat(ctx, name)
    if concat is None:
        return
    pos = 0
    for i, piece in enumerate(list(concat.input)):
        n = ctx.view.dim(piece, 0) if ctx.view.rank(piece) == 1 else None
        if n is None:
            return
        local = {k - pos: v for k, v in dims.items() if pos <= k < pos + n}
        value = ctx.array(concat.input[i])
        if local and value is not None:
            new = _with(value, local)
            if new is not None:
                ctx.set_input_constant(concat, i, new)
        pos += n


def _with(value: np.ndarray, dims: dict[int, int]) -> np.ndarray | None:
    flat = np.array(value).ravel()
    changed = False
    for k, v in dims.items():
        if k < flat.size and flat[k] > 1 and flat[k] != v:
            flat[k] = v
            changed = True
    return flat.reshape(np.shape(value)).astype(value.dtype) if changed else None
