"""Concat, Split and Slice: channels of several spaces side by side on one axis.

Concat on the channel axis shifts each input's segments by the lengths before it (an input without tracked
channels, such as a graph input, becomes a frozen stretch). Split and Slice cut the axis; a cut through the
middle of a segment cannot be followed, so it freezes that input. After pruning, split sizes and slice bounds
are recomputed from the surviving positions.
"""

from __future__ import annotations

import numpy as np

from onnxprune.graph.handlers import Handler, register
from onnxprune.graph.ir import attr, set_attr
from onnxprune.graph.layout import concat_axes
from onnxprune.graph.shape_source import static_value


def _norm(axis: int, rank: int | None) -> int | None:
    if rank is None:
        return None
    return axis + rank if axis < 0 else axis


@register("Concat")
class Concat(Handler):
    def analyze(self, node, ctx):
        carried = [ctx.axis_of(n) for n in node.input]
        if all(c is None for c in carried):
            return
        axis = _norm(attr(node, "axis"), ctx.view.rank(node.output[0]) or ctx.view.rank(node.input[0]))
        axes = {c.axis for c in carried if c is not None}
        if axes == {axis}:
            parts = []
            for name, c in zip(node.input, carried):
                if c is not None:
                    parts.append(c)
                    continue
                length = ctx.view.dim(name, axis)
                if length is None:
                    ctx.freeze_inputs(node, f"length of input {name} on the concat axis is unknown")
                    return
                if length:
                    parts.append(ctx.frozen_axis(node, axis, length, f"Concat {node.name}: input {name} is not prunable"))
            ctx.set_axis(node.output[0], concat_axes(parts, axis))
            return
        if len(axes) == 1:
            # concatenation along another axis (tokens): every input carries the same channels; a constant
            # input (ViT's class token, often through Expand) is sliced with them
            first = next(c for c in carried if c is not None)
            if all(ctx.union(first, c) if c is not None else _slice_constant(ctx, node, i, first)
                   or _past_cache(ctx, node, i, first) for i, c in enumerate(carried)):
                ctx.set_axis(node.output[0], first)
                if any(_past_source(ctx, name) in ctx.cache for name in node.input):
                    ctx.mark_cache(node.output[0])  # present key/value = past ++ new
                return
        ctx.freeze_inputs(node, "inputs carry channels on different axes")


def _past_source(ctx, name: str) -> str:
    """The graph input `name` passes on unchanged (through Identity, Cast, a one-input Concat), or `name`."""
    while name not in ctx.view.graph_inputs:
        producer = ctx.view.producer.get(name)
        if producer is None or producer.op_type not in ("Identity", "Cast", "Concat") or \
                len([i for i in producer.input if i]) != 1:
            break
        name = producer.input[0]
    return name


def _past_cache(ctx, node, index, layout) -> bool:
    """A decoder's past key/value cache (a graph input named past...) concatenated with the new keys or values
    along the sequence: it holds the same heads (analysis.AnalysisContext.follow_cache)."""
    source = _past_source(ctx, node.input[index])
    return source in ctx.view.graph_inputs and "past" in source.lower() and ctx.follow_cache(node, index, layout)


def _slice_constant(ctx, node, index, layout) -> bool:
    """Make input `index` of `node` (no channels of its own) follow `layout`: a constant, or a constant
    broadcast by an Expand read by this node only, is sliced along the channel axis."""
    name = node.input[index]
    if ctx.view.is_const(name):
        return ctx.view.dim(name, layout.axis) == layout.length and ctx.add_member(
            node, index, layout.axis, layout, "pass", scored=False)
    producer = ctx.view.producer.get(name)
    if producer is None or producer.op_type != "Expand" or ctx.view.uses(name) != 1 \
            or not ctx.view.is_const(producer.input[0]):
        return False
    out_rank, data_rank = ctx.view.rank(name), ctx.view.rank(producer.input[0])
    if out_rank is None or data_rank is None or layout.axis - (out_rank - data_rank) < 0:
        return False
    axis = layout.axis - (out_rank - data_rank)
    if ctx.view.dim(producer.input[0], axis) != layout.length:
        return False
    return ctx.add_member(producer, 0, axis, layout.with_axis(axis), "pass", scored=False)


