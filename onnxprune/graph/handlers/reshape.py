"""Layout ops: Transpose, Squeeze/Unsqueeze move the channel axis; Flatten and Reshape merge it with others.

When the channel axis is merged with `leading` dims before it and `trailing` dims after it, channel c becomes
the features { l * C * trailing + c * trailing + t }: every segment's `inner` is multiplied by `trailing` and a
block of `leading` repeats is added (NHWC → Flatten puts the spatial dims in front of the channels). A Reshape
that splits the channel axis itself (channel shuffle, attention heads) is followed only when the channels stay
whole on one output axis; otherwise it freezes.
"""

from __future__ import annotations

import math

import numpy as np

from onnxprune.graph.handlers import Handler, register
from onnxprune.graph.ir import attr


@register("Transpose")
class Transpose(Handler):
    def analyze(self, node, ctx):
        x = ctx.axis_of(node.input[0])
        if x is None:
            return
        rank = ctx.view.rank(node.input[0])
        perm = attr(node, "perm", list(range(rank - 1, -1, -1)) if rank is not None else None)
        if perm is None:
            ctx.freeze(x, f"Transpose {node.name}: unknown rank")
            return
        ctx.set_axis(node.output[0], x.with_axis(list(perm).index(x.axis)))


def _axes(node, ctx):
    if ctx.view.opset >= 13 and len(node.input) > 1 and node.input[1]:
        arr = ctx.view.array(node.input[1])
        return None if arr is None else [int(a) for a in np.ravel(arr)]
    return attr(node, "axes")


@register("Squeeze")
class Squeeze(Handler):
    def analyze(self, node, ctx):
        x = ctx.axis_of(node.input[0])
        if x is None:
            return
        shape = ctx.view.shape(node.input[0])
        axes = _axes(node, ctx)
        if axes is None and shape is not None and all(d is not None for d in shape):
            axes = [i for i, d in enumerate(shape) if d == 1]
        if axes is None or shape is None:
            ctx.freeze(x, f"Squeeze {node.name}: axes unknown")
            return
        axes = [a + len(shape) if a < 0 else a for a in axes]
        if x.axis in axes:
            ctx.freeze(x, f"Squeeze {node.name}: squeezes the channel axis")
            return
        ctx.set_axis(node.output[0], x.with_axis(x.axis - sum(1 for a in axes if a < x.axis)))


@register("Unsqueeze")
class Unsqueeze(Handler):
    def analyze(self, node, ctx):
        x = ctx.axis_of(node.input[0])
        if x is None:
            return
        rank = ctx.view.rank(node.input[0])
        axes = _axes(node, ctx)
        if axes is None or rank is None:
            ctx.freeze(x, f"Unsqueeze {node.name}: axes unknown")
            return
        out_rank = rank + len(axes)
        axes = sorted(a + out_rank if a < 0 else a for a in axes)
        kept = [i for i in range(out_rank) if i not in axes]
        ctx.set_axis(node.output[0], x.with_axis(kept[x.axis]))


@register("Flatten")
class Flatten(Handler):
    def analyze(self, node, ctx):
        x = ctx.axis_of(node.input[0])
        if x is None:
            return
        shape = ctx.view.shape(node.input[0])
        if shape is None:
            ctx.freeze(x, f"Flatten {node.name}: unknown input shape")
            return
        k = attr(node, "axis", 1)
        k = k + len(shape) if k < 0 else k
        if x.axis < k:
            ctx.freeze(x, f"Flatten {node.name}: merges the channel axis into the batch axis")
            return
        merged = _merge(x, shape, k, len(shape), 1)
        if merged is None:
            ctx.freeze(x, f"Flatten {node.name}: dims next to the channel axis are not static")
            return
        ctx.set_axis(node.output[0], merged)


def _merge(x, shape, start, stop, new_axis):
    """The channel axis after dims [start, stop) of `shape` (which contain it) are merged into `new_axis`."""
    leading, trailing = shape[start:x.axis], shape[x.axis + 1:stop]
    if any(d is None for d in leading + trailing):
        return None
    return x.expanded(new_axis, trailing=math.prod(trailing), leading=math.prod(leading))


