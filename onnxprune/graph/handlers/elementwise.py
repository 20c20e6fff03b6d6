"""Element-wise ops: channels pass straight through.

Unary ops carry the channel axis. N-ary ops (Add, Mul, Where, PRelu ...) broadcast their inputs; each input's
channel axis is aligned to the output rank, and:
- two inputs that carry channels on the same axis must lose the same channels: their spaces are merged
  (a residual Add, an SE gate Mul);
- a constant with the full channel length on that axis is sliced with them (a per-channel bias or scale);
- a constant or tensor of length 1 there broadcasts and needs nothing;
- anything else freezes the channels.
"""

from __future__ import annotations

import numpy as np

from onnxprune.graph.groups import Repeat
from onnxprune.graph.handlers import Handler, register
from onnxprune.graph.handlers.shapes import constant_entry, set_shape_dims
from onnxprune.graph.ir import attr
from onnxprune.graph.shape_source import dim_source, static_value

UNARY = (
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu", "Gelu",
    "Softplus", "Softsign", "Mish", "Erf", "Swish", "ThresholdedRelu", "Abs", "Neg", "Exp", "Log", "Sqrt",
    "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh",
    "Cosh", "Asinh", "Acosh", "Atanh", "Not", "IsNaN", "IsInf", "Cast", "CastLike", "Identity", "Dropout",
    "Clip", "Shrink", "BitwiseNot", "QuickGelu",
)
NARY = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where", "Equal", "Less",
        "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Mod", "BitShift")


@register(*UNARY)
class Unary(Handler):
    def analyze(self, node, ctx):
        x = ctx.axis_of(node.input[0])
        if x is None:
            return
        # Clip's min/max and Dropout's ratio are scalars; a non-scalar extra input is not element-wise
        for name in node.input[1:]:
            if name and ctx.axis_of(name) is not None:
                ctx.freeze_inputs(node, "channels arrive on a parameter input")
                return
        ctx.set_axis(node.output[0], x)
        if node.op_type == "Dropout" and len(node.output) > 1:
            ctx.set_axis(node.output[1], x)


@register(*NARY)
class Broadcast(Handler):
    def analyze(self, node, ctx):
        inputs = [n for n in node.input if n]
        carried = [(i, ctx.axis_of(n)) for i, n in enumerate(node.input) if n and ctx.axis_of(n) is not None]
        if not carried:
            return
        ranks = [ctx.view.rank(n) for n in inputs]
        if any(r is None for r in ranks):
            ctx.freeze_inputs(node, "unknown input rank")
            return
        out_rank = max(ranks)
        aligned = {ax.axis + out_rank - ctx.view.rank(node.input[i]) for i, ax in carried}
        if len(aligned) != 1:
            ctx.freeze_inputs(node, "inputs carry channels on different axes")
            return
        out_axis = aligned.pop()
        first = carried[0][1]
        for _, other in carried[1:]:
            if not ctx.union(first, other):
                ctx.freeze_inputs(node, "inputs carry differently arranged channels")
                return
        for i, name in enumerate(node.input):
            if not name or ctx.axis_of(name) is not None:
                continue
            rank = ctx.view.rank(name)
            axis = out_axis - (out_rank - rank)
            dim = ctx.view.dim(name, axis) if axis >= 0 else 1
            if dim == 1:
                continue
            if dim == first.length and ctx.view.is_const(name):
                ctx.add_member(node, i, axis, first.with_axis(axis), "pass", scored=False)
                continue
            ctx.freeze_inputs(node, _fixed_input_reason(node, name, dim, ctx.view))
            return
        ctx.set_axis(node.output[0], first.with_axis(out_axis))


_NORMS = ("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization",
          "SkipSimplifiedLayerNormalization")


def _fixed_input_reason(node, name: str, dim, view) -> str:
    """Why a join with a channel-free input freezes; a transformer's residual stream gets its own words."""
    near = [view.producer.get(name)] + [user for user, _ in view.consumers.get(node.output[0], [])]
    if node.op_type == "Add" and not view.is_const(name) and any(
            n is not None and n.op_type in _NORMS for n in near):
        return (f"hidden size (residual stream through LayerNorm) is frozen: input {name} has {dim} entries "
                "on the channel axis and no prunable channels")
    return f"input {name} has {dim} entries on the channel axis"


@register("Shape", "Size")
class ShapeOf(Handler):
    """Reads the shape at run time: after pruning it reads the new shape, which downstream shape arithmetic
    (Reshape targets computed from Shape) then follows."""

    def analyze(self, node, ctx):
        return


