"""Spatial ops (pooling, Resize, Pad) and reductions: channels pass through when the op leaves their axis alone.

Pooling, Resize and Pad work on spatial axes of NCHW tensors, so channels must be on axis 1 (a Resize `sizes`
input and Pad `pads` that touch the channel axis are checked). Reductions and Softmax-like ops mix channels
when they run over the channel axis; then the channels freeze.
"""

from __future__ import annotations

import numpy as np

from onnxprune.graph.handlers import Handler, register
from onnxprune.graph.ir import attr
from onnxprune.graph.shape_source import dim_source


@register("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
          "MaxRoiPool", "Upsample")
class Pool(Handler):
    def analyze(self, node, ctx):
        x = ctx.axis_of(node.input[0])
        if x is None:
            return
        if x.axis != 1:
            ctx.freeze(x, f"{node.op_type} {node.name}: pools over the channel axis")
            return
        if len(node.output) > 1 and ctx.view.uses(node.output[1]):
            # MaxPool's indices count positions across channels, so they change when channels go
            ctx.freeze(x, f"{node.op_type} {node.name}: its indices output is used")
            return
        ctx.set_axis(node.output[0], x)


@register("Resize")
class Resize(Handler):
    """Channels pass when the scales or sizes leave the channel axis as it is. Sizes computed at run time pass
    when their channel entry reads the channel dim of a tensor that loses the same channels (upsampling to a
    skip connection's size: `F.interpolate(x, size=y.shape[2:])` takes N and C from x's own Shape)."""

    @staticmethod
    def _entry(node, ctx, axis):
        """Position of the channel axis in scales/sizes: None when opset 18's `axes` leaves it out."""
        axes = attr(node, "axes")
        if axes is None:
            return axis
        rank = ctx.view.rank(node.input[0])
        axes = [a + rank if a < 0 and rank is not None else a for a in axes]
        return axes.index(axis) if axis in axes else None

    def analyze(self, node, ctx):
        x = ctx.axis_of(node.input[0])
        if x is None:
            return
        k = self._entry(node, ctx, x.axis)
        index = 1 if ctx.view.opset < 11 else 2  # opset 10: (X, scales); 11+: (X, roi, scales, sizes)
        scales = node.input[index] if len(node.input) > index else ""
        sizes = node.input[3] if len(node.input) > 3 and ctx.view.opset >= 11 else ""
        if k is None:
            scales = sizes = ""
        if scales:
            arr = ctx.view.array(scales)
            if arr is None:
                ctx.freeze(x, f"Resize {node.name}: scales are computed at run time")
                return
            if arr.size and (arr.size <= k or float(np.ravel(arr)[k]) != 1.0):
                ctx.freeze(x, f"Resize {node.name}: scales the channel axis")
                return
        if sizes and not ctx.view.is_const(sizes):
            src = dim_source(ctx.view, sizes, k)
            other = ctx.axis_of(src.tensor) if src is not None and src.tensor else None
            if other is None or other.axis != src.dim or not ctx.union(x, other):
                ctx.freeze(x, f"Resize {node.name}: the channel entry of its sizes is computed at run time from "
                              "something onnxprune cannot follow")
                return
        elif sizes:
            arr = ctx.view.array(sizes)
            if arr.size and (arr.ndim != 1 or arr.size <= k or int(arr[k]) != x.length):
                ctx.freeze(x, f"Resize {node.name}: sizes change the channel axis")
                return
        ctx.set_axis(node.output[0], x)

    def rewrite(self, node, ctx):
        x = ctx.axis_of(node.input[0])
        if x is None or ctx.axis_of(node.output[0]) is None:
            return
        k = self._entry(node, ctx, x.axis)
        sizes = node.input[3] if len(node.input) > 3 and ctx.opset >= 11 else ""
        arr = ctx.array(sizes) if k is not None and sizes else None
        if arr is not None and arr.size and int(arr[k]) != ctx.new_length(node.input[0]):
            new = arr.copy()
            new[k] = ctx.new_length(node.input[0])
            ctx.set_input_constant(node, 3, new)