@register("Reshape")
class Reshape(Handler):
    def analyze(self, node, ctx):
        x = ctx.axis_of(node.input[0])
        if x is None:
            return
        if ctx.axis_of(node.input[1]) is not None:
            ctx.freeze_inputs(node, "shape input carries channels")
            return
        mapped = self._map(x, ctx.view.shape(node.input[0]), ctx.view.shape(node.output[0]))
        if isinstance(mapped, str):
            ctx.freeze(x, f"Reshape {node.name}: {mapped}")
            return
        ctx.set_axis(node.output[0], mapped)

    @staticmethod
    def _map(x, shape_in, shape_out):
        if shape_in is None or shape_out is None:
            return "unknown shapes"
        shape_in, shape_out = list(shape_in), list(shape_out)
        # a leading dynamic batch dim on both sides maps to itself
        if shape_in and shape_out and shape_in[0] is None and shape_out[0] is None and x.axis > 0:
            shape_in[0] = shape_out[0] = 1
        if any(d is None for d in shape_in + shape_out):
            return "dynamic dims besides the batch"
        pin = np.cumprod([1] + shape_in)
        pout = np.cumprod([1] + shape_out)
        common = sorted(set(pin.tolist()) & set(pout.tolist()))
        lo = max(p for p in common if p <= pin[x.axis])
        hi = min(p for p in common if p >= pin[x.axis + 1])
        i0, i1 = int(np.searchsorted(pin, lo)), int(np.searchsorted(pin, hi, side="right")) - 1
        j0, j1 = int(np.searchsorted(pout, lo)), int(np.searchsorted(pout, hi, side="right")) - 1
        # skip size-1 dims at the group edges so [N,C,1,1] -> [N,C] maps one to one
        while j1 - j0 > 1 and shape_out[j1 - 1] == 1:
            j1 -= 1
        while j1 - j0 > 1 and shape_out[j0] == 1:
            j0 += 1
        if j1 - j0 == 1:
            return _merge(x, shape_in, i0, i1, j0)
        # the channel axis itself is split over several output axes: follow it only when the first output axis
        # holds whole segments of channels and the rest is what each channel carried (its `inner`)
        if i1 - i0 == 1 and len(x.segments) == 1:
            seg = x.segments[0]
            inner_out = math.prod(shape_out[j0 + 1:j1])
            if not seg.outers and seg.offset == 0 and shape_out[j0] == seg.channels and seg.inner == inner_out:
                return x.__class__(j0, seg.channels, (seg.__class__(seg.space, seg.channels),))
        return "splits the channel axis (channel shuffle or heads)"

    def rewrite(self, node, ctx):
        out = ctx.axis_of(node.output[0])
        if out is None:
            return
        new_len = ctx.new_length(node.output[0])
        if new_len == out.length:
            return
        shape_name = node.input[1]
        arr = ctx.view.array(shape_name)
        if arr is not None:
            if arr[out.axis] > 0:
                new = arr.copy()
                new[out.axis] = new_len
                ctx.set_input_constant(node, 1, new)
            return
        producer = ctx.view.producer.get(shape_name)
        # a target built by Concat of one-element pieces (TorchScript exports): fix the constant piece
        if producer is not None and producer.op_type == "Concat":
            pos = 0
            for idx, piece in enumerate(producer.input):
                piece_shape = ctx.view.shape(piece)
                n = piece_shape[0] if piece_shape and piece_shape[0] is not None else None
                if n is None:
                    return
                if pos <= out.axis < pos + n:
                    val = ctx.view.array(piece)
                    if val is not None and val.ravel()[out.axis - pos] > 0:
                        new = val.copy().ravel()
                        new[out.axis - pos] = new_len
                        ctx.set_input_constant(producer, idx, new.reshape(val.shape))
                    return
                pos += n