@register("Gather")
class Gather(Handler):
    """Picks entries along one axis. Channels pass when the gather runs along another axis (a token, or one of
    q/k/v from a packed [3, ...] tensor); along the channel axis itself they freeze. An embedding lookup
    (rows of a constant [vocabulary, features] table) creates channels only with --prune-hidden: they are the
    hidden size, and the table's columns are sliced with them."""

    def analyze(self, node, ctx):
        x = ctx.axis_of(node.input[0])
        if ctx.axis_of(node.input[1]) is not None:
            ctx.freeze_inputs(node, "indices carry channels")
            return
        if x is None:
            table = ctx.view.array(node.input[0]) if ctx.prune_hidden else None
            rank = ctx.view.rank(node.output[0])
            if (table is not None and table.ndim == 2 and table.dtype.kind == "f" and attr(node, "axis", 0) == 0
                    and rank is not None and table.shape[1] > 1):
                out = ctx.open_space(node, rank - 1, table.shape[1])
                ctx.add_member(node, 0, 1, out.with_axis(1), "out")
                ctx.set_axis(node.output[0], out)
            return
        rank, index_rank = ctx.view.rank(node.input[0]), ctx.view.rank(node.input[1])
        axis = attr(node, "axis", 0)
        if rank is None or index_rank is None:
            ctx.freeze(x, f"Gather {node.name}: unknown rank")
            return
        axis = axis + rank if axis < 0 else axis
        if axis == x.axis:
            ctx.freeze(x, f"Gather {node.name}: gathers along the channel axis")
            return
        ctx.set_axis(node.output[0], x.with_axis(x.axis if x.axis < axis else x.axis + index_rank - 1))


@register("Expand")
class Expand(Handler):
    """Broadcasts to a shape: channels pass when the channel axis keeps its length (other axes grow, as in
    repeat_kv of grouped-query attention or a batch-expanded class token). An axis that grows from 1 is recorded
    as a repeat (`ctx.repeats`): a Reshape that merges it into the k/v heads before it makes one head per query
    head (reshape.py). After pruning, the channel axis of the target shape and a repeat count follow."""

    def analyze(self, node, ctx):
        x = ctx.axis_of(node.input[0])
        if ctx.axis_of(node.input[1]) is not None:
            ctx.freeze_inputs(node, "shape input carries channels")
            return
        if x is None:
            return
        rank_in, rank_out = ctx.view.rank(node.input[0]), ctx.view.rank(node.output[0])
        if rank_in is None or rank_out is None:
            ctx.freeze(x, f"Expand {node.name}: unknown rank")
            return
        axis = x.axis + rank_out - rank_in
        if ctx.view.dim(node.output[0], axis) != x.length:
            ctx.freeze(x, f"Expand {node.name}: the channel axis may be broadcast")
            return
        # the target shape's entry for the channel axis must follow the pruned count: 1 (broadcast), a constant
        # (rewritten), static arithmetic (written down), or read from a tensor losing the same channels
        shape = node.input[1]
        entry = axis - (rank_out - (ctx.view.dim(shape, 0) or rank_out))
        const = ctx.view.array(shape)
        if const is None:
            const = static_value(ctx.view, shape)
        if const is None:
            src = dim_source(ctx.view, shape, entry)
            other = ctx.axis_of(src.tensor) if src is not None and src.tensor else None
            piece = constant_entry(ctx.view, shape, entry)  # a constant piece of a Concat: rewritten later
            if piece not in (1, x.length) and not (src is not None and src.tensor is None and src.value == 1) and (
                    other is None or other.axis != src.dim or not ctx.union(x, other)):
                # frozen, but still followed: what the channels meet downstream (the q heads that grouped-query
                # attention's repeat_kv serves) is frozen with them, and says why
                ctx.freeze(x, f"Expand {node.name}: the channel entry of its shape is computed at run time from "
                              "something onnxprune cannot follow")
        elif entry < 0 or entry >= np.size(const) or int(np.ravel(const)[entry]) not in (1, x.length):
            ctx.freeze(x, f"Expand {node.name}: its shape does not keep the channel axis")
            return
        ctx.set_axis(node.output[0], x.with_axis(axis))
        after = axis + 1
        if after < rank_out and after - (rank_out - rank_in) >= 0 and \
                ctx.view.dim(node.input[0], after - (rank_out - rank_in)) == 1:
            count = ctx.view.dim(node.output[0], after)
            if count is not None and count > 1:
                ctx.repeats[node.output[0]] = Repeat(node.name, after, count)

    def rewrite(self, node, ctx):
        x, out = ctx.axis_of(node.input[0]), ctx.axis_of(node.output[0])
        if x is None or out is None:
            return
        rank = ctx.view.rank(node.output[0])
        dims = {out.axis: ctx.new_length(node.input[0])}
        repeat = ctx.analysis.context.head_repeats.get(node.name)
        if repeat is not None:
            kv_heads, query_heads = ctx.new_length(repeat.kv_tensor), ctx.new_length(repeat.query_tensor)
            dims[repeat.kv_axis + 1] = query_heads // max(kv_heads, 1)
        shape = ctx.array(node.input[1])
        if shape is None:
            static = static_value(ctx.view, node.input[1])
            if static is not None:  # static arithmetic: written down with the new lengths
                new = np.array(static).ravel().astype(np.int64)
                changed = False
                for axis, length in dims.items():
                    entry = axis - (rank - new.size)
                    if 0 <= entry < new.size and int(new[entry]) not in (1, length):
                        new[entry], changed = length, True
                if changed:
                    ctx.set_input_constant(node, 1, new.reshape(np.shape(static)))
                return
        elif rank is not None and np.size(shape) != rank:  # a shorter target broadcasts from the right
            dims = {axis - (rank - np.size(shape)): length for axis, length in dims.items()}
        set_shape_dims(ctx, node, 1, dims)