def _split_sizes(node, ctx, length):
    """Split sizes from the attribute (opset < 13), the input (13+), or equal parts."""
    if ctx.view.opset < 13:
        split = attr(node, "split")
    elif len(node.input) > 1 and node.input[1]:
        arr = ctx.view.array(node.input[1])
        if arr is None:
            arr = static_value(ctx.view, node.input[1])
        if arr is None:
            return None
        split = arr.tolist()
    else:
        split = None
    if split is None:
        n = len(node.output)
        if length is None:
            return None
        part = -(-length // n)  # opset 18 num_outputs: ceil, last one smaller
        split = [min(part, length - i * part) for i in range(n)]
    return [int(s) for s in split]


@register("Split")
class Split(Handler):
    def analyze(self, node, ctx):
        x = ctx.axis_of(node.input[0])
        if x is None:
            return
        axis = _norm(attr(node, "axis", 0), ctx.view.rank(node.input[0]))
        if axis != x.axis:
            for out in node.output:
                ctx.set_axis(out, x)
            return
        sizes = _split_sizes(node, ctx, x.length)
        if sizes is None or sum(sizes) != x.length:
            ctx.freeze(x, f"Split {node.name}: split sizes are not constant")
            return
        start, parts = 0, []
        for size in sizes:
            part = x.cut(start, start + size)
            if part is None:
                ctx.freeze(x, f"Split {node.name}: splits inside a group of coupled channels")
                return
            parts.append(part.with_axis(axis))
            start += size
        for out, part in zip(node.output, parts):
            ctx.set_axis(out, part)

    def rewrite(self, node, ctx):
        x = ctx.axis_of(node.input[0])
        if x is None or ctx.axis_of(node.output[0]) is None or ctx.axis_of(node.output[0]).length == x.length:
            return
        sizes = [ctx.new_length(out) for out in node.output]
        if ctx.opset < 13:
            set_attr(node, "split", sizes)
            return
        for i, a in enumerate(node.attribute):
            if a.name == "num_outputs":
                del node.attribute[i]
                break
        if len(node.input) < 2:
            node.input.append(f"{node.name}_split")  # opset 18 num_outputs: sizes move to the split input
        ctx.set_input_constant(node, 1, np.array(sizes, dtype=np.int64))


def _slice_params(node, ctx):
    """(starts, ends, axes, steps) as lists, or None when any is not constant."""
    if ctx.view.opset < 10:
        starts, ends = attr(node, "starts"), attr(node, "ends")
        axes = attr(node, "axes", list(range(len(starts))))
        return starts, ends, axes, [1] * len(starts)
    vals = []
    for i in range(1, 5):
        name = node.input[i] if len(node.input) > i else ""
        if not name:
            vals.append(None)
            continue
        arr = ctx.view.array(name)
        if arr is None:
            arr = static_value(ctx.view, name)  # computed from static dims (TorchScript's chunk): a constant
        if arr is None:
            return None
        vals.append(arr.tolist())
    starts, ends, axes, steps = vals
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    return starts, ends, axes, steps


def _slice_axes(node, ctx, rank: int) -> list[int]:
    """The axes a Slice cuts when its bounds are not constant: from its axes input, or the leading axes that its
    starts cover; all axes when neither is known."""
    if ctx.view.opset >= 10 and len(node.input) > 3 and node.input[3]:
        axes = ctx.view.array(node.input[3])
        if axes is not None:
            return [_norm(int(a), rank) for a in np.ravel(axes)]
        return list(range(rank))
    n = ctx.view.dim(node.input[1], 0) if ctx.view.opset >= 10 else len(attr(node, "starts", []) or [])
    return list(range(n)) if n is not None else list(range(rank))


def _bounds_unaffected(node, ctx) -> bool:
    """Whether the Slice's computed bounds give the same values in the pruned graph: every Shape or Size they
    are computed from reads a tensor whose channels are all kept (constant bounds are unaffected too)."""
    producer = {o: n for n in ctx.model.graph.node for o in n.output if o}
    todo, seen = [x for x in node.input[1:] if x], set()
    while todo:
        name = todo.pop()
        if name in seen or name not in producer:
            continue
        seen.add(name)
        source = producer[name]
        if source.op_type in ("Shape", "Size"):
            axis = ctx.axis_of(source.input[0])
            kept = ctx.kept_positions(source.input[0])
            if axis is not None and kept is not None and len(kept) != axis.length:
                return False
            continue
        todo.extend(x for x in source.input if x)
    return True


@register("Slice")
class Slice(Handler):
    def analyze(self, node, ctx):
        x = ctx.axis_of(node.input[0])
        if x is None:
            return
        params = _slice_params(node, ctx)
        rank = ctx.view.rank(node.input[0])
        if params is None and rank is not None and x.axis not in _slice_axes(node, ctx, rank):
            # computed bounds on another axis (rotary embeddings' halves of head_dim): channels pass
            ctx.set_axis(node.output[0], x)
            return
        if params is None or rank is None:
            ctx.freeze(x, f"Slice {node.name}: bounds are not constant")
            return
        starts, ends, axes, steps = params
        axes = [_norm(a, rank) for a in axes]
        if x.axis not in axes:
            ctx.set_axis(node.output[0], x)
            return
        k = axes.index(x.axis)
        if steps[k] != 1:
            ctx.freeze(x, f"Slice {node.name}: strided slice of the channel axis")
            return
        start, stop, _ = slice(starts[k], ends[k]).indices(x.length)
        part = x.cut(start, max(start, stop))
        if part is None:
            ctx.freeze(x, f"Slice {node.name}: slices inside a group of coupled channels")
            return
        ctx.set_axis(node.output[0], part.with_axis(x.axis))

    def rewrite(self, node, ctx):
        x = ctx.axis_of(node.input[0])
        out = ctx.axis_of(node.output[0])
        if x is None or out is None or out.length == x.length and out.segments == x.segments:
            return
        starts, ends, axes, _ = _slice_params(node, ctx)
        rank = ctx.view.rank(node.input[0])
        k = [_norm(a, rank) for a in axes].index(x.axis)
        start, stop, _ = slice(starts[k], ends[k]).indices(x.length)
        kept = ctx.kept_positions(node.input[0])
        new_start = int(np.searchsorted(kept, start))
        new_stop = int(np.searchsorted(kept, stop))
        if (new_start, new_stop) == (start, stop) and _bounds_unaffected(node, ctx):
            # the bounds stay what the graph computes: left computed (YOLOv8's C2f splits a tensor in halves
            # by Shape arithmetic; pinned to constants, onnxruntime CPU ran the model 3.5 % slower)
            return
        starts, ends = list(starts), list(ends)
        starts[k], ends[k] = new_start, new_stop
        if ctx.opset < 10:
            set_attr(node, "starts", starts)
            set_attr(node, "ends", ends)
        else:
            for index, values in ((1, starts), (2, ends)):
                old = ctx.array(node.input[index])
                dtype = old.dtype if old is not None else static_value(ctx.view, node.input[index]).dtype
                ctx.set_input_constant(node, index, np.array(values, dtype=dtype))