@register("Pad")
class Pad(Handler):
    def analyze(self, node, ctx):
        x = ctx.axis_of(node.input[0])
        if x is None:
            return
        pads = attr(node, "pads") if ctx.view.opset < 11 else None
        if pads is None and len(node.input) > 1 and node.input[1]:
            arr = ctx.view.array(node.input[1])
            pads = None if arr is None else arr.tolist()
        if pads is None or (len(node.input) > 3 and node.input[3]):
            ctx.freeze(x, f"Pad {node.name}: pads are not constant or use an axes input")
            return
        rank = len(pads) // 2
        if pads[x.axis] != 0 or pads[x.axis + rank] != 0:
            ctx.freeze(x, f"Pad {node.name}: pads the channel axis")
            return
        ctx.set_axis(node.output[0], x)


REDUCE = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2",
          "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")
_AXES_AS_INPUT = {"ReduceSum": 13}  # others moved axes to an input in opset 18


def _reduce_axes(node, ctx, rank):
    since = _AXES_AS_INPUT.get(node.op_type, 18)
    if ctx.view.opset >= since:
        if len(node.input) < 2 or not node.input[1]:
            return None if attr(node, "noop_with_empty_axes", 0) else list(range(rank))
        arr = ctx.view.array(node.input[1])
        if arr is None:
            return "dynamic"
        axes = arr.tolist()
    else:
        axes = attr(node, "axes")
        if axes is None:
            return list(range(rank))
    return [a + rank if a < 0 else a for a in axes]


@register(*REDUCE)
class Reduce(Handler):
    def analyze(self, node, ctx):
        x = ctx.axis_of(node.input[0])
        if x is None:
            return
        rank = ctx.view.rank(node.input[0])
        axes = _reduce_axes(node, ctx, rank) if rank is not None else "dynamic"
        if axes is None:
            ctx.set_axis(node.output[0], x)
            return
        keep = attr(node, "keepdims", 1)
        if ctx.prune_hidden and node.op_type == "ReduceMean" and axes == [x.axis] and keep:
            # a decomposed LayerNorm's mean or variance: a per-token statistic, computed over fewer features
            # once the hidden size is pruned (approximate, like LayerNormalization itself)
            ctx.approximate.update(x.spaces())
            return
        if axes == "dynamic" or x.axis in axes:
            ctx.freeze(x, f"{node.op_type} {node.name}: reduces over the channel axis")
            return
        new_axis = x.axis if keep else x.axis - sum(1 for a in axes if a < x.axis)
        ctx.set_axis(node.output[0], x.with_axis(new_axis))


@register("Softmax", "LogSoftmax", "Hardmax", "ArgMax", "ArgMin", "CumSum", "TopK")
class AlongAxis(Handler):
    def analyze(self, node, ctx):
        x = ctx.axis_of(node.input[0])
        if x is None:
            return
        rank = ctx.view.rank(node.input[0])
        default = 1 if node.op_type in ("Softmax", "LogSoftmax", "Hardmax") and ctx.view.opset < 13 else -1
        if node.op_type in ("ArgMax", "ArgMin", "TopK"):
            default = 0 if node.op_type != "TopK" else -1
        axis = attr(node, "axis", default)
        if node.op_type == "CumSum":
            arr = ctx.view.array(node.input[1])
            axis = int(np.asarray(arr).ravel()[0]) if arr is not None else None
        if rank is None or axis is None:
            ctx.freeze(x, f"{node.op_type} {node.name}: unknown axis or rank")
            return
        axis = axis + rank if axis < 0 else axis
        if ctx.view.opset < 13 and node.op_type in ("Softmax", "LogSoftmax", "Hardmax") and x.axis >= axis:
            ctx.freeze(x, f"{node.op_type} {node.name}: runs over the channel axis")
            return
        if axis == x.axis:
            ctx.freeze(x, f"{node.op_type} {node.name}: runs over the channel axis")
            return
        new_axis = x.axis
        if node.op_type in ("ArgMax", "ArgMin") and not attr(node, "keepdims", 1) and axis < x.axis:
            new_axis -= 1
        ctx.set_axis(node.output[0], x.with_axis(new_axis))
        if node.op_type == "TopK" and len(node.output) > 1:
            ctx.set_axis(node.output[1], x.with_axis(new_axis))
